"""From names the user typed to components: samplers with options, models by name or path."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from diffplug.checkpoint import PICKLE_SUFFIXES, load_component, read_metadata
from diffplug.errors import CheckpointError, IncompatibleError, UnknownComponentError, UserError
from diffplug.process import build_process
from diffplug.registry import CORE_DIST, Entry, Registry


def parse_extra_options(args: list[str]) -> dict[str, str]:
    """``["--eta", "0.5", "--spacing=trailing", "--clip-sample"]`` -> {"eta": "0.5", ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def build_scheduler(registry: Registry, name: str, options: dict[str, Any]) -> Any:
    entry = registry.get("scheduler", name)
    cls = entry.load()
    from diffplug.options import build_config

    config = build_config(cls.Config, options, owner=f"sampler {entry.name!r}")
    scheduler = entry.construct(config, cls=cls)
    scheduler.name = entry.name
    return scheduler


def is_path(value: str) -> bool:
    suffix = Path(value).suffix.lower()
    return (
        os.sep in value
        or "/" in value
        or suffix in {".safetensors", *PICKLE_SUFFIXES}
        or Path(value).is_file()
    )


def model_path(registry: Registry, name_or_path: str) -> tuple[str, str]:
    """(file path, display name) for a pretrained name or a checkpoint path."""
    if is_path(name_or_path):
        if not Path(name_or_path).is_file():
            raise CheckpointError(f"{name_or_path}: no such checkpoint file")
        return name_or_path, name_or_path
    entry = registry.get("pretrained", name_or_path)
    return entry.load(), entry.name


def load_model(registry: Registry, name_or_path: str, device: str = "cpu") -> tuple[Any, str]:
    path, label = model_path(registry, name_or_path)
    return load_component(path, kind="denoiser", registry=registry, device=device), label


def pretrained_order(registry: Registry) -> list[Entry]:
    """Plugins' models first, core's reference models last."""
    entries = registry.entries("pretrained")
    return sorted(entries, key=lambda e: (e.dist == CORE_DIST, e.dist, e.name))


def default_model(registry: Registry, scheduler: Any) -> str:
    """The name of the first installed pretrained model the sampler can run."""
    return find_default_model(registry, scheduler)[1]


def find_default_model(registry: Registry, scheduler: Any) -> tuple[str, str]:
    """(file path, name) of the first installed pretrained unconditional model the sampler
    can run (said on stderr)."""
    reasons = []
    for entry in pretrained_order(registry):
        try:
            path = entry.load()
            meta = read_metadata(path)
            process = build_process(meta["config"].get("process", {"name": "vp"}))
        except (UserError, Exception) as exc:  # a broken model must not hide the others
            reasons.append(f"{entry.name}: {exc}")
            continue
        if meta["kind"] != "denoiser" or meta["config"].get("conditioning") not in (None, "none"):
            continue
        if scheduler.supports(process) is None:
            if os.environ.get("RANK", "0") == "0":
                print(f"diffplug: using model {entry.name} ({entry.dist})", file=sys.stderr)
            return path, entry.name
    names = ", ".join(e.name for e in registry.entries("pretrained")) or "none installed"
    unreadable = f"; unreadable: {'; '.join(reasons)}" if reasons else ""
    raise IncompatibleError(
        f"no installed model can be sampled by {scheduler.name!r} (models: {names}"
        f"{unreadable}); pass --model NAME|PATH, or install a plugin that ships a model"
    )


__all__ = [
    "UnknownComponentError",
    "build_scheduler",
    "default_model",
    "find_default_model",
    "load_model",
    "model_path",
    "parse_extra_options",
]
