"""Registers the ``clip`` conditioner. Targets are strings: nothing here imports torch or
transformers until the conditioner is used."""

from diffplug import Register, hookimpl


@hookimpl
def register_conditioners(register: Register) -> None:
    register("clip", "diffplug_clip.clip:CLIPConditioner",
             "frozen CLIP text encoder (Stable Diffusion's), from a local --clip-path")  # fmt: skip
    register("clip-sdxl", "diffplug_clip.sdxl:SDXLConditioner",
             "SDXL's two CLIP encoders: penultimate states joined, pooled projection")  # fmt: skip
