"""k-diffusion's sampler family as diffplug samplers."""
