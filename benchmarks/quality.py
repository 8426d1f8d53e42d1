"""Quality against the number of network evaluations, for every installed sampler.

1. The exact Gaussian-mixture oracle (8 Gaussians on a circle, variance 0.02): the Frechet
   distance between the samples' Gaussian moments and the true mixture's (closed form; the
   sampling-noise floor is the same statistic for exact draws), and for deterministic samplers
   the trajectory error against the same sampler at 1000 steps from the same noise.
2. The shipped digits models: digits FD (the in-repo evaluator) and its real-vs-real floor.

Each sampler runs on the oracle expressed in its own process (VP for DDPM/DDIM/DPM-Solver,
decoupled for ADM: the same mixture) and on the shipped model it can sample.
"""

from __future__ import annotations

import torch

import diffplug
from benchmarks.common import ROOT, machine, table, write_section
from diffplug.errors import IncompatibleError
from diffplug.evaluate import evaluate
from diffplug.registry import default_registry
from diffplug.sampling import sample
from diffplug.testing import circle_mixture
from diffplug.testing.mixture import mixture_for

STEPS = [5, 10, 20, 50, 100, 1000]
DIGIT_STEPS = [5, 10, 20, 50, 100]
ORACLE_N, DIGITS_N = 4096, 1000
SAMPLERS = [
    ("ddpm", {}),
    ("ddim", {"eta": 0.0}),
    ("ddim", {"eta": 1.0}),
    ("dpmpp-2m", {}),
    ("adm", {}),
    ("adm", {"deterministic": True}),
]
HEAD_TO_HEAD = [5, 10, 20]


def gaussian_fd(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    x = x.reshape(len(x), -1).double()
    m, c = x.mean(0), torch.cov(x.T)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root @ c @ root).clamp(min=0).sqrt().sum()
    return float((m - mean).pow(2).sum() + torch.trace(c) + torch.trace(cov) - 2 * cross)


def label(name: str, options: dict) -> str:
    return name + "".join(f" {k}" if v is True else f" {k}={v:g}" for k, v in options.items())


def run() -> str:
    registry = default_registry()
    installed = set(registry.names("scheduler"))
    samplers = [(n, o) for n, o in SAMPLERS if n in installed]
    samplers += [(n, {}) for n in sorted(installed) if n not in {s for s, _ in SAMPLERS}]
    reference_oracle = circle_mixture()
    mean, cov = reference_oracle.data_mean(), reference_oracle.data_covariance()
    seeds = range(ORACLE_N)
    exact = reference_oracle.sample_data(ORACLE_N, torch.Generator().manual_seed(1))
    floor = gaussian_fd(exact, mean, cov)
    oracle_rows, curves = [], {}
    for name, options in samplers:
        scheduler = registry.load("scheduler", name).from_options(**options)
        oracle = mixture_for(scheduler)
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

    digit_rows, digit_curves, digit_floor, models = [], {}, None, {}
    for name, options in samplers:
        try:  # each step count is one run: resolved, planned and folded once
            runs = [diffplug.load(sampler=name, steps=n, **options) for n in DIGIT_STEPS]
        except IncompatibleError:
            continue  # no shipped model for this sampler's process
        if runs[0].model_name == "gmm-digits":
            continue  # the oracle is not a trained model
        models[label(name, options)] = model_name = runs[0].model_name
        values = []
        for run in runs:
            report = evaluate(run.draw(range(DIGITS_N), batch_size=250))
            values.append(report["digits_fd"])
            digit_floor = report["floor"]
        digit_curves[label(name, options)] = values
        digit_rows.append([label(name, options), model_name] + [f"{v:.1f}" for v in values])

    head = _head_to_head(curves, digit_curves)

    _plot(curves, digit_curves, floor, digit_floor)
    return f"""## Quality against network evaluations

One network evaluation per step for every sampler here. {machine()}.

**Exact oracle** (8 Gaussians on a circle in 4-D, variance 0.02, {ORACLE_N} samples, each
sampler's default grid; VP samplers on linear betas, ADM on its decoupled process). "moment FD" is the Frechet distance between the
samples' mean and covariance and the exact mixture's (exact draws give {floor:.4f}: the
sampling-noise floor); "trajectory error" (deterministic samplers) is the mean L2 distance to
the same sampler at 1000 steps from the same initial noise.

{table(["sampler", "metric", *map(str, STEPS)], oracle_rows)}

**Shipped digits models**, digits FD of {DIGITS_N} samples, seeds 0-{DIGITS_N - 1}
(real-vs-real floor at this count: {digit_floor:.1f}).

{table(["sampler", "model", *map(str, DIGIT_STEPS)], digit_rows)}

{head}

![quality against steps](quality.png)
"""


def _head_to_head(curves: dict, digit_curves: dict) -> str:
    """ADM against DDIM at the same number of network evaluations (the seed's claim)."""
    names = ["ddim eta=0", "adm deterministic", "ddim eta=1", "adm"]
    if not all(name in curves for name in names):
        return ""
    header, rows = ["sampler"], []
    for n in HEAD_TO_HEAD:
        header += [f"{n}: oracle moment FD / traj. error", f"{n}: digits FD"]
    for name in names:
        fds, errs = curves[name]
        digits = digit_curves.get(name)
        row = [name]
        for n in HEAD_TO_HEAD:
            i, j = STEPS.index(n), DIGIT_STEPS.index(n)
            row.append(f"{fds[i]:.4f}" + ("" if errs[i] is None else f" / {errs[i]:.3f}"))
            row.append("" if digits is None else f"{digits[j]:.1f}")
        rows.append(row)
    return "**ADM against DDIM at equal network evaluations** (from the tables above):\n\n" + table(
        header, rows
    )


def _plot(curves, digit_curves, floor, digit_floor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colour = {name: f"C{i}" for i, name in enumerate(curves)}  # one colour per sampler
    for name, (fds, errs) in curves.items():
        axes[0].loglog(STEPS, fds, marker="o", label=name, color=colour[name])
        if errs[0] is not None:
            axes[1].loglog(STEPS[:-1], errs[:-1], marker="o", label=name, color=colour[name])
    axes[0].axhline(floor, color="grey", ls="--", label="exact draws")
    axes[0].set(title="oracle: moment FD", xlabel="steps")
    axes[1].set(title="oracle: trajectory error vs 1000 steps", xlabel="steps")
    for name, values in digit_curves.items():
        axes[2].semilogx(DIGIT_STEPS, values, marker="o", label=name, color=colour[name])
    axes[2].axhline(digit_floor, color="grey", ls="--", label="real-vs-real floor")
    axes[2].set(title="shipped digits models: digits FD", xlabel="steps")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "quality.png", dpi=90)


if __name__ == "__main__":
    write_section("quality", run())
