"""Registers the emoji data set. Imports nothing heavy: the target loads lazily."""

from diffplug import Register, hookimpl


@hookimpl
def register_datasets(register: Register) -> None:
    register(
        "emoji",
        "diffplug_emoji.dataset:Emoji",
        "Google's Noto Emoji 16.0, 64x64 RGB on white, with names and captions",
    )
