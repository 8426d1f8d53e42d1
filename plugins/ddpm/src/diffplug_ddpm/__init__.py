"""DDPM for diffplug (Ho et al. 2020): the ancestral sampler, the losses, the digits UNet."""
