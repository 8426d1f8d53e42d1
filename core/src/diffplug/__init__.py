"""diffplug: a plugin-based registry of diffusion samplers and models.

Importing ``diffplug`` is cheap (no torch): the CLI's ``--help``, ``plugins`` and ``list``
stay fast. The torch-backed API is imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffplug.errors import DiffplugError, UserError
from diffplug.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "Scheduler": "diffplug.components",
    "Denoiser": "diffplug.components",
    "Conditioner": "diffplug.components",
    "Autoencoder": "diffplug.components",
    "Plan": "diffplug.plan",
    "Process": "diffplug.process",
    "sample": "diffplug.sampling",
    "option": "diffplug.options",
    "Registry": "diffplug.registry",
    "load_component": "diffplug.checkpoint",
    "save_component": "diffplug.checkpoint",
}

__all__ = ["DiffplugError", "UserError", "hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffplug' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
