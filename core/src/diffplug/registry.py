"""The plugin registry: entry points in the group ``diffplug``, loaded with pluggy.

Every plugin is loaded and asked to register in isolation: one that fails to import or
registers something invalid is recorded with its error and contributes nothing, while every
other plugin keeps working. Names resolve bare (``ddim``) or qualified (``diffplug-ddim:ddim``);
a bare name two plugins share is an error naming both, never silent last-wins.

Environment switches (in the spirit of pytest's):
- ``DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points but core's own;
- ``DIFFPLUG_PLUGINS=mod1,mod2``: load these modules as plugins (works with autoload off);
- ``DIFFPLUG_BLOCK_PLUGINS=dist1,dist2``: skip these distributions;
- ``DIFFPLUG_STRICT_PLUGINS=1``: a broken plugin is an error instead of a warning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from diffplug import hookspecs
from diffplug.errors import (
    AmbiguousComponentError,
    DiffplugError,
    PluginError,
    UnknownComponentError,
)

GROUP = "diffplug"
CORE_DIST = "diffplug"

#: kind -> the hook that registers it, in the order ``diffplug list`` shows them.
KINDS: dict[str, str] = {
    "scheduler": "register_schedulers",
    "denoiser": "register_denoisers",
    "conditioner": "register_conditioners",
    "autoencoder": "register_autoencoders",
    "process": "register_processes",
    "method": "register_methods",
    "transform": "register_transforms",
    "pretrained": "register_pretrained",
    "pipeline": "register_pipelines",
    "command": "register_commands",
}
#: words a user may type for a kind.
KIND_ALIASES = {
    **{k: k for k in KINDS},
    **{k + "s": k for k in KINDS},
    "sampler": "scheduler",
    "samplers": "scheduler",
    "model": "pretrained",
    "models": "pretrained",
}
#: what the first-party distributions provide, so an unknown name can say what to install.
KNOWN_PROVIDERS: dict[tuple[str, str], str] = {
    ("scheduler", "ddpm"): "diffplug-ddpm",
    ("scheduler", "ddim"): "diffplug-ddim",
    ("scheduler", "adm"): "diffplug-adm",
    ("denoiser", "unet"): "diffplug-ddpm",
    ("denoiser", "dual-unet"): "diffplug-adm",
    ("method", "ddpm"): "diffplug-ddpm",
    ("method", "adm"): "diffplug-adm",
    ("process", "decoupled"): "diffplug-adm",
    ("pretrained", "ddpm-digits"): "diffplug-ddpm",
    ("pretrained", "adm-digits"): "diffplug-adm",
    ("pipeline", "imagen"): "diffplug-imagen",
    ("autoencoder", "kl-vae"): "diffplug-vae",
    ("method", "vae"): "diffplug-vae",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[\w./-]+$")


@dataclass(frozen=True)
class Entry:
    """One registered component: a name and where to import it from."""

    kind: str
    name: str
    target: str
    dist: str
    summary: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.dist}:{self.name}"

    def load(self) -> Any:
        """Import the target (``module:attr.attr``). Import errors name the plugin."""
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            if self.kind == "pretrained":
                return _resource_path(obj, attr)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # a plugin's bug must not look like ours
            raise PluginError(
                f"plugin {self.dist}: cannot load {self.kind} {self.name!r} from "
                f"{self.target}: {type(exc).__name__}: {exc}"
            ) from exc
        problem = _interface_problem(self.kind, obj)
        if problem:
            raise PluginError(
                f"plugin {self.dist}: {self.kind} {self.name!r} ({self.target}) {problem}"
            )
        return obj

    def construct(self, *args: Any, **kwargs: Any) -> Any:
        """Load and instantiate; a failure names the plugin instead of looking like ours."""
        cls = self.load()
        try:
            return cls(*args, **kwargs)
        except DiffplugError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {self.dist}: building {self.kind} {self.name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


#: the base class (module, name) each kind's targets must subclass.
INTERFACES = {
    "scheduler": ("diffplug.components", "Scheduler"),
    "denoiser": ("diffplug.components", "Denoiser"),
    "conditioner": ("diffplug.components", "Conditioner"),
    "autoencoder": ("diffplug.components", "Autoencoder"),
    "process": ("diffplug.process", "Process"),
    "method": ("diffplug.method", "Method"),
}


def _interface_problem(kind: str, obj: Any) -> str | None:
    """Why ``obj`` cannot serve as a ``kind`` (wrong type, abstract methods left), or None."""
    if kind not in INTERFACES:
        return None
    module, name = INTERFACES[kind]
    base = getattr(importlib.import_module(module), name)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return f"is not a subclass of {module}.{name}"
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        return f"does not implement {', '.join(missing)}"
    return None


def _resource_path(module: ModuleType, relative: str) -> str:
    import importlib.resources

    path = importlib.resources.files(module).joinpath(relative)
    return os.fspath(path)  # type: ignore[call-overload]


@dataclass
class PluginInfo:
    """An installed plugin distribution and what it registered (or why it failed)."""

    name: str
    version: str
    module: str
    entries: list[Entry] = field(default_factory=list)
    error: str | None = None


class Registry:
    """All installed components, by kind and name."""

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        modules: Iterable[str | object] = (),
        blocked: Iterable[str] | None = None,
        strict: bool | None = None,
    ) -> None:
        env = os.environ
        if autoload is None:
            autoload = env.get("DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        if blocked is None:
            blocked = _split(env.get("DIFFPLUG_BLOCK_PLUGINS", ""))
        if strict is None:
            strict = env.get("DIFFPLUG_STRICT_PLUGINS", "") not in ("", "0")
        self.strict = strict
        self.blocked = {_normalize(b) for b in blocked}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._by_kind: dict[str, dict[str, list[Entry]]] = {k: {} for k in KINDS}

        self._add_module(CORE_DIST, importlib.metadata.version(CORE_DIST), "diffplug.builtin")
        if autoload:
            for ep in _entry_points():
                dist = _normalize(ep.dist.name) if ep.dist else ep.name
                if dist == CORE_DIST or dist in self.blocked:
                    continue
                version = ep.dist.version if ep.dist else "?"
                self._add_module(dist, version, ep.value)
        for mod in [*_split(env.get("DIFFPLUG_PLUGINS", "")), *modules]:
            if not isinstance(mod, str):
                name = getattr(mod, "__name__", None) or type(mod).__name__
                self._add_module(_normalize(name), "local", mod)
            elif mod not in {p.module for p in self.plugins.values()}:
                self._add_module(_normalize(mod), "local", mod)

    # -- loading -------------------------------------------------------------------------
    def _add_module(self, dist: str, version: str, module: str | object) -> None:
        mod_name = module if isinstance(module, str) else getattr(module, "__name__", dist)
        info = PluginInfo(dist, version, str(mod_name))
        self.plugins[dist] = info
        try:
            obj = importlib.import_module(module) if isinstance(module, str) else module
            self.pm.register(obj, name=dist)
            info.entries = self._collect(dist, obj)
        except Exception as exc:
            if self.pm.get_plugin(dist) is not None:
                self.pm.unregister(name=dist)
            info.error = f"{type(exc).__name__}: {exc}"
            message = f"plugin {dist} failed to load: {info.error}"
            if self.strict:
                raise PluginError(message) from exc
            print(
                f"diffplug: warning: {message} (other plugins are unaffected; "
                f"set DIFFPLUG_BLOCK_PLUGINS={dist} to silence)",
                file=sys.stderr,
            )
            return
        for entry in info.entries:
            self._by_kind[entry.kind].setdefault(entry.name, []).append(entry)

    def _collect(self, dist: str, plugin: object) -> list[Entry]:
        """Call each hook of one plugin; all its registrations stand or fall together."""
        collected: list[Entry] = []
        seen: set[tuple[str, str]] = set()
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin is not plugin:
                    continue

                def register(
                    name: str, target: str, summary: str = "", *, _kind: str = kind
                ) -> None:
                    _check_registration(dist, _kind, name, target, summary)
                    if (_kind, name) in seen:
                        raise PluginError(f"registers {_kind} {name!r} twice")
                    seen.add((_kind, name))
                    collected.append(Entry(_kind, name, target, dist, summary))

                impl.function(register)
        return collected

    # -- lookup --------------------------------------------------------------------------
    def entries(self, kind: str) -> list[Entry]:
        kind = resolve_kind(kind)
        return [e for es in self._by_kind[kind].values() for e in es]

    def names(self, kind: str) -> list[str]:
        """Every name of a kind, bare where unique, qualified where shared."""
        kind = resolve_kind(kind)
        out: list[str] = []
        for name, es in sorted(self._by_kind[kind].items()):
            out.extend([name] if len(es) == 1 else [e.qualified for e in es])
        return out

    def get(self, kind: str, name: str) -> Entry:
        """The entry for a bare or qualified name, or a clear error listing what exists."""
        kind = resolve_kind(kind)
        dist, sep, bare = name.rpartition(":")
        candidates = self._by_kind[kind].get(bare if sep else name, [])
        if sep:
            candidates = [e for e in candidates if e.dist == _normalize(dist)]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            both = ", ".join(e.qualified for e in candidates)
            raise AmbiguousComponentError(
                f"{_label(kind)} {name!r} is registered by several plugins ({both}); "
                "use a qualified name"
            )
        raise UnknownComponentError(self._unknown_message(kind, bare if sep else name))

    def load(self, kind: str, name: str) -> Any:
        return self.get(kind, name).load()

    def _unknown_message(self, kind: str, name: str) -> str:
        installed = ", ".join(self.names(kind)) or "none"
        msg = f"unknown {_label(kind)} {name!r}; installed: {installed}."
        provider = KNOWN_PROVIDERS.get((kind, name))
        if provider:
            msg += f" It is provided by {provider}: pip install {provider}"
            broken = self.plugins.get(provider)
            if broken and broken.error:
                msg = msg.replace("pip install", "which is installed but failed to load") + (
                    f" ({broken.error})"
                )
        failed = [p for p in self.errors() if p.name != provider]
        if failed:
            msg += " Plugins that failed to load: " + "; ".join(
                f"{p.name} ({p.error})" for p in failed
            )
        return msg

    def errors(self) -> Iterator[PluginInfo]:
        return (p for p in self.plugins.values() if p.error)


def resolve_kind(kind: str) -> str:
    try:
        return KIND_ALIASES[kind]
    except KeyError:
        raise UnknownComponentError(
            f"unknown kind {kind!r}; choose from: {', '.join(KINDS)}"
        ) from None


def _label(kind: str) -> str:
    return "sampler" if kind == "scheduler" else kind


def _check_registration(
    dist: str, kind: str, name: object, target: object, summary: object
) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"invalid {kind} name {name!r} (lower-case letters, digits, '-', '_', '.')"
        )
    if not isinstance(target, str) or not _TARGET.match(target):
        raise PluginError(f"{kind} {name!r}: target must be 'package.module:attr', got {target!r}")
    if not isinstance(summary, str):
        raise PluginError(f"{kind} {name!r}: summary must be a string")


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=GROUP)
    unique = {(_normalize(ep.dist.name) if ep.dist else ep.name, ep.value): ep for ep in eps}
    return sorted(unique.values(), key=lambda ep: _normalize(ep.dist.name) if ep.dist else "")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
