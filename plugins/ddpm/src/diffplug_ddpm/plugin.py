"""Registers DDPM's sampler, training method, UNet and shipped model (targets load lazily)."""

from diffplug import Register, hookimpl


@hookimpl
def register_schedulers(register: Register) -> None:
    register("ddpm", "diffplug_ddpm.scheduler:DDPM", "DDPM ancestral sampler (Markov)")


@hookimpl
def register_methods(register: Register) -> None:
    register("ddpm", "diffplug_ddpm.method:DDPMMethod", "DDPM: uniform timesteps, simple MSE")


@hookimpl
def register_denoisers(register: Register) -> None:
    register("unet", "diffplug_ddpm.unet:UNet", "UNet with time embedding, GroupNorm, attention")


@hookimpl
def register_pretrained(register: Register) -> None:
    register(
        "ddpm-digits",
        "diffplug_ddpm:weights/ddpm-digits.safetensors",
        "UNet (eps, linear betas, T=1000) trained on the 8x8 digits; EMA weights",
    )
