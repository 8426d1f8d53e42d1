"""diffplug: a plugin-based registry of diffusion samplers and models.

Everything a user or a plugin author needs is importable from here (and test helpers from
``diffplug.testing``); other modules are internal and may move. Importing ``diffplug`` is
cheap (no torch): the CLI's ``--help``, ``plugins`` and ``list`` stay fast, and the
torch-backed names below are imported on first access.

    import diffplug
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=20)
    run.sample(8, seed=0).save("grid.png")
"""

from __future__ import annotations

import importlib
from typing import Any

from diffplug.errors import (
    AmbiguousComponentError,
    CheckpointError,
    DiffplugError,
    IncompatibleError,
    NonFiniteError,
    OptionError,
    PluginError,
    UnknownComponentError,
    UserError,
)
from diffplug.hookspecs import Register, hookimpl

__version__ = "0.1.0"

_LAZY = {
    # running: one object owns a run
    "load": "diffplug.run",
    "Run": "diffplug.run",
    "Samples": "diffplug.samples",
    "Step": "diffplug.sampling",
    "sample": "diffplug.sampling",
    # the component interfaces a plugin implements
    "Scheduler": "diffplug.components",
    "Denoiser": "diffplug.components",
    "Conditioner": "diffplug.components",
    "Autoencoder": "diffplug.components",
    "Cond": "diffplug.components",
    "Method": "diffplug.method",
    "Pipeline": "diffplug.pipeline",
    "StageResult": "diffplug.pipeline",
    "StageSpec": "diffplug.pipeline",
    "Plan": "diffplug.plan",
    "Stepper": "diffplug.plan",
    "ModelView": "diffplug.bridge",
    "VPSampler": "diffplug.vp_sampler",
    "VPSamplerConfig": "diffplug.vp_sampler",
    "transitions": "diffplug.vp_sampler",
    "Process": "diffplug.process",
    "VP": "diffplug.vp",
    "VPConfig": "diffplug.vp",
    "option": "diffplug.options",
    # checkpoints and the registry
    "Registry": "diffplug.registry",
    "load_component": "diffplug.checkpoint",
    "save_component": "diffplug.checkpoint",
}

__all__ = [
    "AmbiguousComponentError",
    "CheckpointError",
    "DiffplugError",
    "IncompatibleError",
    "NonFiniteError",
    "OptionError",
    "PluginError",
    "Register",
    "UnknownComponentError",
    "UserError",
    "__version__",
    "hookimpl",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
