"""Registers Imagen's text conditioners, Efficient U-Net, cascade pipeline and shipped models.

Targets are strings: nothing here imports torch or transformers until a component is used.
"""

from diffplug import hookimpl
from diffplug.hookspecs import Register


@hookimpl
def register_conditioners(register: Register) -> None:
    register("text", "diffplug_imagen.text:TextConditioner",
             "byte-level text transformer trained with the model (no outside weights)")  # fmt: skip
    register("t5", "diffplug_imagen.t5:T5Conditioner",
             "frozen T5 encoder from a local folder (diffplug-imagen[t5])")  # fmt: skip


@hookimpl
def register_denoisers(register: Register) -> None:
    register("efficient-unet", "diffplug_imagen.unet:EfficientUNet",
             "Imagen's Efficient U-Net: text cross-attention, or super-resolution")  # fmt: skip


@hookimpl
def register_pipelines(register: Register) -> None:
    register("imagen", "diffplug_imagen.cascade:Cascade",
             "prompts -> base model -> super-resolution stages")  # fmt: skip
