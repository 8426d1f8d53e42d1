"""Registers ADM's process, sampler, training method, dual UNet and shipped model.

Targets are strings: nothing here imports torch or timm until a component is used.
"""

from diffplug import Register, hookimpl


@hookimpl
def register_processes(register: Register) -> None:
    register("decoupled", "diffplug_adm.process:Decoupled",
             "x_t = x0 + c*t + sqrt(t)*eps, c = -x0 (alpha = 1 - t, sigma = sqrt(t))")  # fmt: skip


@hookimpl
def register_schedulers(register: Register) -> None:
    register("adm", "diffplug_adm.scheduler:ADM",
             "decoupled diffusion's posterior step (stochastic, or --deterministic)")  # fmt: skip


@hookimpl
def register_methods(register: Register) -> None:
    register(
        "adm", "diffplug_adm.method:ADMMethod", "decoupled (c, eps) regression, t ~ U(t_min, 1)"
    )


@hookimpl
def register_denoisers(register: Register) -> None:
    register("dual-unet", "diffplug_adm.dual_unet:DualUNet",
             "one encoder, two decoders (c and eps), optional timm condition encoder")  # fmt: skip


@hookimpl
def register_pretrained(register: Register) -> None:
    register(
        "adm-digits",
        "diffplug_adm:weights/adm-digits.safetensors",
        "dual UNet (c, eps) trained with ADM's loss on the 8x8 digits; EMA weights",
    )
    register(
        "adm-digits-onehead",
        "diffplug_adm:weights/adm-digits-onehead.safetensors",
        "the c branch of adm-digits alone (x0 = -c, eps derived), trained alike: the two-head "
        "ablation's control",
    )
    register(
        "adm-latent-digits",
        "diffplug_adm:weights/adm-latent-digits.safetensors",
        "dual UNet in the latents of vae-digits (diffplug-vae): 32x32 digits",
    )
