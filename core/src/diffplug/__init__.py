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
    Interrupted,
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
    "fold": "diffplug.sampling",
    # the component interfaces a plugin implements
    "Scheduler": "diffplug.components",
    "Denoiser": "diffplug.components",
    "DenoiserConfig": "diffplug.components",
    "Conditioner": "diffplug.components",
    "Autoencoder": "diffplug.components",
    "Cond": "diffplug.components",
    "Method": "diffplug.method",
    "Pipeline": "diffplug.pipeline",
    "StageResult": "diffplug.pipeline",
    "StageSpec": "diffplug.pipeline",
    "run_stage": "diffplug.pipeline",
    "Schedule": "diffplug.components",
    "NoiseTable": "diffplug.schedules",
    "Plan": "diffplug.plan",
    "Stepper": "diffplug.plan",
    "ModelView": "diffplug.bridge",
    "VPSampler": "diffplug.vp_sampler",
    "LevelSampler": "diffplug.level_sampler",
    "LevelPlan": "diffplug.level_sampler",
    "ancestral_step": "diffplug.level_sampler",
    "VPSamplerConfig": "diffplug.vp_sampler",
    "transitions": "diffplug.vp_sampler",
    "Process": "diffplug.process",
    "build_process": "diffplug.process",
    "VP": "diffplug.vp",
    "VPConfig": "diffplug.vp",
    "SPACINGS": "diffplug.vp",
    "option": "diffplug.options",
    "build_config": "diffplug.options",
    # thresholds (sampling transforms), by class and by name
    "StaticThreshold": "diffplug.transforms",
    "DynamicThreshold": "diffplug.transforms",
    "DynamicConfig": "diffplug.transforms",
    "THRESHOLDS": "diffplug.transforms",
    # checkpoints and the registry
    "Registry": "diffplug.registry",
    "default_registry": "diffplug.registry",
    "KINDS": "diffplug.registry",  # component kinds (not diffplug.prediction's KINDS)
    "default_model": "diffplug.resolve",
    "load_model": "diffplug.resolve",
    "load_component": "diffplug.checkpoint",
    "save_component": "diffplug.checkpoint",
    "load_tensors": "diffplug.checkpoint",
    "read_metadata": "diffplug.checkpoint",
    "read_header": "diffplug.checkpoint",
    "pickle_files": "diffplug.checkpoint",
    # outputs: where they may go, and the recipe they carry
    "check_output_path": "diffplug.output",
    "read_recipe": "diffplug.output",
    # building blocks plugins share: layers, conditioners, data, training, evaluation
    "Attention": "diffplug.layers",
    "CrossAttention": "diffplug.layers",
    "ResBlock": "diffplug.layers",
    "group_norm": "diffplug.layers",
    "timestep_embedding": "diffplug.layers",
    "zero_init": "diffplug.layers",
    "LowResConditioner": "diffplug.conditioners",
    "LowResConfig": "diffplug.conditioners",
    "AUG_LEVEL": "diffplug.conditioners",
    "recorded_conditioner": "diffplug.conditioners",
    "ImageDataset": "diffplug.datasets",  # the data-set contract (register_datasets)
    "DatasetInfo": "diffplug.datasets",
    "digits": "diffplug.data",
    "load_data": "diffplug.data",
    "resize": "diffplug.data",
    "TrainConfig": "diffplug.training",
    "Trainer": "diffplug.training",
    "train": "diffplug.training",
    "DigitsClassifier": "diffplug.evaluate",
    "load_classifier": "diffplug.evaluate",
    "to_digits": "diffplug.evaluate",
    "FeatureSpace": "diffplug.features",  # the feature-space contract (register_features)
    "feature_space": "diffplug.features",
    "frechet_distance": "diffplug.metrics",
    "kid": "diffplug.metrics",
    "precision_recall": "diffplug.metrics",
    # a whole module: its function ``evaluate`` shares the module's name, and the import
    # system binds ``diffplug.evaluate`` to the module once it is imported, so only the
    # module can be exported unambiguously (``evaluate.evaluate(samples)``)
    "evaluate": "diffplug.evaluate",
}

__all__ = [
    "AmbiguousComponentError",
    "CheckpointError",
    "DiffplugError",
    "IncompatibleError",
    "Interrupted",
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
    if module == f"{__name__}.{name}":  # the value names a submodule: export it whole
        value = importlib.import_module(module)
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
