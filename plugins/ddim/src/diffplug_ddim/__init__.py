"""DDIM for diffplug (Song et al. 2021): the non-Markov sampler for DDPM-trained models."""
