"""Noise-conditioning augmentation for super-resolution stages (Ho et al., Cascaded Diffusion)."""
