"""Registers the KL autoencoder and its training method (targets load lazily)."""

from diffplug import Register, hookimpl


@hookimpl
def register_autoencoders(register: Register) -> None:
    register(
        "kl-vae",
        "diffplug_vae.model:KLVAE",
        "KL autoencoder, diffusers AutoencoderKL layout (loads SD VAEs)",
    )


@hookimpl
def register_methods(register: Register) -> None:
    register(
        "vae",
        "diffplug_vae.method:VAEMethod",
        "trains an autoencoder: reconstruction + KL (+ optional digits perceptual term)",
    )


@hookimpl
def register_pretrained(register: Register) -> None:
    register(
        "vae-digits",
        "diffplug_vae:weights/vae-digits.safetensors",
        "KL autoencoder trained on the 32x32 digits: 8x8x4 latents (calibrated scale)",
    )
