"""From names the user typed to components: samplers with options, models by name or path."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from diffplug.checkpoint import PICKLE_SUFFIXES, load_component, read_metadata
from diffplug.errors import (
    CheckpointError,
    IncompatibleError,
    PluginError,
    UnknownComponentError,
    UserError,
)
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
    """(file path, display name) for a pretrained name or a checkpoint path. A folder, or a
    safetensors file that is not a diffplug checkpoint, is offered to the installed denoisers
    that convert foreign models (``convert_foreign``); the first that takes it gives the
    checkpoint to load."""
    if is_path(name_or_path) or Path(name_or_path).is_dir():
        path = Path(name_or_path)
        if path.is_dir() or (path.is_file() and _foreign(path)):
            return converted(registry, path), name_or_path
        if not path.is_file():
            raise CheckpointError(f"{name_or_path}: no such checkpoint file")
        return name_or_path, name_or_path
    entry = registry.get("pretrained", name_or_path)
    return entry.load(), entry.name


def _foreign(path: Path) -> bool:
    """A safetensors file without diffplug's metadata (a pickle is refused as before)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return False
    try:
        read_metadata(path)
    except CheckpointError as exc:
        return "not a diffplug checkpoint" in str(exc)
    return False


def converted(registry: Registry, path: Path) -> str:
    """The diffplug checkpoint a denoiser plugin makes of a foreign model (a folder, or a
    file in another layout): each registered denoiser class with a ``convert_foreign(path)``
    classmethod is asked in turn; it returns a checkpoint path, or None when the model is
    not of its kind (and raises UserError, saying why, when it is but cannot be read)."""
    for entry in registry.entries("denoiser"):
        try:
            cls = entry.load()
        except PluginError:  # a broken plugin is reported by `diffplug plugins`, not here
            continue
        convert = getattr(cls, "convert_foreign", None)
        if callable(convert):
            out = convert(path)
            if out is not None:
                return os.fspath(out)
    what = "folder" if path.is_dir() else "safetensors file without diffplug metadata"
    raise CheckpointError(
        f"{path}: not a diffplug checkpoint (a {what}), and no installed plugin converts it "
        "(`diffplug plugins` lists what is installed)"
    )


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


def intended(entries: list[Entry]) -> Entry:
    """Of the models several plugins register under one name, the one the default path
    means: core's; else one whose checkpoint holds its own plugin's component (the weights'
    author, not a re-registration by another plugin); then one in diffplug's own namespace
    (``diffplug-*``); then by distribution name."""

    def own(entry: Entry) -> bool:
        try:
            return read_metadata(entry.load())["plugin"] == entry.dist
        except Exception:  # unreadable: not the intended one (reported if it is tried)
            return False

    return min(entries, key=lambda e: (e.dist != CORE_DIST, not own(e),
                                       not e.dist.startswith(CORE_DIST + "-"), e.dist))  # fmt: skip


def recorded_name(registry: Registry, name: str) -> str:
    """A model or autoencoder name a checkpoint records, as this registry must read it: a
    bare name several plugins register stands for ``intended``'s (by its qualified name),
    so a third-party model named like a shipped one breaks nothing that records it."""
    if is_path(name):
        return name
    shared = registry.sharing("pretrained", name)
    return intended(shared).qualified if len(shared) > 1 else name


def find_default_model(registry: Registry, scheduler: Any) -> tuple[str, str]:
    """(file path, name) of the first installed pretrained unconditional model the sampler
    can run (said on stderr). A name several plugins register stands for one of them
    (``intended``), taken by its qualified name with a warning naming them all; the others
    are never a default."""
    reasons = []
    for entry in pretrained_order(registry):
        shared = registry.sharing("pretrained", entry.name)
        if len(shared) > 1 and entry != intended(shared):
            continue
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
            name = entry.qualified if len(shared) > 1 else entry.name
            if os.environ.get("RANK", "0") == "0":
                if len(shared) > 1:
                    print(
                        f"diffplug: warning: pretrained {entry.name!r} is registered by several "
                        f"plugins ({', '.join(e.dist for e in shared)}); the default is {name}; "
                        f"choose with --model PLUGIN:{entry.name}",
                        file=sys.stderr,
                    )
                print(f"diffplug: using model {name} ({entry.dist})", file=sys.stderr)
            return path, name
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
    "intended",
    "load_model",
    "model_path",
    "parse_extra_options",
]
