"""Any diffusers scheduler as a diffplug sampler: ``--sampler diffusers --scheduler-class X``.

diffusers schedulers are stateful objects whose ``step(model_output, t, x)`` is not the
loop's linear form, so the plan subclasses ``Plan`` with ``linear = False``: ``begin`` makes
a stepper holding a fresh diffusers scheduler for every batch (and sweep variant, and
replay), so multistep history never leaks from one batch into the next; its ``update`` turns
the pair (x0_hat, eps_hat) into the model output the scheduler expects for its
``prediction_type`` (eps_hat, x0_hat or v) and steps.

The scheduler is built on the model's own VP process (betas, T, zero-SNR rescaling); the
plan is read off it once per run by a dry run on a 1-element sample: its timesteps, the
input scaling ``scale_model_input`` applies (1 for DDPM-family schedulers; 1/sqrt(1 + s^2)
for the sigma-space k-diffusion ones, Euler, Heun, LMS, KDPM2, which the sampler's model view
applies: ``model_view``), and the steps at which it draws noise. Noise comes from the loop's
per-sample streams: as ``variance_noise`` where ``step`` takes it, else returned by the
scheduler module's ``randn_tensor`` (patched for the duration of the step), so samples
depend on their seeds only, whatever the batch.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from diffplug import (
    VP,
    IncompatibleError,
    ModelView,
    OptionError,
    Plan,
    PluginError,
    Process,
    Scheduler,
    UserError,
    option,
)

#: scheduler options that come from the model's process, never from the user.
PROCESS_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "rescale_betas_zero_snr",
)
#: step() arguments the plan itself supplies.
STEP_OWN = (
    "self",
    "model_output",
    "timestep",
    "sample",
    "return_dict",
    "generator",
    "variance_noise",
)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DEFAULT_CLASS = "DDIMScheduler"


@dataclass
class DiffusersSchedulerConfig:
    scheduler_class: str = option(
        DEFAULT_CLASS,
        "a diffusers scheduler class, e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler",
    )
    scheduler_options: str = option(
        "",
        'JSON object of the class\'s config options (e.g. {"solver_order": 3}) and step() '
        'options (e.g. {"eta": 0.5}); betas and T come from the model',
    )


def _diffusers() -> Any:
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:  # pragma: no cover - a dependency of this plugin
        raise UserError(
            f"diffplug-diffusers needs diffusers: pip install diffusers ({exc})"
        ) from None


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``, or a UserError naming the usable ones."""
    diffusers = _diffusers()
    cls = None
    if name.isidentifier() and name.endswith("Scheduler"):
        with contextlib.suppress(Exception):  # a dummy object for a missing extra raises
            cls = getattr(diffusers, name)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise OptionError(
            f"sampler diffusers: --scheduler-class {name!r} is not a diffusers scheduler class; "
            f"some that run diffplug's VP models: {', '.join(supported_examples())}"
        )
    return cls


def supported_examples() -> list[str]:
    return [
        "DDIMScheduler",
        "DDPMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
    ]


def class_problem(cls: type) -> str | None:
    """Why a scheduler class cannot run a diffplug VP model (None if it can)."""
    init = inspect.signature(cls.__init__).parameters
    if "beta_schedule" not in init or "num_train_timesteps" not in init:
        return (
            "it takes no DDPM beta schedule (a flow-matching, EDM, VE or other non-VP "
            "scheduler), so it cannot run a model of diffplug's VP process"
        )
    if "prediction_type" not in init:
        return "it has no prediction_type (it does not step eps/x0/v predictions)"
    step = inspect.signature(cls.step).parameters
    needed = [
        p
        for p, v in step.items()
        if v.default is inspect.Parameter.empty
        and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
        and p not in STEP_OWN
    ]
    if needed:
        return f"its step() needs {', '.join(needed)}, which a sampling loop does not have"
    if cls.__name__.endswith("InverseScheduler"):
        return "it inverts (noises) images instead of sampling them"
    return None


def parse_options(cls: type, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--scheduler-options`` JSON split into (constructor options, step() options)."""
    if not text.strip():
        return {}, {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"sampler diffusers: --scheduler-options is not JSON ({exc})") from None
    if not isinstance(options, dict):
        raise OptionError("sampler diffusers: --scheduler-options must be a JSON object")
    init_params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    step_params = set(inspect.signature(cls.step).parameters) - set(STEP_OWN)
    owned = [k for k in options if k in PROCESS_KEYS]
    if owned:
        raise OptionError(
            f"sampler diffusers: --scheduler-options {', '.join(owned)}: the betas and T come "
            "from the model's process (its checkpoint), so that scheduler and model agree"
        )
    unknown = [k for k in options if k not in init_params and k not in step_params]
    if unknown:
        have = sorted((init_params | step_params) - set(PROCESS_KEYS))
        raise OptionError(
            f"sampler diffusers: {cls.__name__} has no option {', '.join(unknown)}; its "
            f"options: {', '.join(have)}"
        )
    init = {k: v for k, v in options.items() if k in init_params}
    step = {k: v for k, v in options.items() if k not in init_params}
    return init, step


def process_options(process: VP) -> dict[str, Any]:
    """diffusers' names for the VP process's betas."""
    cfg = process.config
    schedule = "squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule
    out = {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
    }
    if cfg.rescale_zero_terminal_snr:
        out["rescale_betas_zero_snr"] = True
    return out


@contextlib.contextmanager
def _noise_from(module: Any, noise: Any) -> Iterator[list[int]]:
    """Make ``module.randn_tensor`` return ``noise`` (a tensor, or a function of the shape)
    while the block runs; yields a list that counts the calls."""
    calls: list[int] = []
    saved = getattr(module, "randn_tensor", None)
    if saved is None:
        yield calls
        return

    def draw(
        shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
    ) -> torch.Tensor:
        calls.append(1)
        value = noise(tuple(shape)) if callable(noise) else noise
        if tuple(value.shape) != tuple(shape):
            raise PluginError(
                f"diffusers scheduler in {module.__name__} drew noise of shape {tuple(shape)}; "
                f"diffplug supplies per-sample noise of the sample's shape {tuple(value.shape)}"
            )
        return value.to(device=device or value.device, dtype=dtype or value.dtype)

    module.randn_tensor = draw
    try:
        yield calls
    finally:
        module.randn_tensor = saved


@dataclass
class DiffusersPlan(Plan):
    """A plan whose step is a diffusers scheduler's ``step``."""

    scheduler_cls: Any = None
    scheduler_config: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)
    steps: int = 0
    prediction_type: str = "epsilon"
    #: alpha, sigma of the scheduler's VP process at each step (v is formed with them).
    vp_alpha: list[float] = field(default_factory=list)
    vp_sigma: list[float] = field(default_factory=list)
    takes_variance_noise: bool = False

    linear = False

    def fresh_scheduler(self, device: torch.device | None = None) -> Any:
        """A new scheduler with its timesteps set: one per batch (they keep history)."""
        sched = self.scheduler_cls(**self.scheduler_config)
        kwargs = {}
        if device is not None and "device" in inspect.signature(sched.set_timesteps).parameters:
            kwargs["device"] = device
        try:
            sched.set_timesteps(self.steps, **kwargs)
        except Exception as exc:  # diffusers refuses the step count (e.g. more than T)
            raise UserError(f"{self.scheduler_cls.__name__}: {exc}") from None
        return sched

    #: the input scale ``scale_model_input`` applies at each step (sigma-space schedulers)
    input_scale: list[float] | None = None

    def begin(self, x: torch.Tensor) -> _Stepper:
        return _Stepper(self, self.fresh_scheduler(x.device))


@dataclass
class _Stepper:
    """One batch's diffusers scheduler, with the history its ``step`` keeps."""

    plan: DiffusersPlan
    scheduler: Any

    def __post_init__(self) -> None:
        self.module = sys.modules[type(self.scheduler).__module__]  # where randn_tensor lives

    def update(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor:
        plan, sched = self.plan, self.scheduler
        if plan.prediction_type == "epsilon":
            out = eps
        elif plan.prediction_type == "sample":
            out = x0
        else:  # v of the scheduler's VP parametrisation
            out = eps * plan.vp_alpha[i] - x0 * plan.vp_sigma[i]
        kwargs = dict(plan.step_kwargs)
        if z is not None and plan.takes_variance_noise:
            kwargs["variance_noise"] = z
        if hasattr(sched, "is_scale_input_called"):
            sched.is_scale_input_called = True  # the loop scaled x through the model view
        noise = z if z is not None else x.new_zeros  # unused noise some steps draw: zeros
        with _noise_from(self.module, noise):
            return sched.step(out, sched.timesteps[i], x, return_dict=False, **kwargs)[0]


@dataclass
class _Survey:
    timesteps: list[float]
    scale: list[float]
    noisy: list[bool]
    init_noise_sigma: float
    sigma_tables: list[list[float]]


def survey(sched: Any, step_kwargs: dict[str, Any]) -> _Survey:
    """Dry-run a scheduler (timesteps already set) on one element: each step's time, the
    input scale ``scale_model_input`` applies, and whether the step's noise reaches x."""
    module = sys.modules[type(sched).__module__]
    timesteps = [float(t) for t in sched.timesteps]
    init = float(sched.init_noise_sigma)
    tables = [
        getattr(sched, name).double().flatten().tolist()
        for name in ("sigmas", "sigmas_interpol")
        if isinstance(getattr(sched, name, None), torch.Tensor)
    ]
    scale, noisy = [], []
    rng = torch.random.get_rng_state()
    nan = torch.full((1, 1, 1, 1), math.nan)
    for t in sched.timesteps:
        scaled = sched.scale_model_input(torch.ones((1, 1, 1, 1), dtype=torch.float64), t)
        scale.append(float(scaled.flatten()[0]))
        with _noise_from(module, nan) as calls:
            try:
                out = sched.step(
                    torch.zeros((1, 1, 1, 1)),
                    t,
                    torch.ones((1, 1, 1, 1)),
                    return_dict=False,
                    **step_kwargs,
                )[0]
            except Exception as exc:  # a bad step() option, or diffusers' own limits
                raise UserError(f"{type(sched).__name__}.step: {exc}") from None
        noisy.append(bool(calls) and not bool(torch.isfinite(out).all()))
    if not torch.equal(rng, torch.random.get_rng_state()):
        raise IncompatibleError(
            f"{type(sched).__name__} draws noise from torch's global generator, which diffplug "
            "cannot seed per sample"
        )
    return _Survey(timesteps, scale, noisy, init, tables)


def _sigma_for(k: float, tables: list[list[float]]) -> float | None:
    """The scheduler sigma s with 1/sqrt(1 + s^2) = k (its input scale), from its own tables
    (exact), or None if no sigma it holds gives that scale."""
    if not 0 < k < 1:
        return None
    measured = math.sqrt(1 / (k * k) - 1)
    candidates = [s for table in tables for s in table if s > 0 and math.isfinite(s)]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: abs(s - measured))
    return best if abs(1 / math.sqrt(1 + best * best) - k) <= 1e-6 * k else None


class DiffusersScheduler(Scheduler):
    """A diffusers scheduler class driving any diffplug model of the VP (DDPM) process."""

    Config = DiffusersSchedulerConfig
    default_steps = 50

    def __init__(self, config: DiffusersSchedulerConfig | None = None) -> None:
        super().__init__(config)
        cls = scheduler_class(self.config.scheduler_class)
        problem = class_problem(cls)
        if problem:
            raise OptionError(f"sampler diffusers: {cls.__name__} is not supported: {problem}")
        self.cls = cls
        self.init_options, self.step_options = parse_options(cls, self.config.scheduler_options)
        if "clip_sample" in inspect.signature(cls.__init__).parameters:
            # diffplug samplers clip only when asked: a latent model's x0 is not in [-1, 1]
            # (DDIM's default clipping wrecks adm-latent-digits: FD 9x the floor)
            self.init_options.setdefault("clip_sample", False)
        try:  # options diffusers itself refuses are refused now, not at the first step
            probe = cls(**self.init_options)
        except Exception as exc:
            raise OptionError(
                f"sampler diffusers: {cls.__name__}({self.init_options}): {exc}"
            ) from None
        prediction = probe.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise OptionError(
                f"sampler diffusers: prediction_type {prediction!r} is not one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        if str(probe.config.get("variance_type", "")).startswith("learned"):
            raise OptionError(
                "sampler diffusers: variance_type learned/learned_range needs a model that "
                "outputs its variance; diffplug denoisers output one prediction"
            )
        self.prediction_type = prediction

    def supports(self, process: Process) -> str | None:
        if not isinstance(process, VP):
            return (
                f"diffusers schedulers run the discrete VP (DDPM) process; the model was trained "
                f"on {process.name!r}"
            )
        params = inspect.signature(self.cls.__init__).parameters
        if process.config.rescale_zero_terminal_snr and "rescale_betas_zero_snr" not in params:
            return f"{self.cls.__name__} cannot rescale betas to zero terminal SNR"
        return None

    def native_process(self) -> Process | None:
        return VP()  # a model of another process is bridged to DDPM's default VP

    def model_view(self, plan: Plan, model_process: Process) -> ModelView | None:
        """A sigma-space plan (x = x0 + s*eps) calls the VP model it was made on at the
        scheduler's own timesteps on ``scale_model_input``'s x*k: alpha = k, sigma = k*s
        there. Any other model is core's to bridge."""
        if not isinstance(plan, DiffusersPlan) or plan.input_scale is None:
            return None
        if self.supports(model_process) is not None:
            return None  # planned on the native process: core bridges from the plan's SNRs
        k = plan.input_scale
        sigma = [a * v for a, v in zip(k, plan.sigma, strict=True)]
        return ModelView(plan.t.clone(), list(k), list(k), sigma, {})

    def make(self, process: VP) -> tuple[Any, dict[str, Any]]:
        """A diffusers scheduler of this class on ``process`` with the user's options, and
        the config it was built from."""
        params = inspect.signature(self.cls.__init__).parameters
        own = {k: v for k, v in process_options(process).items() if k in params}
        config = {**self.init_options, **own}
        try:
            sched = self.cls(**config)
        except Exception as exc:
            raise UserError(f"{self.cls.__name__}({config}): {exc}") from None
        table = getattr(sched, "alphas_cumprod", None)
        if isinstance(table, torch.Tensor) and not torch.equal(
            table.to(torch.float32).cpu(), process.alphas_cumprod
        ):
            raise IncompatibleError(
                f"{self.cls.__name__} built on the model's process ({own}) does not reproduce "
                "its betas, so its steps would not match the model"
            )
        return sched, config

    def plan(self, process: Process, steps: int) -> Plan:
        reason = self.supports(process)
        if reason:
            raise IncompatibleError(f"sampler diffusers: {reason}")
        assert isinstance(process, VP)
        sched, config = self.make(process)
        try:
            sched.set_timesteps(steps)
        except Exception as exc:  # diffusers refuses the step count (e.g. more than T)
            raise UserError(f"{self.cls.__name__}: {steps} steps: {exc}") from None
        s = survey(sched, self.step_options)
        n = len(s.timesteps)
        if n == 0:
            raise UserError(f"{self.cls.__name__} planned no steps for {steps}")
        if s.timesteps[-1] > s.timesteps[0]:  # (second-order ones may repeat or jitter)
            raise IncompatibleError(
                f"{self.cls.__name__}: its timesteps run from data to noise; it does not sample"
            )
        t = torch.tensor(s.timesteps, dtype=torch.float64)
        zeros = [0.0] * n
        common = dict(
            t=t,
            a=zeros,
            b=list(zeros),
            c=list(zeros),
            d=[1.0 if v else 0.0 for v in s.noisy],
            init_scale=s.init_noise_sigma,
            scheduler_cls=self.cls,
            scheduler_config=config,
            step_kwargs=dict(self.step_options),
            steps=steps,
            prediction_type=self.prediction_type,
            takes_variance_noise="variance_noise" in inspect.signature(self.cls.step).parameters,
            info={
                "timesteps": [int(v) if v.is_integer() else v for v in s.timesteps],
                "scheduler_class": self.cls.__name__,
                "scheduler_options": {**self.init_options, **self.step_options},
            },
        )
        if all(k == 1.0 for k in s.scale) and s.init_noise_sigma == 1.0:
            # DDPM-family: x is the VP sample; the model is called at the scheduler's times
            alpha, sigma = process.alpha_sigma(t)
            return DiffusersPlan(
                alpha=alpha.tolist(),
                sigma=sigma.tolist(),
                vp_alpha=alpha.tolist(),
                vp_sigma=sigma.tolist(),
                **common,
            )
        # sigma space (k-diffusion): x = x0 + s*eps; the model sees x/sqrt(1 + s^2)
        sig = []
        for i, k in enumerate(s.scale):
            found = _sigma_for(k, s.sigma_tables)
            if found is None:
                raise IncompatibleError(
                    f"{self.cls.__name__}: its input scaling at step {i} ({k:.6g}) is not the "
                    "VP one, 1/sqrt(1 + sigma^2) of a sigma it holds"
                )
            sig.append(found)
        # the scale exactly as diffusers forms it (1/fl32(sqrt(s^2 + 1))), which x*k rounds
        # like its x/sqrt(s^2 + 1) more often than the exact 1/sqrt(1 + s^2) would
        k = list(s.scale)
        return DiffusersPlan(
            alpha=[1.0] * n,
            sigma=sig,
            input_scale=k,
            vp_alpha=list(k),
            vp_sigma=[a * v for a, v in zip(k, sig, strict=True)],
            **common,
        )
