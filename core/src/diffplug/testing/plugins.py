"""Registries for tests: no entry points, just the plugins a test names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from diffplug import registry as _registry
from diffplug.registry import Registry


def fresh_registry(*plugins: object, strict: bool = True) -> Registry:
    """A registry with core and ``plugins`` only (modules, module names or hook objects)."""
    return Registry(autoload=False, modules=plugins, blocked=(), strict=strict)


@contextlib.contextmanager
def registered(*plugins: object, autoload: bool = True) -> Iterator[Registry]:
    """Make ``plugins`` part of the default registry for the duration of a ``with`` block."""
    previous = _registry._default
    _registry._default = Registry(autoload=autoload, modules=plugins, blocked=(), strict=True)
    try:
        yield _registry._default
    finally:
        _registry._default = previous
