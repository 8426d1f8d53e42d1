"""Helpers for plugin authors' tests: isolated registries and contract checkers.

from diffplug.testing import fresh_registry, check_scheduler

def test_my_sampler():
    registry = fresh_registry(my_plugin)
    check_scheduler(registry.load("scheduler", "my-sampler")())
"""

from diffplug.testing.contracts import (
    check_denoiser,
    check_sampler_deterministic,
    check_scheduler,
    dummy_denoiser,
)
from diffplug.testing.plugins import fresh_registry, registered

__all__ = [
    "check_denoiser",
    "check_sampler_deterministic",
    "check_scheduler",
    "dummy_denoiser",
    "fresh_registry",
    "registered",
    "GaussianMixtureDenoiser",
    "circle_mixture",
]


def __getattr__(name: str) -> object:
    if name in ("GaussianMixtureDenoiser", "circle_mixture"):
        from diffplug import oracle

        return getattr(oracle, name)
    raise AttributeError(name)
