"""Registers the diffusers UNet denoiser, the diffusers scheduler wrapper and the
``import-diffusers`` command. Targets are strings: listing plugins imports no torch or
diffusers."""

from diffplug import Register, hookimpl


@hookimpl
def register_denoisers(register: Register) -> None:
    register(
        "diffusers-unet",
        "diffplug_diffusers.unet:DiffusersUNet",
        "a diffusers UNet2DModel / UNet2DConditionModel (diffplug import-diffusers)",
    )


@hookimpl
def register_schedulers(register: Register) -> None:
    register(
        "diffusers",
        "diffplug_diffusers.scheduler:DiffusersScheduler",
        "any diffusers scheduler class (--scheduler-class), default DDIMScheduler",
    )


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "import-diffusers",
        "diffplug_diffusers.command:import_diffusers",
        "Convert a local diffusers UNet or pipeline folder to a checkpoint.",
    )
