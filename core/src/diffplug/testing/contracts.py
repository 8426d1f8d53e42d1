"""Contract checkers: what every scheduler and denoiser must honour, as plain asserts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug.components import Cond, Denoiser, DenoiserConfig, Scheduler
from diffplug.prediction import ARITY, as_tuple
from diffplug.process import Process
from diffplug.vp import VP


def check_scheduler(
    scheduler: Scheduler, process: Process | None = None, steps: tuple[int, ...] = (1, 2, 10, 50)
) -> None:
    """Times never increase (a step that evaluates twice may repeat one: Heun's corrector
    and the next step's predictor share a level) and stay in the process's range; tables
    are finite."""
    process = process or VP()
    lo, hi = process.t_range
    span = hi - lo
    for n in steps:
        plan = scheduler.plan(process, n)
        t = plan.t.tolist()
        assert len(plan) >= 1, f"{n} steps gave an empty plan"
        assert all(a >= b for a, b in zip(t, t[1:], strict=False)), f"times increase: {t}"
        assert t[0] > t[-1] or len(t) == 1, f"the plan never moves: {t}"
        slack = 1e-9 * max(1.0, span)
        assert all(lo - slack <= v <= hi + slack for v in t), f"times {t} outside [{lo}, {hi}]"
        for name in ("alpha", "sigma", "a", "b", "c", "d"):
            values = getattr(plan, name)
            assert all(math.isfinite(v) for v in values), f"{name} not finite for {n} steps"
        assert all(0 <= a <= 1 + 1e-9 for a in plan.alpha), "alpha outside [0, 1]"
        assert all(s > 0 for s in plan.sigma), "sigma must be > 0 where the denoiser is called"


@dataclass
class _DummyConfig(DenoiserConfig):
    pass


class _Dummy(Denoiser):
    """A cheap, deterministic, non-trivial eps-predictor: 0.5*x*(1 + t/T)."""

    Config = _DummyConfig
    batch_invariant = True  # elementwise

    def __init__(self, config: _DummyConfig | None = None) -> None:
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        hi = max(self.process.t_range[1], 1e-9)
        return self.scale * x * (1 + t.view(-1, 1, 1, 1) / hi)


def dummy_denoiser(process: dict | None = None, channels: int = 1, size: int = 4) -> Denoiser:
    """A tiny stand-in denoiser for determinism and shape tests."""
    return _Dummy(_DummyConfig(channels=channels, size=size, process=process or {"name": "vp"}))


def check_sampler_deterministic(
    scheduler: Scheduler, denoiser: Denoiser | None = None, steps: int = 5
) -> None:
    """Same seeds give bitwise-equal samples, in any batch size; other seeds differ."""
    from diffplug.sampling import sample

    denoiser = denoiser or dummy_denoiser()
    seeds = [3, 1, 4, 1, 5, 9, 2]
    full = sample(denoiser, scheduler, steps=steps, seeds=seeds)
    again = sample(denoiser, scheduler, steps=steps, seeds=seeds, batch_size=3)
    single = sample(denoiser, scheduler, steps=steps, seeds=seeds[:1])
    assert torch.equal(full, again), "batch size changed the samples"
    assert torch.equal(full[:1], single), "a sample differs when drawn alone"
    assert torch.equal(full[1], full[3]), "equal seeds gave different samples"
    assert not torch.equal(full[0], full[1]), "different seeds gave equal samples"
    assert torch.isfinite(full).all(), "non-finite samples"


def check_denoiser(denoiser: Denoiser, batch: int = 2, cond: Cond = None) -> None:
    """Output shape matches the input, and the tuple arity matches the declared prediction."""
    c, h, w = denoiser.sample_shape
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    lo, hi = denoiser.process.t_range
    t = torch.linspace(lo, hi, batch)
    with torch.no_grad():
        out = as_tuple(denoiser(x, t, cond))
    arity = ARITY[denoiser.prediction]
    assert len(out) == arity, f"declares {denoiser.prediction!r} ({arity}) but returned {len(out)}"
    for o in out:
        assert o.shape == x.shape, f"output shape {tuple(o.shape)} != input {tuple(x.shape)}"
        assert torch.isfinite(o).all(), "non-finite output"
