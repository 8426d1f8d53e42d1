"""Core's own plugin: the VP process, pixel space, no or low-res image conditioning,
thresholding, the oracle, the digits data set."""

from __future__ import annotations

from diffplug.hookspecs import Register, hookimpl


@hookimpl
def register_processes(register: Register) -> None:
    register("vp", "diffplug.vp:VP", "DDPM's discrete variance-preserving process")


#: (name, class in diffplug.schedules, summary): listed here so that listing imports no torch
SCHEDULES = [
    ("normal", "Normal", "the model's own timesteps at a spacing (the default)"),
    ("karras", "Karras", "Karras et al.: evenly spaced in level^(1/rho)"),
    ("exponential", "Exponential", "evenly spaced in log level"),
    ("polyexponential", "Polyexponential", "log level along a polynomial ramp"),
    ("sgm-uniform", "SGMUniform", "ComfyUI's sgm_uniform: even fractional times"),
    ("simple", "Simple", "ComfyUI's simple: every (T/steps)-th timestep"),
    ("ddim-uniform", "DDIMUniform", "ComfyUI's ddim_uniform: timesteps 1, 1+k, 1+2k, ..."),
    ("beta", "Beta", "timesteps at Beta(alpha, beta) quantiles"),
    ("linear-quadratic", "LinearQuadratic", "Mochi's linear then quadratic schedule"),
    ("kl-optimal", "KLOptimal", "Align your steps: evenly spaced in arctan(level)"),
]


@hookimpl
def register_schedules(register: Register) -> None:
    for name, cls, summary in SCHEDULES:
        register(name, f"diffplug.schedules:{cls}", summary)


@hookimpl
def register_autoencoders(register: Register) -> None:
    register("identity", "diffplug.components:IdentityAutoencoder", "pixel space (no autoencoder)")


@hookimpl
def register_conditioners(register: Register) -> None:
    register("none", "diffplug.components:NullConditioner", "no conditioning")
    register("lowres", "diffplug.conditioners:LowResConditioner",
             "a low-resolution copy of the image (super-resolution)")  # fmt: skip


@hookimpl
def register_transforms(register: Register) -> None:
    register("static", "diffplug.transforms:StaticThreshold", "clip x0_hat to [-1, 1]")
    register("dynamic", "diffplug.transforms:DynamicThreshold", "Imagen's dynamic thresholding")


@hookimpl
def register_denoisers(register: Register) -> None:
    register(
        "gmm-oracle",
        "diffplug.oracle:GaussianMixtureDenoiser",
        "exact E[x0|x_t] of a Gaussian mixture (a reference, not a network)",
    )


@hookimpl
def register_pretrained(register: Register) -> None:
    register(
        "gmm-digits",
        "diffplug:weights/gmm-digits.safetensors",
        "Gaussian mixture at the ten class means of the 8x8 digits (exact oracle, no training)",
    )


@hookimpl
def register_datasets(register: Register) -> None:
    register(
        "digits",
        "diffplug.datasets:Digits",
        "scikit-learn's 8x8 handwritten digits, 17 grey levels, with their classes",
    )
