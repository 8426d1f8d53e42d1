"""The hooks a plugin may implement. Each receives a ``register`` callable.

``register(name, target, summary="")`` records a component under ``name``; ``target`` is a
lazy import path ``"package.module:Attribute"`` so that listing plugins never imports torch.
A plugin module implements any subset of these with ``@diffplug.hookimpl``.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT = "diffplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback every hook receives: ``register(name, target, summary="")``.

    ``name`` is lower-case (letters, digits, ``-``, ``_``, ``.``); ``target`` is
    ``"package.module:Attribute"`` (for pretrained weights ``"package:path.safetensors"``),
    imported only when the component is used; ``summary`` is the one line ``diffplug list``
    shows.
    """

    def __call__(self, name: str, target: str, summary: str = "") -> None: ...


@hookspec
def register_schedulers(register: Register) -> None:
    """Samplers: turn a process and a step count into a plan of updates."""


@hookspec
def register_schedules(register: Register) -> None:
    """Schedules: the noise levels a sampler visits (``--schedule NAME``)."""


@hookspec
def register_denoisers(register: Register) -> None:
    """Networks that predict eps, x0, v or a pair from a noisy sample."""


@hookspec
def register_conditioners(register: Register) -> None:
    """Turn prompts, labels or images into conditioning tensors."""


@hookspec
def register_autoencoders(register: Register) -> None:
    """Map images to the space the denoiser works in, and back."""


@hookspec
def register_processes(register: Register) -> None:
    """Forward processes x_t = alpha(t)*x0 + sigma(t)*eps that denoisers are trained on."""


@hookspec
def register_methods(register: Register) -> None:
    """Training methods: a process plus a loss, for ``diffplug train --method``."""


@hookspec
def register_transforms(register: Register) -> None:
    """Prediction transforms applied to x0_hat at every step (thresholding, clipping)."""


@hookspec
def register_pretrained(register: Register) -> None:
    """Shipped weights: ``target`` is ``"package:relative/path.safetensors"``."""


@hookspec
def register_pipelines(register: Register) -> None:
    """Whole generation recipes (a cascade) runnable by ``diffplug run --pipeline``."""


@hookspec
def register_datasets(register: Register) -> None:
    """Data sets for ``diffplug train --data NAME``: ``target`` names a subclass of
    ``diffplug.ImageDataset`` (see ``diffplug.datasets``) whose ``info()`` imports no torch."""


@hookspec
def register_features(register: Register) -> None:
    """Feature spaces for ``diffplug eval --reference --features NAME``: ``target`` names a
    subclass of ``diffplug.FeatureSpace`` (see ``diffplug.features``)."""


@hookspec
def register_commands(register: Register) -> None:
    """Extra CLI commands: ``target`` names a click command."""
