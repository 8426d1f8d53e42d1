"""A KL autoencoder for diffplug with the weight layout of diffusers' ``AutoencoderKL``, so a
Stable Diffusion VAE loads as it is, and the ``vae`` training method."""
