"""Registers Imagen's text conditioners, Efficient U-Net, cascade pipeline and shipped models.

Targets are strings: nothing here imports torch or transformers until a component is used.
"""

from diffplug import Register, hookimpl


@hookimpl
def register_conditioners(register: Register) -> None:
    register("text", "diffplug_imagen.text:TextConditioner",
             "text transformer over bytes or hashed words, trained with the model")  # fmt: skip
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
    register("imagen-emoji", "diffplug_imagen.cascade:EmojiCascade",
             "prompts -> 16x16 emoji -> 32x32 (imagen with the emoji models)")  # fmt: skip


@hookimpl
def register_pretrained(register: Register) -> None:
    register("imagen-digits-base", "diffplug_imagen:weights/imagen-digits-base.safetensors",
             "text -> 8x8 digits: Efficient U-Net, self-contained text encoder")  # fmt: skip
    register("imagen-digits-sr", "diffplug_imagen:weights/imagen-digits-sr.safetensors",
             "8x8 -> 32x32 super-resolution, trained with noise augmentation")  # fmt: skip
    register("imagen-digits-sr-noaug", "diffplug_imagen:weights/imagen-digits-sr-noaug.safetensors",
             "the same stage trained on clean conditions (the ablation's control)")  # fmt: skip
    register("imagen-emoji-base", "diffplug_imagen:weights/imagen-emoji-base.safetensors",
             "text -> 16x16 emoji (trained on diffplug-emoji; float16 weights)")  # fmt: skip
    register("imagen-emoji-sr", "diffplug_imagen:weights/imagen-emoji-sr.safetensors",
             "16x16 -> 32x32 emoji super-resolution, trained with noise augmentation")  # fmt: skip
    register("imagen-latent-digits", "diffplug_imagen:weights/imagen-latent-digits.safetensors",
             "text -> 32x32 digits in the latents of vae-digits (diffplug-vae)")  # fmt: skip
