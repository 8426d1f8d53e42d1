"""Quality against the number of network evaluations, for every installed sampler.

1. The exact Gaussian-mixture oracle (8 Gaussians on a circle, variance 0.02): the Frechet
   distance between the samples' Gaussian moments and the true mixture's (closed form; the
   sampling-noise floor is the same statistic for exact draws), and for deterministic samplers
   the trajectory error against the same sampler at 1000 steps from the same noise.
2. The shipped digits model: digits FD (the in-repo evaluator) and its real-vs-real floor.
"""

from __future__ import annotations

import torch

from benchmarks.common import ROOT, machine, table, write_section
from diffplug.evaluate import evaluate
from diffplug.registry import default_registry
from diffplug.resolve import load_model
from diffplug.sampling import sample
from diffplug.testing import circle_mixture

STEPS = [5, 10, 20, 50, 100, 1000]
DIGIT_STEPS = [5, 10, 20, 50, 100]
ORACLE_N, DIGITS_N = 4096, 500
SAMPLERS = [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("dpmpp-2m", {})]


def gaussian_fd(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    x = x.reshape(len(x), -1).double()
    m, c = x.mean(0), torch.cov(x.T)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root @ c @ root).clamp(min=0).sqrt().sum()
    return float((m - mean).pow(2).sum() + torch.trace(c) + torch.trace(cov) - 2 * cross)


def label(name: str, options: dict) -> str:
    return name + "".join(f" {k}={v:g}" for k, v in options.items())


def run() -> str:
    registry = default_registry()
    installed = set(registry.names("scheduler"))
    samplers = [(n, o) for n, o in SAMPLERS if n in installed]
    samplers += [(n, {}) for n in sorted(installed) if n not in {s for s, _ in SAMPLERS}]
    oracle = circle_mixture()
    mean, cov = oracle.data_mean(), oracle.data_covariance()
    seeds = range(ORACLE_N)
    floor = gaussian_fd(oracle.sample_data(ORACLE_N, torch.Generator().manual_seed(1)), mean, cov)
    oracle_rows, curves = [], {}
    for name, options in samplers:
        scheduler = registry.load("scheduler", name).from_options(**options)
        reference = sample(oracle, scheduler, steps=1000, seeds=seeds)
        deterministic = all(d == 0 for d in scheduler.plan(oracle.process, 10).d[:-1])
        fds, errs = [], []
        for n in STEPS:
            x = reference if n == 1000 else sample(oracle, scheduler, steps=n, seeds=seeds)
            fds.append(gaussian_fd(x, mean, cov))
            errs.append(
                (x - reference).flatten(1).norm(dim=1).mean().item() if deterministic else None
            )
        curves[label(name, options)] = (fds, errs)
        oracle_rows.append([label(name, options), "moment FD"] + [f"{v:.4f}" for v in fds])
        if deterministic:
            oracle_rows.append(
                [label(name, options), "trajectory error"] + [f"{v:.4f}" for v in errs]
            )

    model, _ = load_model(registry, "ddpm-digits")
    digit_rows, digit_curves, digit_floor = [], {}, None
    for name, options in samplers:
        scheduler = registry.load("scheduler", name).from_options(**options)
        values = []
        for n in DIGIT_STEPS:
            report = evaluate(
                sample(model, scheduler, steps=n, seeds=range(DIGITS_N), batch_size=250)
            )
            values.append(report["digits_fd"])
            digit_floor = report["floor"]
        digit_curves[label(name, options)] = values
        digit_rows.append([label(name, options)] + [f"{v:.1f}" for v in values])

    _plot(curves, digit_curves, floor, digit_floor)
    return f"""## Quality against network evaluations

One network evaluation per step for every sampler here. {machine()}.

**Exact oracle** (8 Gaussians on a circle in 4-D, variance 0.02, {ORACLE_N} samples, VP linear
betas, each sampler's default spacing). "moment FD" is the Frechet distance between the
samples' mean and covariance and the exact mixture's (exact draws give {floor:.4f}: the
sampling-noise floor); "trajectory error" (deterministic samplers) is the mean L2 distance to
the same sampler at 1000 steps from the same initial noise.

{table(["sampler", "metric", *map(str, STEPS)], oracle_rows)}

**Shipped digits model** (`ddpm-digits`), digits FD of {DIGITS_N} samples (real-vs-real floor at
this count: {digit_floor:.1f}).

{table(["sampler", *map(str, DIGIT_STEPS)], digit_rows)}

![quality against steps](quality.png)
"""


def _plot(curves, digit_curves, floor, digit_floor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (fds, errs) in curves.items():
        axes[0].loglog(STEPS, fds, marker="o", label=name)
        if errs[0] is not None:
            axes[1].loglog(STEPS[:-1], errs[:-1], marker="o", label=name)
    axes[0].axhline(floor, color="grey", ls="--", label="exact draws")
    axes[0].set(title="oracle: moment FD", xlabel="steps")
    axes[1].set(title="oracle: trajectory error vs 1000 steps", xlabel="steps")
    for name, values in digit_curves.items():
        axes[2].semilogx(DIGIT_STEPS, values, marker="o", label=name)
    axes[2].axhline(digit_floor, color="grey", ls="--", label="real-vs-real floor")
    axes[2].set(title="ddpm-digits: digits FD", xlabel="steps")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "quality.png", dpi=90)


if __name__ == "__main__":
    write_section("quality", run())
