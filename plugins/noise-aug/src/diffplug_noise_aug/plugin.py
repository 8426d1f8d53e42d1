"""Registers the noise-augmented low-resolution conditioner."""

from diffplug import Register, hookimpl


@hookimpl
def register_conditioners(register: Register) -> None:
    register("noise-aug", "diffplug_noise_aug.conditioner:NoiseAugConditioner",
             "a low-res image noised at a per-sample level, the level passed along")  # fmt: skip
