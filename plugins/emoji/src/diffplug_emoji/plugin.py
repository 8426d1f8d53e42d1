"""Registers the emoji data set and the emoji feature space. Imports nothing heavy: the
targets load lazily."""

from diffplug import Register, hookimpl


@hookimpl
def register_datasets(register: Register) -> None:
    register(
        "emoji",
        "diffplug_emoji.dataset:Emoji",
        "Google's Noto Emoji 16.0, 64x64 RGB on white, with names and captions",
    )


@hookimpl
def register_features(register: Register) -> None:
    register(
        "emoji",
        "diffplug_emoji.features:EmojiFeatures",
        "the emoji subcategory classifier's 128-d features (diffplug eval --features emoji)",
    )
