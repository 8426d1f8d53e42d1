"""Helpers for plugin authors' tests: isolated registries and contract checkers.

from diffplug.testing import fresh_registry, check_sampler

def test_my_sampler():
    registry = fresh_registry(my_plugin)
    check_sampler(registry.load("scheduler", "my-sampler")(), order=2)
"""

import importlib

from diffplug.testing.contracts import (
    check_denoiser,
    check_sampler_deterministic,
    check_scheduler,
    dummy_denoiser,
)
from diffplug.testing.plugins import fresh_registry, registered

#: imported on first access
_LAZY = {
    # correctness, not only form: convergence to the exact ODE at the declared order, or
    # the exact moments for a stochastic sampler
    "check_sampler": "diffplug.testing.convergence",
    "SamplerReport": "diffplug.testing.convergence",
    # the conditioner and autoencoder contracts: shapes, the null condition, determinism,
    # batch independence; the round trip and the latent scale
    "check_conditioner": "diffplug.testing.components",
    "check_autoencoder": "diffplug.testing.components",
    "AutoencoderReport": "diffplug.testing.components",
    "smooth_images": "diffplug.testing.components",
    # an exact oracle: a Gaussian mixture whose score is known in closed form
    "GaussianMixtureDenoiser": "diffplug.oracle",
    "circle_mixture": "diffplug.oracle",
    # checking samples against that oracle
    "assert_matches_mixture": "diffplug.testing.mixture",
    "exact_draws": "diffplug.testing.mixture",
    "mean_distance": "diffplug.testing.mixture",
    "statistics": "diffplug.testing.mixture",
    # deterministic, bounded torch threading for a test's duration
    "torch_threads": "diffplug.testing.threads",
}

__all__ = [
    "check_denoiser",
    "check_sampler_deterministic",
    "check_scheduler",
    "dummy_denoiser",
    "fresh_registry",
    "registered",
    *_LAZY,
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(module), name)
