"""The plugin registry: entry points in the group ``diffplug``, loaded with pluggy.

Every plugin is loaded and asked to register in isolation: one that fails to import or
registers something invalid is recorded with its error and contributes nothing, while every
other plugin keeps working. Names resolve bare (``ddim``) or qualified (``some-plugin:ddim``);
a bare name two plugins share is an error naming both, never silent last-wins. A hook whose
name no hookspec declares (a misspelt ``register_sampler``) would be ignored silently by
pluggy: it is reported as a warning on the plugin, with the closest real hook name. Core
names no plugin: an unknown name's hint comes from what the registry saw while loading.

Environment switches (in the spirit of pytest's):
- ``DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points but core's own;
- ``DIFFPLUG_PLUGINS=mod1,mod2``: load these modules as plugins (works with autoload off);
- ``DIFFPLUG_BLOCK_PLUGINS=dist1,dist2``: skip these distributions;
- ``DIFFPLUG_STRICT_PLUGINS=1``: a broken plugin is an error instead of a warning.
"""

from __future__ import annotations

import difflib
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
    "schedule": "register_schedules",
    "denoiser": "register_denoisers",
    "conditioner": "register_conditioners",
    "autoencoder": "register_autoencoders",
    "process": "register_processes",
    "method": "register_methods",
    "transform": "register_transforms",
    "pretrained": "register_pretrained",
    "pipeline": "register_pipelines",
    "dataset": "register_datasets",
    "feature": "register_features",
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
        except (Exception, SystemExit) as exc:  # a plugin's bug must not look like ours
            raise PluginError(
                f"plugin {self.dist}: cannot load {self.kind} {self.name!r} from "
                f"{self.target}: {_describe(exc)}"
            ) from exc
        problem = _interface_problem(self.kind, obj)
        if problem:
            raise PluginError(
                f"plugin {self.dist}: {self.kind} {self.name!r} ({self.target}) {problem}"
            )
        return obj

    def construct(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        """Instantiate (``cls``: the target ``load`` already returned, so it is not resolved
        twice); a failure names the plugin instead of looking like ours."""
        cls = cls if cls is not None else self.load()
        try:
            return cls(*args, **kwargs)
        except DiffplugError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in a plugin must not end the command
            raise PluginError(
                f"plugin {self.dist}: building {self.kind} {self.name!r} failed: {_describe(exc)}"
            ) from exc


#: the base class (module, name) each kind's targets must subclass.
INTERFACES = {
    "scheduler": ("diffplug.components", "Scheduler"),
    "schedule": ("diffplug.components", "Schedule"),
    "denoiser": ("diffplug.components", "Denoiser"),
    "conditioner": ("diffplug.components", "Conditioner"),
    "autoencoder": ("diffplug.components", "Autoencoder"),
    "process": ("diffplug.process", "Process"),
    "method": ("diffplug.method", "Method"),
    "dataset": ("diffplug.datasets", "ImageDataset"),
    "feature": ("diffplug.features", "FeatureSpace"),
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
    #: problems that leave the plugin working but likely not as meant (a misspelt hook)
    warnings: list[str] = field(default_factory=list)


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
        #: installed distributions skipped because ``blocked`` names them
        self.skipped: list[str] = []
        self._by_kind: dict[str, dict[str, list[Entry]]] = {k: {} for k in KINDS}
        self._loaded: dict[Entry, Any] = {}

        self._add_module(CORE_DIST, importlib.metadata.version(CORE_DIST), "diffplug.builtin")
        if autoload:
            for ep in _entry_points():
                dist = _normalize(ep.dist.name) if ep.dist else ep.name
                if dist == CORE_DIST:
                    continue
                if dist in self.blocked:
                    self.skipped.append(dist)
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
            info.warnings = self._unknown_hooks(obj)
            info.entries = self._collect(dist, obj)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: one plugin's exit() must not end us
            self._fail(info, exc)
            return
        for warning in info.warnings:
            self._warn(dist, warning)
        for entry in info.entries:
            self._by_kind[entry.kind].setdefault(entry.name, []).append(entry)

    def _fail(self, info: PluginInfo, exc: BaseException) -> None:
        """Record why a plugin failed and drop it (strict: raise), leaving the others be."""
        dist = info.name
        if self.pm.get_plugin(dist) is not None:
            self.pm.unregister(name=dist)
        info.error = _describe(exc)
        message = f"plugin {dist} failed to load: {info.error}"
        if self.strict:
            raise PluginError(message) from exc
        print(
            f"diffplug: warning: {message} (other plugins are unaffected; "
            f"set DIFFPLUG_BLOCK_PLUGINS={dist} to silence)",
            file=sys.stderr,
        )

    def _warn(self, dist: str, warning: str) -> None:
        """One stderr line for a plugin that loaded with a problem (strict: an error)."""
        message = f"plugin {dist} {warning}"
        if self.strict:
            raise PluginError(message)
        print(f"diffplug: warning: {message}", file=sys.stderr)

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hooks ``plugin`` implements that no hookspec declares: pluggy would never call
        them and say nothing, so a misspelt name would look like a plugin with no components."""
        known = self._hook_names()
        out = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            mine = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            if caller.has_spec() or all(i.optionalhook for i in mine):
                continue
            out.append(
                f"implements {caller.name}, which is not a diffplug hook "
                f"({_suggest(caller.name, known)}); it is never called"
            )
        return out

    def _hook_names(self) -> list[str]:
        """The hooks diffplug declares (as the plugin manager knows them)."""
        callers = vars(self.pm.hook).items()
        return sorted(n for n, c in callers if isinstance(c, pluggy.HookCaller) and c.has_spec())

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

    def sharing(self, kind: str, name: str) -> list[Entry]:
        """Every entry registered under the bare ``name`` (more than one: plugins collide on
        it, and only ``plugin:name`` picks one)."""
        return list(self._by_kind[resolve_kind(kind)].get(name, []))

    def load(self, kind: str, name: str) -> Any:
        """The component ``name`` registers, imported once per registry (every checkpoint
        of a run builds its process through here)."""
        entry = self.get(kind, name)
        if entry not in self._loaded:
            self._loaded[entry] = entry.load()
        return self._loaded[entry]

    def _unknown_message(self, kind: str, name: str) -> str:
        """One line: what is installed, and why the name may be missing, from what loading
        saw (failed, blocked or misspelt plugins); else where to look."""
        installed = ", ".join(self.names(kind)) or "none"
        msg = f"unknown {_label(kind)} {name!r}; installed: {installed}."
        hints = self.missing_hints(kind)
        if hints:
            return f"{msg} {'. '.join(hints)}"
        return f"{msg} No installed plugin registers it; `diffplug plugins` lists what is installed"

    def missing_hints(self, kind: str | None = None) -> list[str]:
        """Plugins that may have meant to provide a ``kind`` (any kind: None) but do not:
        failed to load, misspelt its hook, or blocked."""
        hooks = [KINDS[kind]] if kind else list(KINDS.values())
        hints = []
        failed = list(self.errors())
        if failed:
            hints.append(
                "Plugins that failed to load: " + "; ".join(f"{p.name} ({p.error})" for p in failed)
            )
        misspelt = [p.name for p in self.plugins.values() if _meant_any(p.warnings, hooks)]
        if misspelt:
            names = ", ".join(misspelt)
            hints.append(f"Plugins with a misspelt hook: {names} (see `diffplug plugins`)")
        if self.skipped:
            hints.append(f"Blocked by DIFFPLUG_BLOCK_PLUGINS: {', '.join(self.skipped)}")
        return hints

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


def _describe(exc: BaseException) -> str:
    """An exception as one line; a plugin's sys.exit() says so, as its bare code would not."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: {exc.code!r} (the plugin called sys.exit)"
    return f"{type(exc).__name__}: {exc}"


def _meant_any(warnings: list[str], hooks: list[str]) -> bool:
    """Whether a plugin's warnings suggest one of ``hooks`` (its misspelling meant it)."""
    return any(f"did you mean {hook}?" in w for w in warnings for hook in hooks)


def _suggest(hook: str, known: list[str]) -> str:
    """The real hook a misspelt one most likely meant: by the kind word it ends in
    (``register_sampler`` -> samplers), else by spelling."""
    word = hook.removeprefix("register_")
    kind = KIND_ALIASES.get(word) or KIND_ALIASES.get(word.rstrip("s"))
    if kind is not None and KINDS[kind] in known:
        return f"did you mean {KINDS[kind]}?"
    close = difflib.get_close_matches(hook, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "hooks: " + ", ".join(known)


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
