"""Quality against the number of network evaluations, for every installed sampler.

1. The exact Gaussian-mixture oracle (8 Gaussians on a circle, variance 0.02): the Frechet
   distance between the samples' Gaussian moments and the true mixture's (closed form; the
   sampling-noise floor is the same statistic for exact draws), and for deterministic samplers
   the trajectory error against the same sampler at 1000 steps from the same noise.
2. The shipped digits models: digits FD (the in-repo evaluator) and its real-vs-real floor.
3. The sampler x schedule grid: every sampler that walks noise levels under the normal, karras
   and exponential schedules (ddim and ddpm on their own timesteps) at 5, 10, 20 and 50
   network evaluations (a two-call sampler gets the most steps whose calls fit the budget):
   the oracle's moment FD, the trajectory error against the exact probability-flow ODE
   (``diffplug.testing``'s reference, the one ``check_sampler`` uses) for deterministic
   samplers, and ddpm-digits' digits FD at 10 and 20 evaluations, with DDIM at 50 steps as
   the reference line. A cell that raises is recorded as an error, not a crash.

Sections 1-2 run the fixed list ``SAMPLERS`` (each in its own process: VP for DDPM/DDIM/
DPM-Solver, decoupled for ADM, the same mixture); section 3 writes docs/samplers.md and
docs/img/samplers-quality.png besides its part of docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import torch

import diffplug
from benchmarks.common import ROOT, machine, table, write_section
from diffplug.bridge import planning_process
from diffplug.errors import IncompatibleError
from diffplug.evaluate import evaluate
from diffplug.registry import default_registry
from diffplug.sampling import sample
from diffplug.testing import circle_mixture
from diffplug.testing.convergence import exact_solution
from diffplug.testing.mixture import mean_distance, mixture_for

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
#: runs on the DDPM model (it would default to adm-digits): DPM-Solver++(2M) beside DDIM
FIXED_MODELS = {"dpmpp-2m": "ddpm-digits"}

# -- the sampler x schedule grid ------------------------------------------------------------
BUDGETS = [5, 10, 20, 50]  # network evaluations
DIGIT_BUDGETS = [10, 20]
SCHEDULES = ["normal", "karras", "exponential"]
OWN_TIMESTEPS = ["ddim", "ddpm"]  # walk their own timesteps, not the schedule grid
GRID_MODEL, GRID_DIGITS_N, REFERENCE_STEPS = "ddpm-digits", 512, 50
OTHER_SEEDS = DIGITS_N - GRID_DIGITS_N  # DDIM's second seed set starts here
TRAJECTORY_N = 1024  # the first samples, against the exact ODE (its RK4 is the slow part)
FOCUS = 10  # the budget the page ranks
PAGE = ROOT / "docs" / "samplers.md"
FIGURE = ROOT / "docs" / "img" / "samplers-quality.png"
F64 = torch.float64


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
    start, cpu = time.perf_counter(), time.process_time()
    fixed = _fixed_section()
    rows, lines = _grid()
    lines.minutes = (time.perf_counter() - start) / 60
    lines.cpu_minutes = (time.process_time() - cpu) / 60
    _grid_plot(rows, lines)
    PAGE.write_text(_page(rows, lines))
    _report_errors(rows)
    return fixed + "\n\n" + _grid_section(rows, lines)


# -- sections 1 and 2: the fixed samplers at 5-1000 steps -----------------------------------
def _fixed_section() -> str:
    installed = set(default_registry().names("scheduler"))
    samplers = [(n, o) for n, o in SAMPLERS if n in installed]
    reference_oracle = circle_mixture()
    exact = reference_oracle.sample_data(ORACLE_N, torch.Generator().manual_seed(1))
    floor = gaussian_fd(exact, reference_oracle.data_mean(), reference_oracle.data_covariance())
    curves = {label(n, o): _steps_curve(n, o, reference_oracle) for n, o in samplers}
    oracle_rows = []
    for name, (fds, errs) in curves.items():
        oracle_rows.append([name, "moment FD"] + [f"{v:.4f}" for v in fds])
        if errs[0] is not None:
            oracle_rows.append([name, "trajectory error"] + [f"{v:.4f}" for v in errs])
    digit_rows, digit_curves, digit_floor = _digit_rows(samplers)
    head = _head_to_head(curves, digit_curves)
    _plot(curves, digit_curves, floor, digit_floor)
    return f"""## Quality against network evaluations

One network evaluation per step for every sampler in the first two tables. {machine()}.

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


def _steps_curve(name: str, options: dict, reference_oracle) -> tuple[list, list]:  # noqa: ANN001
    """Moment FD and (deterministic) trajectory error against 1000 steps, by STEPS."""
    mean, cov = reference_oracle.data_mean(), reference_oracle.data_covariance()
    scheduler = default_registry().load("scheduler", name).from_options(**options)
    oracle, seeds = mixture_for(scheduler), range(ORACLE_N)
    reference = sample(oracle, scheduler, steps=1000, seeds=seeds)
    deterministic = all(d == 0 for d in scheduler.plan(oracle.process, 10).d[:-1])
    fds, errs = [], []
    for n in STEPS:
        x = reference if n == 1000 else sample(oracle, scheduler, steps=n, seeds=seeds)
        fds.append(gaussian_fd(x, mean, cov))
        errs.append(mean_distance(x, reference) if deterministic else None)
    print(f"  {label(name, options)}: oracle done", file=sys.stderr, flush=True)
    return fds, errs


def _digit_rows(samplers: list) -> tuple[list, dict, float | None]:
    rows, curves, floor = [], {}, None
    for name, options in samplers:
        try:  # the model this sampler runs by default, unless FIXED_MODELS names one
            model = FIXED_MODELS.get(name)
            model = diffplug.load(sampler=name, model=model, steps=5, **options).model_name
        except IncompatibleError:
            continue  # no shipped model for this sampler's process
        if model == "gmm-digits":
            continue  # the oracle is not a trained model
        scores = [_digits(name, options, n, model=model) for n in DIGIT_STEPS]
        curves[label(name, options)] = values = [fd for fd, _ in scores]
        floor = scores[-1][1]
        rows.append([label(name, options), model] + [f"{v:.1f}" for v in values])
    return rows, curves, floor


_DRAWS: dict[tuple, torch.Tensor] = {}


def _digits(name: str, options: dict, steps: int, *, schedule: str | None = None,
            model: str | None = None, n: int = DIGITS_N, first: int = 0
            ) -> tuple[float, float]:  # fmt: skip
    """(digits FD, floor) of ``n`` samples, seeds first..first+n-1. Sample k depends on seed k
    alone (on the CPU, in any batch), so a run drawn before for more seeds is sliced."""
    run = diffplug.load(sampler=name, model=model, steps=steps, schedule=schedule, **options)
    config = repr(dataclasses.asdict(run.scheduler.config))  # eta=0 given or by default
    key = (name, config, schedule, steps, run.model_name)
    if key not in _DRAWS or len(_DRAWS[key]) < first + n:
        _DRAWS[key] = run.draw(range(first + n), batch_size=250)
    report = evaluate(_DRAWS[key][first : first + n])
    return report["digits_fd"], report["floor"]


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


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(curves, digit_curves, floor, digit_floor) -> None:
    fig, axes = _pyplot().subplots(1, 3, figsize=(15, 4.2))
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


# -- section 3: the sampler x schedule grid at equal network evaluations --------------------
@dataclass
class Cell:
    """One sampler + schedule at one budget: what was measured, or why it failed."""

    evals: int | None = None
    fd: float | None = None
    traj: float | None = None
    digits: float | None = None
    error: str | None = None  # the oracle run's (then no digits run either)
    digits_error: str | None = None


@dataclass
class Row:
    sampler: str
    schedule: str
    order: float | None = None
    per_step: int | None = None
    stochastic: bool | None = None
    cells: dict[int, Cell] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.schedule in SCHEDULES:
            return f"{self.sampler} + {self.schedule}"
        return f"{self.sampler} ({self.schedule})"

    @property
    def phrase(self) -> str:
        if self.schedule in SCHEDULES:
            return f"`{self.sampler}` with the `{self.schedule}` schedule"
        return f"`{self.sampler}` on its {self.schedule}"


@dataclass
class Lines:
    """The grid's reference lines: DDIM at REFERENCE_STEPS (on the grid's seeds and on the
    last GRID_DIGITS_N of DIGITS_N seeds: how much the seeds alone move it), the digits and
    oracle floors, and the run time."""

    reference: float
    other_seeds: float
    floor: float
    oracle_floor: float
    minutes: float = 0.0
    cpu_minutes: float = 0.0


def _grid() -> tuple[list[Row], Lines]:
    registry, oracle = default_registry(), circle_mixture(process={"name": "vp"})
    rows = [_row(registry, oracle, name, schedule) for name, schedule in _combos(registry)]
    ddim = ("ddim", {"eta": 0.0}, REFERENCE_STEPS)
    reference, floor = _digits(*ddim, model=GRID_MODEL, n=GRID_DIGITS_N)
    other, _ = _digits(*ddim, model=GRID_MODEL, n=GRID_DIGITS_N, first=OTHER_SEEDS)
    exact = oracle.sample_data(ORACLE_N, torch.Generator().manual_seed(1))
    oracle_floor = gaussian_fd(exact, oracle.data_mean(), oracle.data_covariance())
    return rows, Lines(reference, other, floor, oracle_floor)


def _combos(registry) -> list[tuple[str, str | None]]:  # noqa: ANN001
    """ddim and ddpm on their own timesteps, then every noise-level sampler x SCHEDULES (a
    sampler that does not load is one row of errors)."""
    names = registry.names("scheduler")
    combos: list[tuple[str, str | None]] = [(n, None) for n in OWN_TIMESTEPS if n in names]
    for name in sorted(set(names) - set(OWN_TIMESTEPS)):
        try:
            walks = registry.load("scheduler", name).walks_noise_levels
        except Exception:  # noqa: BLE001 - recorded in its row
            combos.append((name, None))
            continue
        combos += [(name, s) for s in SCHEDULES] if walks else []
    return combos


def _row(registry, oracle, name: str, schedule: str | None) -> Row:  # noqa: ANN001
    row = Row(name, schedule or ("own timesteps" if name in OWN_TIMESTEPS else "-"))
    try:
        scheduler = registry.load("scheduler", name)()
        if schedule is not None:
            scheduler.schedule = registry.load("schedule", schedule)()
    except Exception as exc:  # noqa: BLE001 - an error row, not a crash
        row.cells = {b: Cell(error=_why(exc)) for b in BUDGETS}
        return row
    row.order, row.per_step = scheduler.order, scheduler.evaluations_per_step
    for budget in BUDGETS:
        row.cells[budget] = _cell(scheduler, oracle, row, budget, schedule)
    print(f"  {row.name}: {_progress(row)}", file=sys.stderr, flush=True)
    return row


def _cell(scheduler, oracle, row: Row, budget: int, schedule: str | None) -> Cell:  # noqa: ANN001
    cell = Cell()
    try:
        steps, cell.evals, row.stochastic = _fit(scheduler, oracle, budget)
        x = sample(oracle, scheduler, steps=steps, seeds=range(ORACLE_N), dtype=F64,
                   batch_size=ORACLE_N)  # fmt: skip
        cell.fd = gaussian_fd(x, oracle.data_mean(), oracle.data_covariance())
        if not row.stochastic:
            cell.traj = mean_distance(x[:TRAJECTORY_N], _exact(oracle, scheduler, steps))
    except Exception as exc:  # noqa: BLE001 - an error cell, not a crash
        cell.error = _why(exc)
        return cell
    if budget in DIGIT_BUDGETS:
        try:
            cell.digits = _digits(row.sampler, {}, steps, schedule=schedule, model=GRID_MODEL,
                                  n=GRID_DIGITS_N)[0]  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            cell.digits_error = _why(exc)
    return cell


def _fit(scheduler, oracle, budget: int) -> tuple[int, int, bool]:  # noqa: ANN001
    """The most steps whose plan calls the denoiser at most ``budget`` times: (steps, calls,
    whether the plan draws noise)."""
    process = planning_process(scheduler, oracle.process)
    for steps in range(budget, 0, -1):
        plan = scheduler.plan(process, steps)
        if len(plan) <= budget:
            return steps, len(plan), any(plan.noisy(i) for i in range(len(plan)))
    raise ValueError(f"no step count makes at most {budget} denoiser calls")


_EXACT: dict[tuple, torch.Tensor] = {}


def _exact(oracle, scheduler, steps: int) -> torch.Tensor:  # noqa: ANN001
    """check_sampler's exact ODE solution from each sample's own start; it depends only on
    the plan's first and last levels and its start scale, so it is solved once per those."""
    plan = scheduler.plan(planning_process(scheduler, oracle.process), steps)
    ends = (plan.sigma[0] / plan.alpha[0], plan.sigma[-1] / plan.alpha[-1])
    key = tuple(float(f"{float(v):.10g}") for v in (*ends, plan.init_scale / plan.alpha[0]))
    if key not in _EXACT:
        _EXACT[key] = exact_solution(oracle, scheduler, steps, range(TRAJECTORY_N))
    return _EXACT[key]


def _why(exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [""])[0].replace("|", "/")
    return f"{type(exc).__name__}: {text[:160]}"


def _progress(row: Row) -> str:
    return ", ".join(f"{b}: " + (c.error or f"{c.fd:.4f}") for b, c in row.cells.items())


def _report_errors(rows: list[Row]) -> None:
    for row in rows:
        for budget, cell in row.cells.items():
            if cell.error or cell.digits_error:
                why = cell.error or cell.digits_error
                print(f"error: {row.name} at {budget}: {why}", file=sys.stderr)


# -- the grid's tables, page and figure -----------------------------------------------------
class Notes:
    """Error messages as numbered footnotes, one number per distinct message."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, why: str) -> str:
        return f"error ({self.numbers.setdefault(why, len(self.numbers) + 1)})"

    def text(self) -> str:
        return "\n".join(f"{k}. {why}" for why, k in self.numbers.items())


def _value(cell: Cell, attr: str, spec: str, notes: Notes) -> str:
    why = cell.error or (cell.digits_error if attr == "digits" else None)
    if why:
        return notes.mark(why)
    value = getattr(cell, attr)
    return "-" if value is None else format(value, spec)


def _grid_section(rows: list[Row], lines: Lines) -> str:
    notes = Notes()
    header = ["sampler", "schedule", "evaluations"]
    header += [f"moment FD {b}" for b in BUDGETS] + [f"traj. error {b}" for b in BUDGETS]
    header += [f"digits FD {b}" for b in DIGIT_BUDGETS]
    body = []
    for row in rows:
        cells = [row.cells[b] for b in BUDGETS]
        evals = ", ".join("-" if c.evals is None else str(c.evals) for c in cells)
        line = [row.sampler, row.schedule, evals]
        line += [_value(c, "fd", ".4f", notes) for c in cells]
        line += [_value(c, "traj", ".4f", notes) for c in cells]
        line += [_value(row.cells[b], "digits", ".2f", notes) for b in DIGIT_BUDGETS]
        body.append(line)
    return f"""### Every sampler x schedule at equal network evaluations

{_caption(lines)} [Choosing a sampler](samplers.md) ranks them.

{table(header, body)}

{notes.text()}
"""


def _caption(lines: Lines) -> str:
    return (
        f"Budgets of {', '.join(map(str, BUDGETS))} network evaluations (denoiser calls): a "
        "sampler with two calls per step gets the most steps whose calls fit (heun's last "
        "step is one Euler call: 3 steps make 5 calls); 'evaluations' lists the calls made. "
        "Oracle: the exact mixture of 8 Gaussians on a circle in 4-D (variance 0.02, VP, "
        f"linear betas), {ORACLE_N} samples in float64, seeds 0-{ORACLE_N - 1}; moment FD: the "
        "Frechet distance between the samples' mean and covariance and the mixture's (exact "
        f"draws: {lines.oracle_floor:.4f}, so values "
        "near it are ties); trajectory error (deterministic samplers) is the "
        f"mean L2 distance, over the first {TRAJECTORY_N} samples, to the exact "
        "probability-flow ODE solution from the same start (`diffplug.testing`'s reference, "
        "RK4 in log-level, the one `check_sampler` uses). "
        f"Digits: `{GRID_MODEL}`, {GRID_DIGITS_N} samples, seeds 0-{GRID_DIGITS_N - 1} "
        f"(real-vs-real floor at this count {lines.floor:.2f}; DDIM eta=0 at {REFERENCE_STEPS} "
        f"steps: {lines.reference:.2f}, and {lines.other_seeds:.2f} on seeds {OTHER_SEEDS}-"
        f"{OTHER_SEEDS + GRID_DIGITS_N - 1}, which shows how much the seeds alone move it). "
        "Schedules at their defaults (normal: the model's own timesteps, "
        f"leading spacing); ddim and ddpm on their own timesteps. {machine()}; the whole "
        f"quality benchmark took {lines.minutes:.1f} minutes ({lines.cpu_minutes:.1f} of CPU "
        "time)."
    )


def _ranked(rows: list[Row], budget: int) -> list[Row]:
    """Best digits FD first, then those with only an oracle FD, then errors."""

    def key(row: Row) -> tuple:
        cell = row.cells[budget]
        return (cell.digits is None, cell.digits or math.inf, cell.fd is None, cell.fd or 0.0)

    return sorted(rows, key=key)


def _page(rows: list[Row], lines: Lines) -> str:
    parts = [
        "# Choosing a sampler",
        "Every number on this page is measured, not quoted: `uv run python benchmarks/run.py "
        "quality` writes it (with `docs/img/samplers-quality.png` and the quality section of "
        "[Benchmarks](benchmarks.md#every-sampler-x-schedule-at-equal-network-evaluations), "
        "which has every budget's full table).",
        _verdict(rows, lines),
        "```bash\nuv run diffplug run --sampler NAME --schedule SCHEDULE --steps N -o out.png\n"
        "uv run python benchmarks/run.py quality   # regenerates this page\n```",
        f"## Every sampler at {FOCUS} network evaluations",
        _caption(lines),
        _ranking(rows),
        "## Against the number of evaluations",
        "![digits FD and oracle moment FD against network evaluations](img/samplers-quality.png)",
        _best_table(rows, lines),
        _meaning(rows),
    ]
    return "\n\n".join(parts) + "\n"


def _verdict(rows: list[Row], lines: Lines) -> str:
    ranked = [r for r in _ranked(rows, FOCUS) if r.cells[FOCUS].digits is not None]
    if not ranked:
        return f"No sampler produced a digits FD at {FOCUS} evaluations."
    best, cell = ranked[0], ranked[0].cells[FOCUS]
    gap = cell.digits - lines.reference
    side = "below" if gap <= 0 else "above"
    compare = (
        f"{abs(gap):.2f} {side} DDIM's {lines.reference:.2f} at {REFERENCE_STEPS} steps "
        f"({cell.evals} calls instead of {REFERENCE_STEPS}; DDIM-{REFERENCE_STEPS} scores "
        f"{lines.other_seeds:.2f} on another {GRID_DIGITS_N} seeds)"
    )
    oracle_best = min((r for r in rows if r.cells[FOCUS].fd is not None),
                      key=lambda r: r.cells[FOCUS].fd)  # fmt: skip
    return (
        f"**Best at {FOCUS} evaluations: {best.phrase}**, "
        f"digits FD {cell.digits:.2f} ({cell.evals} calls; real-vs-real floor {lines.floor:.2f}), "
        f"{compare}. On the exact oracle the best at {FOCUS} is `{oracle_best.name}` (moment FD "
        f"{oracle_best.cells[FOCUS].fd:.4f})."
    )


def _ranking(rows: list[Row]) -> str:
    notes, body = Notes(), []
    for rank, row in enumerate(_ranked(rows, FOCUS), 1):
        cell = row.cells[FOCUS]
        body.append([rank, f"`{row.sampler}`", row.schedule,
                     "-" if cell.evals is None else cell.evals,
                     _value(cell, "digits", ".2f", notes), _value(cell, "fd", ".4f", notes),
                     _value(cell, "traj", ".4f", notes), _kind(row)])  # fmt: skip
    header = ["rank", "sampler", "schedule", "calls", "digits FD", "oracle moment FD",
              "trajectory error", "order, calls/step, noise"]  # fmt: skip
    return table(header, body) + ("\n\n" + notes.text() if notes.numbers else "")


def _kind(row: Row) -> str:
    if row.per_step is None:
        return "-"
    order = "-" if row.order is None else f"{row.order:g}"
    noise = {True: "stochastic", False: "deterministic", None: "-"}[row.stochastic]
    return f"{order}, {row.per_step}, {noise}"


def _best_table(rows: list[Row], lines: Lines) -> str:
    body = []
    for budget in BUDGETS:
        fd = [r for r in rows if r.cells[budget].fd is not None]
        best = min(fd, key=lambda r: r.cells[budget].fd) if fd else None
        digits = [r for r in rows if r.cells[budget].digits is not None]
        top = min(digits, key=lambda r: r.cells[budget].digits) if digits else None
        oracle = "-" if best is None else f"`{best.name}` ({best.cells[budget].fd:.4f})"
        digits = "not measured" if top is None else f"`{top.name}` ({top.cells[budget].digits:.2f})"
        body.append([budget, oracle, digits])
    intro = (
        "The best at each budget (the dashed line of the figure; oracle values near the "
        f"exact draws' {lines.oracle_floor:.4f} are ties):\n\n"
    )
    return intro + table(["evaluations", "best oracle moment FD", "best digits FD"], body)


def _meaning(rows: list[Row]) -> str:
    two = ", ".join(f"`{n}`" for n in sorted({r.sampler for r in rows if r.per_step == 2}))
    stochastic = ", ".join(f"`{n}`" for n in sorted({r.sampler for r in rows if r.stochastic}))
    return f"""## What order, stochastic and evaluations per step mean for you

- **Network evaluations** are what a sample costs: one call of the model each. A sampler's
  **evaluations per step** (`diffplug info NAME`: "N denoiser call(s) per step") says how
  many calls one `--steps` buys. Two per step here: {two or "none"}. Compare samplers at equal evaluations, not equal steps: give a two-call sampler
  about half the steps (heun's last step is a single call, so `--steps 5` makes 9 calls).
- **Order** is how fast a deterministic sampler's error against the exact ODE falls with
  more steps: halving the step size divides it by about 2 to the power order once the steps
  are fine enough (`check_sampler` checks the declared order on the oracle). The trajectory
  error columns show at which budget a higher order pays off on the oracle.
- **Stochastic** samplers draw fresh noise at every step ({stochastic or "none"} here, and ddim with `--eta` above 0): the path from a seed is not
  the ODE's, so they have no trajectory error and are judged by the moment FD and the
  digits FD alone.
- **The schedule** chooses the noise levels visited (`--schedule`, `diffplug list
  schedules`): `normal` is the model's own timesteps (leading spacing), `karras` is evenly
  spaced in level to the power 1/7, `exponential` evenly spaced in log level.
"""


def _grid_plot(rows: list[Row], lines: Lines) -> None:
    """Oracle moment FD and digits FD against evaluations: the five best at FOCUS, ddim,
    ddpm, and the best of all at each budget."""
    shown = [r for r in _ranked(rows, FOCUS) if r.cells[FOCUS].digits is not None][:5]
    shown += [r for r in rows if r.sampler in OWN_TIMESTEPS and r not in shown]
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 4.5))
    for k, row in enumerate(shown):
        for ax, attr, budgets in ((axes[0], "fd", BUDGETS), (axes[1], "digits", DIGIT_BUDGETS)):
            points = [(row.cells[b].evals, getattr(row.cells[b], attr)) for b in budgets]
            points = [p for p in points if p[1] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{k}", label=row.name)
    for ax, attr, budgets in ((axes[0], "fd", BUDGETS), (axes[1], "digits", DIGIT_BUDGETS)):
        best = [(b, min(v)) for b in budgets
                if (v := [getattr(r.cells[b], attr) for r in rows
                          if getattr(r.cells[b], attr) is not None])]  # fmt: skip
        if best:
            ax.plot(*zip(*best, strict=True), "k--", marker="x", label="best at each budget")
    axes[0].axhline(lines.oracle_floor, color="grey", ls=":", label="exact draws")
    axes[1].axhline(lines.reference, color="grey", ls="-.", label=f"ddim, {REFERENCE_STEPS} steps")
    axes[1].axhline(lines.floor, color="grey", ls=":", label="real-vs-real floor")
    axes[0].set(xscale="log", yscale="log", title="exact oracle: moment FD")
    axes[1].set(xscale="log", title=f"{GRID_MODEL}: digits FD ({GRID_DIGITS_N} samples)")
    for ax in axes:
        ax.set(xlabel="network evaluations", xticks=BUDGETS, xticklabels=[str(b) for b in BUDGETS])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)


if __name__ == "__main__":
    write_section("quality", run())
