"""Sampling-loop overhead: diffplug's loop vs a hand-written DDIM loop vs diffusers' loop.

"Zero-cost" denoiser: returns a tensor it already holds, so the time per step is the loop's
own work (schedule bookkeeping plus the update arithmetic). Then the same with the shipped
digits UNet, where the denoiser dominates. Same shapes, same coefficients, one process,
medians of 7 runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from benchmarks.common import machine, median_time, table, write_section
from diffplug.components import Denoiser, DenoiserConfig
from diffplug.sampling import sample
from diffplug_ddim.scheduler import DDIM

STEPS = 50
SHAPES = [(64, 1, 8, 8), (16, 3, 32, 32)]


@dataclass
class _Cfg(DenoiserConfig):
    pass


class ZeroCost(Denoiser):
    """Returns a preallocated prediction: costs nothing but a Python call."""

    Config = _Cfg

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(_Cfg(channels=shape[1], size=shape[2]))
        self.out = torch.randn(shape) * 0.1

    def forward(self, x, t, cond=None):
        return self.out[: x.shape[0]]  # a view: no work, the shape of the call


def hand_written(model, shape, steps=STEPS):
    """The loop one writes by hand: coefficients precomputed, four tensor ops per step."""
    plan = DDIM().plan(model.process, steps)
    coefs = [
        (1 / a, s, b, c) for a, s, b, c in zip(plan.alpha, plan.sigma, plan.b, plan.c, strict=True)
    ]
    ts = plan.t.float()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for i, (inv_a, s, b, c) in enumerate(coefs):
            eps = model(x, ts[i].expand(shape[0]))
            x0 = (x - s * eps) * inv_a
            x = b * x0 + c * eps
    return x


def diffusers_loop(model, shape, steps=STEPS):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for t in sched.timesteps:
            eps = model(x, t.expand(shape[0]).float())
            x = sched.step(eps, t, x).prev_sample
    return x


def ours(model, shape, steps=STEPS):
    """The default: on the CPU the denoiser is called on chunks of 64 rows (the last padded),
    which makes sample k the same at any batch size and thread count."""
    return sample(model, DDIM(), steps=steps, seeds=range(shape[0]), check_finite=True)


def ours_whole(model, shape, steps=STEPS):
    return sample(model, DDIM(), steps=steps, seeds=range(shape[0]), chunk=0)


def ours_nocheck(model, shape, steps=STEPS):
    return sample(model, DDIM(), steps=steps, seeds=range(shape[0]), check_finite=False,
                  chunk=0)  # fmt: skip


def per_step_us(loops, model, shape, steps=STEPS, rounds=7) -> dict:
    """{loop name: (us per step, total seconds)}. The loops take turns, round after round,
    so a slow patch of the machine hits all of them alike rather than one."""
    totals: dict[str, list[float]] = {name: [] for name, _ in loops}
    empties: dict[str, list[float]] = {name: [] for name, _ in loops}
    for _ in range(rounds):
        for name, fn in loops:
            totals[name].append(median_time(lambda fn=fn: fn(model, shape, steps), repeats=1))
            # start-up (plan, noise) of a one-step run
            empties[name].append(median_time(lambda fn=fn: fn(model, shape, 1), repeats=1))
    out = {}
    for name, _ in loops:
        total, empty = statistics.median(totals[name]), statistics.median(empties[name])
        out[name] = ((total - empty) / (steps - 1) * 1e6, total)
    return out


def run() -> str:
    torch.manual_seed(0)
    rows = []
    loops = [("hand-written", hand_written), ("diffplug (chunks of 64)", ours),
             ("diffplug, whole batches", ours_whole),
             ("diffplug, whole batches, no NaN check", ours_nocheck),
             ("diffusers DDIMScheduler", diffusers_loop)]  # fmt: skip
    from diffplug.registry import default_registry
    from diffplug.resolve import load_model

    unet, _ = load_model(default_registry(), "ddpm-digits")
    unet.eval()  # every loop runs the network as sampling does (no dropout)
    cases = [(f"zero-cost {'x'.join(map(str, s))}", ZeroCost(s), s) for s in SHAPES]
    cases += [(f"digits UNet {b}x1x8x8", unet, (b, 1, 8, 8)) for b in (8, 64)]
    results = {}
    for label, model, shape in cases:
        base = None
        timings = per_step_us(loops, model, shape)
        for name, _ in loops:
            us, total = timings[name]
            base = base or us
            results[(label, name)] = us
            rows.append([label, name, f"{us:.1f}", f"{us / base:.2f}", f"{total * 1e3:.1f}"])
    zc = [f"zero-cost {'x'.join(map(str, s))}" for s in SHAPES]
    verdicts = []
    for label in zc:
        over = results[(label, "diffplug, whole batches")] / results[(label, "hand-written")]
        vs = (
            results[(label, "diffusers DDIMScheduler")]
            / results[(label, "diffplug, whole batches")]
        )
        verdicts.append(
            f"- {label}: diffplug (whole batches)/hand-written = {over:.2f} (target <= 1.5); "
            f"diffusers/diffplug = {vs:.1f} (target >= 5)"
        )
    for b in (8, 64):
        label = f"digits UNet {b}x1x8x8"
        cost = (
            results[(label, "diffplug (chunks of 64)")]
            / results[(label, "diffplug, whole batches")]
        )
        verdicts.append(f"- {label}: the batch-invariant chunks cost {cost:.2f}x whole batches")
    return f"""## Sampling-loop overhead

DDIM, {STEPS} steps; per-step time = (time of {STEPS} steps - time of 1 step) / {STEPS - 1},
medians of 7 rounds in which the loops take turns (each timing loops the run for at least
50 ms), one process; {machine()}. "ratio" is against the hand-written loop of
the same row group. diffplug's numbers include its on-by-default NaN/Inf check unless the row
says otherwise. On the CPU diffplug calls the denoiser on chunks of 64 rows by default (the
last padded), so that sample k is bitwise the same at any batch size and thread count; the
"whole batches" rows (`chunk=0`, the default on GPUs) show what that costs.

{table(["denoiser / batch", "loop", "us per step", "ratio", "total ms"], rows)}

{chr(10).join(verdicts)}
"""


if __name__ == "__main__":
    write_section("loop", run())
