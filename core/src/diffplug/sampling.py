"""The one sampling loop: any scheduler x denoiser x conditioner x autoencoder.

Work per run (schedules, conversion coefficients, time tensors) is done before the first
step; a step is the denoiser call plus two or three fused tensor ops with host-side float
coefficients, so the loop never syncs with the device and never re-derives a schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from diffplug.bridge import ModelView, model_view, planning_process
from diffplug.components import Autoencoder, Cond, Conditioner, Denoiser, Scheduler
from diffplug.errors import IncompatibleError, NonFiniteError, PluginError, UserError
from diffplug.init_image import Init
from diffplug.inpaint import Region, mask_condition, region
from diffplug.latent import check_autoencoder, is_pixel_space
from diffplug.noise import NoiseSource
from diffplug.plan import MAX_STEPS, Plan, kept_steps
from diffplug.prediction import Linear, as_tuple, linear
from diffplug.process import Process

Transform = Callable[[torch.Tensor], torch.Tensor]
#: rows per denoiser call on the CPU: fixed, so samples do not depend on the batch size.
#: 64 is the CLI's default batch, so the usual run pays nothing (chunks of 16 cost 2.1x there:
#: four calls' overhead on a small UNet); smaller batches are padded to it
DEFAULT_CHUNK = 64
#: the most rows per call ``chunk`` may ask for: beyond any batch a CPU holds, the padding
#: alone would exhaust memory
MAX_CHUNK = 65_536
#: above this many parameters padding a small batch to a chunk costs too much on a CPU: such
#: models run on whole batches unless ``chunk`` is given
CHUNK_MAX_PARAMETERS = 50_000_000


@dataclass
class Step:
    """What a per-step callback sees (for previews and logging)."""

    index: int
    steps: int
    t: float
    x: torch.Tensor
    x0: torch.Tensor
    seeds: Sequence[int]


@dataclass
class _Tables:
    """A plan folded with the prediction conversion: host floats, computed once."""

    x0_x: list[float]
    x0_p: list[tuple[float, ...]]
    eps_x: list[float]
    eps_p: list[tuple[float, ...]]
    # fused: x_next = fx*x + sum_j fp[j]*pred[j] (+ d*z)
    fx: list[float]
    fp: list[tuple[float, ...]]


def fold(plan: Plan, prediction: str, view: ModelView | None = None) -> _Tables:
    """Fold the prediction -> (x0, eps) maps into the plan's update coefficients."""
    x0_x, x0_p, eps_x, eps_p, fx, fp = [], [], [], [], [], []
    for i in range(len(plan)):
        if view is None:
            lin = linear(prediction, plan.alpha[i], plan.sigma[i])
        else:  # a model of another process or parametrisation (``diffplug.bridge``)
            lin = _viewed(plan, view, i, prediction)
        a, b, c = plan.a[i], plan.b[i], plan.c[i]
        x0_x.append(lin.x0_x)
        x0_p.append(lin.x0_p)
        eps_x.append(lin.eps_x)
        eps_p.append(lin.eps_p)
        fx.append(a + _mul(b, lin.x0_x) + _mul(c, lin.eps_x))
        fp.append(tuple(_mul(b, p) + _mul(c, q) for p, q in zip(lin.x0_p, lin.eps_p, strict=True)))
    return _Tables(x0_x, x0_p, eps_x, eps_p, fx, fp)


def _viewed(plan: Plan, view: ModelView, i: int, prediction: str) -> Linear:
    """The conversion at step i through a model view, still linear in (x, prediction): the
    model's answer in its own process (input scaled by k), re-expressed as
    v = alpha*eps - sigma*x0 of the plan's process and read back from v. Going through v
    keeps the pair consistent with x (a two-headed model's heads may disagree slightly, and
    a deterministic sampler would accumulate that) and is well-conditioned at alpha = 0."""
    k = view.scale[i]
    own = linear(prediction, view.alpha[i], view.sigma[i])
    a, s = plan.alpha[i], plan.sigma[i]
    n = a * a + s * s
    v_x = a * own.eps_x * k - s * own.x0_x * k
    v_p = tuple(a * e - s * x for x, e in zip(own.x0_p, own.eps_p, strict=True))
    x0_p = tuple(-s * v / n for v in v_p)
    eps_p = tuple(a * v / n for v in v_p)
    return Linear((a - s * v_x) / n, x0_p, (s + a * v_x) / n, eps_p)


def _mul(coef: float, value: float) -> float:
    """coef*value with 0*inf = 0: a term the update does not use cannot poison it."""
    return 0.0 if coef == 0.0 else coef * value


def _combine(xc: float, x: torch.Tensor, coefs: tuple[float, ...], preds: tuple) -> torch.Tensor:
    out = x * xc
    for coef, p in zip(coefs, preds, strict=True):
        if coef != 0.0:
            out.add_(p, alpha=coef)
    return out


def check_compatible(
    denoiser: Denoiser,
    scheduler: Scheduler,
    conditioner: Conditioner | None = None,
    autoencoder: Autoencoder | None = None,
) -> None:
    """Refuse, before the first step, components that cannot run together: the sampler must
    plan on the model's process (or bridge to it), the conditioner give the conditioning kind
    the model takes, and the space (pixels, or one autoencoder's latents) be the model's."""
    planning_process(scheduler, denoiser.process)  # the sampler's process, or a bridge to it
    check_autoencoder(denoiser, autoencoder)
    check_conditioning(denoiser, conditioner)


def check_conditioning(denoiser: Denoiser, conditioner: Conditioner | None) -> None:
    """Refuse a conditioner of another kind than the denoiser takes, or none for a
    conditional denoiser, saying what to do instead."""
    wanted = denoiser.conditioning
    given = getattr(conditioner, "kind", None)
    if wanted == given:
        return
    if given is None:
        article = "an" if wanted[0] in "aeiou" else "a"
        raise IncompatibleError(
            f"the denoiser takes {wanted} conditioning but none is given: sample it with "
            f"{article} {wanted} conditioner and its inputs (`diffplug run` uses the one the "
            "model was trained with, or --conditioner NAME)"
        )
    name = getattr(conditioner, "name", "") or type(conditioner).__name__
    if wanted is None:
        raise IncompatibleError(
            f"the denoiser is unconditional but conditioner {name!r} gives {given} "
            "conditioning: sample it without a conditioner"
        )
    raise IncompatibleError(
        f"the denoiser takes {wanted} conditioning but conditioner {name!r} gives {given}"
    )


def sample(
    denoiser: Denoiser,
    scheduler: Scheduler,
    *,
    steps: int,
    seeds: Sequence[int],
    batch_size: int | None = None,
    conditioner: Conditioner | None = None,
    conditions: Sequence[Any] | None = None,
    negatives: Sequence[Any] | None = None,
    guidance: float = 1.0,
    autoencoder: Autoencoder | None = None,
    transforms: Sequence[Transform] = (),
    callback: Callable[[Step], None] | None = None,
    progress: bool = False,
    check_finite: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    noise: Callable[[Sequence[int], tuple[int, ...], int], Any] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Draw ``len(seeds)`` samples; sample k is seeded by ``seeds[k]``.

    Returns images (N, C, H, W) in the data range (decoded when ``autoencoder`` is given).
    ``conditions`` holds one input per sample for ``conditioner``; with ``guidance != 1``
    the conditional and unconditional halves run in one batched call and are combined as
    ``uncond + guidance * (cond - uncond)``; ``negatives`` (one negative prompt per sample,
    guided only) replace the null condition of that unconditional half. ``transforms``
    (thresholding) change x0_hat at every step and eps_hat is re-derived from it,
    eps_hat = (x_t - alpha*x0_hat)/sigma, so the step stays consistent with x_t (Imagen's
    semantics; diffusers' ``use_clipped_model_output``):
    keeping the network's eps_hat next to a clipped x0_hat collapses DDIM at high guidance. A
    sampler's own transforms (its ``--clip-sample``) keep eps_hat, as its reference does.
    ``noise(seeds, shape, noisy_steps)`` may replace the per-sample generators (for tests
    against another library's noise). ``chunk`` is the number of rows per denoiser call
    (default 64 on the CPU for models up to 50M parameters, where it makes sample k bitwise
    the same at any batch size and thread count; 0: the whole batch at once, the default on
    GPUs and for larger models).

    This is ``prepare(...).draw(...)``: ``diffplug.load`` keeps the prepared loop of a run
    and draws from it as often as asked.
    """
    loop = prepare(denoiser, scheduler, steps=steps, conditioner=conditioner,
                   guidance=guidance, autoencoder=autoencoder, transforms=transforms,
                   device=device, dtype=dtype, chunk=chunk)  # fmt: skip
    return loop.draw(seeds, conditions, negatives=negatives, batch_size=batch_size,
                     callback=callback, progress=progress, check_finite=check_finite,
                     noise=noise)  # fmt: skip


def prepare(
    denoiser: Denoiser,
    scheduler: Scheduler,
    *,
    steps: int,
    conditioner: Conditioner | None = None,
    guidance: float = 1.0,
    autoencoder: Autoencoder | None = None,
    transforms: Sequence[Transform] = (),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
    shape: Sequence[int] | None = None,
) -> Loop:
    """Everything done once per run, before any step: the compatibility check, the plan,
    the model view (bridge), the folded tables, the model's times and one preflight call.
    ``shape`` samples another (C, H, W) than the model's own (its latents, for a latent
    model); one call at that shape first refuses a denoiser that cannot run it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= MAX_STEPS:
        raise UserError(f"steps must be a whole number from 1 to {MAX_STEPS}; got {steps!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or not 0 <= chunk <= MAX_CHUNK):  # fmt: skip
        raise UserError(f"chunk must be a whole number of rows from 0 (off) to {MAX_CHUNK}; "
                        f"got {chunk!r}")  # fmt: skip
    process = planning_process(scheduler, denoiser.process)  # the model's, or bridged to it
    check_autoencoder(denoiser, autoencoder)
    check_conditioning(denoiser, conditioner)
    if device is None:
        device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    device = torch.device(device)
    plan = scheduler.plan(process, steps)
    view = model_view(scheduler, plan, denoiser.process, process)
    if (transforms or plan.transforms) and not is_pixel_space(autoencoder):
        raise IncompatibleError(
            "thresholding and --clip-sample clip x0_hat to the pixel range [-1, 1], but this "
            "model's x0 is a latent of its autoencoder, which has no such range; sample it "
            "without them"
        )
    tables, times, noisy_steps = _derive(plan, view, denoiser.prediction, device, dtype)
    guided = guidance != 1.0 and conditioner is not None and conditioner.kind is not None
    if conditioner is not None and conditioner.kind is not None:
        _preflight(denoiser, conditioner, times[0], device, dtype)
    native = tuple(denoiser.sample_shape)
    shape = native if shape is None else tuple(int(v) for v in shape)
    if shape != native:
        latent = not is_pixel_space(autoencoder)
        _try_shape(denoiser, conditioner, times[0], shape, device, dtype, latent)
    if chunk is None:  # on by default where it is cheap (the CPU) and needed (a network)
        exact = getattr(denoiser, "batch_invariant", False)
        small = sum(p.numel() for p in denoiser.parameters()) <= CHUNK_MAX_PARAMETERS
        chunk = DEFAULT_CHUNK if device.type == "cpu" and small and not exact else 0
    return Loop(denoiser, plan, view, tables, list(transforms), times, guidance, guided,
                conditioner, autoencoder, noisy_steps, device, dtype, chunk, scheduler,
                process, shape)  # fmt: skip


def _derive(
    plan: Plan, view: ModelView | None, prediction: str, device: torch.device, dtype: torch.dtype
) -> tuple[_Tables, list[torch.Tensor], int]:
    """What the loop reads of a plan: its folded tables, the model's times, its noisy calls."""
    tables = fold(plan, prediction, view)
    model_t = view.t if view is not None else plan.t
    times = list(model_t.to(device=device, dtype=dtype).unbind(0))
    return tables, times, sum(plan.noisy(i) for i in range(len(plan)))


def _view_tail(view: ModelView | None, start: int) -> ModelView | None:
    """The model view of a plan's tail that starts at call ``start``."""
    if view is None:
        return None
    info = {k: v[start:] if isinstance(v, list) else v for k, v in view.info.items()}
    return ModelView(view.t[start:], view.scale[start:], view.alpha[start:],
                     view.sigma[start:], info)  # fmt: skip


def takes_mask(denoiser: Denoiser) -> bool:
    """Whether the denoiser is an inpainting one (``takes_mask = True``): it reads cond
    entries ``mask`` (B, 1, h, w; 1 = regenerate) and ``masked`` (the autoencoder's encoding
    of the init with the regenerated region zeroed; pixels for a pixel model) and
    concatenates them to x itself, as SD's 9-channel inpainting UNet does; the loop then
    passes them and does not paste the known region."""
    return bool(getattr(denoiser, "takes_mask", False))


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Half-precision sampling runs under autocast as well as with the weights converted: a
    network that builds a float32 part of its input (a sinusoidal time embedding) then still
    meets its weights in their dtype."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@dataclass
class Loop:
    """A prepared run: everything fixed, so ``draw`` only steps."""

    denoiser: Denoiser
    plan: Plan
    view: ModelView | None
    tables: _Tables
    transforms: list
    times: list[torch.Tensor]
    guidance: float
    guided: bool
    conditioner: Conditioner | None
    autoencoder: Autoencoder | None
    noisy_steps: int
    device: torch.device
    dtype: torch.dtype
    #: rows per denoiser call (0: the whole batch); see ``_Caller``
    chunk: int = 0
    #: the sampler and the process it planned on (for the plan's tail, img2img)
    scheduler: Scheduler | None = None
    process: Process | None = None
    #: (C, H, W) of what the denoiser steps: its own ``sample_shape`` unless another was asked
    shape: tuple[int, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape or tuple(self.denoiser.sample_shape)

    def start_at(self, strength: float) -> Loop:
        """The loop of the last ``int(N * strength)`` of the plan's N steps (img2img; 1: this
        loop). The tail's tables are folded here, once, as ``prepare`` folds the plan's."""
        steps = self.plan.step_count()
        keep = kept_steps(steps, strength)
        if keep == steps:
            return self
        if keep < 1:
            raise UserError(
                f"strength {strength:g} of {steps} steps runs int({steps} * {strength:g}) = 0 "
                "steps; raise the strength or the steps"
            )
        plan, start = self.plan.tail(steps - keep)
        if start is not None:
            view = _view_tail(self.view, start)
        else:  # planned anew: the sampler views the model from the new plan
            assert self.scheduler is not None and self.process is not None
            view = model_view(self.scheduler, plan, self.denoiser.process, self.process)
        tables, times, noisy = _derive(plan, view, self.denoiser.prediction, self.device,
                                       self.dtype)  # fmt: skip
        return dataclasses.replace(self, plan=plan, view=view, tables=tables, times=times,
                                   noisy_steps=noisy)  # fmt: skip

    def draw(
        self,
        seeds: Sequence[int],
        conditions: Sequence[Any] | None = None,
        *,
        negatives: Sequence[Any] | None = None,
        batch_size: int | None = None,
        callback: Callable[[Step], None] | None = None,
        progress: bool = False,
        check_finite: bool = True,
        noise: Callable[[Sequence[int], tuple[int, ...], int], Any] | None = None,
        init: Init | None = None,
    ) -> torch.Tensor:
        """``len(seeds)`` samples in the data range, sample k seeded by ``seeds[k]``, under
        ``conditions[k]`` and, guided, ``negatives[k]`` (a negative prompt) in place of the
        null condition; from ``init`` (img2img, inpainting: ``diffplug.inpaint``) if given."""
        if not seeds:
            raise UserError("nothing to sample: no seeds given")
        if init is not None:
            self._check_init(init, len(seeds))
            loop = self.start_at(init.strength)
            return loop._draw(seeds, conditions, negatives, batch_size, callback, progress,
                              check_finite, noise, init)  # fmt: skip
        return self._draw(seeds, conditions, negatives, batch_size, callback, progress,
                          check_finite, noise, None)  # fmt: skip

    def _check_init(self, init: Init, n: int) -> None:
        if len(init.images) != n or (init.mask is not None and len(init.mask) != n):
            raise UserError(f"{len(init.images)} init images for {n} samples")
        if init.repaint and (init.mask is None or takes_mask(self.denoiser)):
            raise UserError("repaint resamples the regenerated region: it needs a mask and a "
                            "denoiser that does not take the mask itself")  # fmt: skip
        if init.repaint and not self.plan.linear:
            raise IncompatibleError(
                f"repaint takes a step again after noising back, which a sampler with a "
                f"stepper of its own ({type(self.plan).__name__}: multistep history, two-call "
                "steps) does not allow; use ddim, ddpm or adm"
            )

    def _draw(
        self,
        seeds: Sequence[int],
        conditions: Sequence[Any] | None,
        negatives: Sequence[Any] | None,
        batch_size: int | None,
        callback: Callable[[Step], None] | None,
        progress: bool,
        check_finite: bool,
        noise: Callable[[Sequence[int], tuple[int, ...], int], Any] | None,
        init: Init | None,
    ) -> torch.Tensor:
        if conditions is not None and len(conditions) != len(seeds):
            raise UserError(f"{len(conditions)} conditions for {len(seeds)} samples")
        if negatives is not None:
            if not self.guided:
                raise UserError(
                    "a negative prompt replaces guidance's unconditional half, but this run "
                    "is not guided (guidance 1, or no conditioner): it would change nothing"
                )
            if len(negatives) != len(seeds):
                raise UserError(f"{len(negatives)} negative prompts for {len(seeds)} samples")
        # every input of the draw, for conditioners whose conditions vary in length (align)
        everything = [*(conditions or ()), *(negatives or ())]
        conditioner, denoiser, n = self.conditioner, self.denoiser, len(self.plan)
        batch_size = batch_size or len(seeds)
        batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
        variants = conditioner.sweep() if conditioner is not None else [None]
        fused = self.plan.linear and not self.plan.transforms and not self.transforms
        batch = _Batch(self, fused and callback is None, callback, noise,
                       init.repaint if init is not None else 0)  # fmt: skip
        was_training = denoiser.training
        denoiser.eval()
        out = []
        total = self.plan.step_count() * len(batches) * len(variants)  # steps, not calls
        bar = tqdm(total=total, disable=not progress, desc="sampling", unit="step",
                   file=sys.stderr, leave=False)  # fmt: skip
        try:
            with torch.inference_mode(), _autocast(self.device, self.dtype):
                start = 0
                for batch_seeds in batches:
                    size = len(batch_seeds)
                    inputs = _inputs(conditioner, conditions, start, size)
                    against = None if negatives is None else list(negatives[start : start + size])
                    rows = None if init is None else init.rows(start, size)
                    extra = self._mask_cond(rows, size) if takes_mask(denoiser) else None
                    best, best_score = None, None
                    for variant in variants:  # one, unless the conditioner sweeps (best of)
                        cond, null = _conditioning(variant, inputs, batch_seeds, self.guided,
                                                   self.chunk, against, everything)  # fmt: skip
                        if extra is not None:
                            cond = {**(cond or {}), **extra}
                            null = None if null is None else {**null, **extra}
                        reg = None if rows is None else self._region(rows)
                        x = batch.run(batch_seeds, cond, null, bar.update if progress else None,
                                      region=reg)  # fmt: skip
                        # NaN/Inf from the denoiser propagates into x: one check per batch, no
                        # per-step sync. Only on failure is the batch replayed (same seeds) to
                        # find the step.
                        if check_finite and not bool(torch.isfinite(x).all()):
                            health = torch.zeros((n, size), device=self.device, dtype=self.dtype)
                            reg = None if rows is None else self._region(rows)
                            batch.run(batch_seeds, cond, null, None, health=health, region=reg)
                            _raise_if_nonfinite(health, batch_seeds, self.plan)
                        if self.autoencoder is not None:
                            x = _in_chunks(self.autoencoder.decode, x, self.chunk)
                        if len(variants) == 1:
                            best = x
                            break
                        assert conditioner is not None and inputs is not None
                        score = conditioner.score(x, inputs).to(x.device)
                        if best is None or best_score is None:
                            best, best_score = x, score
                        else:
                            better = score < best_score  # ties keep the earlier variant
                            best = torch.where(better.view(-1, 1, 1, 1), x, best)
                            best_score = torch.minimum(score, best_score)
                    out.append(best)
                    start += size
        finally:
            bar.close()
            denoiser.train(was_training)
        return torch.cat(out)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] in the denoiser's space (in fixed chunks, as decoding is)."""
        images = images.to(device=self.device, dtype=self.dtype)
        if self.autoencoder is None:
            return images
        return _in_chunks(self.autoencoder.encode, images, self.chunk).to(self.dtype)

    def _region(self, rows: Init) -> Region:
        """One batch's init, encoded, with its mask at the denoiser's resolution."""
        mask = None if rows.mask is None else rows.mask.to(device=self.device, dtype=self.dtype)
        from_noise = (rows.mask is not None or takes_mask(self.denoiser)) and (
            rows.strength == 1.0)  # fmt: skip
        return region(self._encode(rows.images), mask, self.plan.alpha, self.plan.sigma,
                      takes_mask=takes_mask(self.denoiser), from_noise=from_noise)  # fmt: skip

    def _mask_cond(self, rows: Init | None, size: int) -> dict[str, torch.Tensor]:
        """A ``takes_mask`` denoiser's mask and masked image for one batch (without an init:
        everything regenerated, from a grey image)."""
        if rows is None:
            shape = self.autoencoder.image_shape(self.sample_shape) if (
                self.autoencoder is not None) else self.sample_shape  # fmt: skip
            images = torch.zeros((size, *shape), device=self.device, dtype=self.dtype)
            mask = None
        else:
            images = rows.images.to(device=self.device, dtype=self.dtype)
            mask = None if rows.mask is None else rows.mask.to(self.device, self.dtype)
        return mask_condition(images, mask, self._encode, self.sample_shape[-2:])


@dataclass
class _Batch:
    """One draw's stepping: ``run`` walks one batch through every step of the plan."""

    loop: Loop
    fused: bool
    callback: Callable[[Step], None] | None
    noise: Any
    #: RePaint resamplings per step (with a region to paste)
    repaint: int = 0

    def check(self, pred: tuple, x: torch.Tensor) -> None:
        """The first step's prediction must be what the denoiser declares."""
        loop = self.loop
        if len(pred) != len(loop.tables.fp[0]) or any(p.shape != x.shape for p in pred):
            owner = type(loop.denoiser)
            raise PluginError(
                f"denoiser {owner.__module__}.{owner.__qualname__} breaks its contract: it "
                f"declares prediction {loop.denoiser.prediction!r} ({len(loop.tables.fp[0])} "
                f"tensor(s) of shape {tuple(x.shape)}) but returned "
                f"{[tuple(p.shape) for p in pred]}"
            )

    def run(
        self,
        seeds: Sequence[int],
        cond: Cond,
        null: Cond,
        tick: Callable[[int], Any] | None,
        health: torch.Tensor | None = None,
        region: Region | None = None,
    ) -> torch.Tensor:
        loop = self.loop
        plan, tables, view, size, n = loop.plan, loop.tables, loop.view, len(seeds), len(loop.plan)
        noisy = [plan.noisy(i) for i in range(n)]
        resample = self.repaint if region is not None else 0
        # RePaint (resampling): the known region is drawn afresh at every level it is pasted at
        fresh = [bool(resample) and region is not None and region.pastes
                 and region.sigma[i + 1] > 0 for i in range(n)]  # fmt: skip
        draws = (loop.noisy_steps + resample * sum(1 + noisy[i] for i in range(n - 1))
                 + (1 + resample) * sum(fresh))  # fmt: skip
        shape = loop.sample_shape
        # half precision draws float32 noise and rounds it: a seed means the same noise
        drawn = loop.dtype if loop.dtype.itemsize >= 4 else torch.float32
        src = (
            self.noise(seeds, shape, draws)
            if self.noise is not None
            else NoiseSource(seeds, shape, steps=draws, device=loop.device, dtype=drawn)
        )
        eps0 = src.initial().to(device=loop.device, dtype=loop.dtype)
        x = eps0 * plan.init_scale if region is None else region.start(eps0, plan.init_scale)
        stepper = plan.begin(x) or plan
        call = _Caller(loop, x, cond, null)  # buffers, times and conditions: once per batch
        scale = view.scale if view is not None else None

        def advance(i: int, x: torch.Tensor) -> torch.Tensor:
            pred = call(x if scale is None else x * scale[i], i)
            if i == 0:
                self.check(pred, x)
            if health is not None:
                for p in pred:
                    health[i] += p.reshape(size, -1).sum(1)
            z = src.next().to(device=loop.device, dtype=loop.dtype) if noisy[i] else None
            if self.fused:
                x_next = _combine(tables.fx[i], x, tables.fp[i], pred)
                if z is not None:
                    x_next.add_(z, alpha=plan.d[i])
                return x_next
            x0 = _combine(tables.x0_x[i], x, tables.x0_p[i], pred)
            eps = _combine(tables.eps_x[i], x, tables.eps_p[i], pred)
            for transform in plan.transforms:  # the sampler's own: eps_hat is kept
                x0 = transform(x0)
            if loop.transforms:  # the caller's (thresholding): eps_hat follows x0_hat
                for transform in loop.transforms:
                    x0 = transform(x0)
                if plan.sigma[i] > 0:
                    eps = (x - x0 * plan.alpha[i]) / plan.sigma[i]
            x_next = stepper.update(i, x, x0, eps, z)
            if self.callback is not None:
                self.callback(Step(i, n, float(plan.t[i]), x_next, x0, seeds))
            return x_next

        def paste(x: torch.Tensor, i: int) -> torch.Tensor:
            assert region is not None
            z = src.next().to(device=loop.device, dtype=loop.dtype) if fresh[i] else None
            return region.paste(x, i + 1, inplace=self.fused, noise=z)

        for i in range(n):
            x_next = advance(i, x)
            if region is not None:  # inpainting: the known region, at the next call's level
                x_next = paste(x_next, i)
                for _ in range(resample if i + 1 < n else 0):  # RePaint: back, step again
                    z = src.next().to(device=loop.device, dtype=loop.dtype)
                    x_next = paste(advance(i, region.back(x_next, i, z)), i)
            x = x_next
            if tick is not None and plan.ends_step(i):
                tick(1)
        return x


class _Caller:
    """Calls the denoiser for one batch. Guided, both halves go in one call on a buffer
    holding x twice, with times and conditions concatenated once per batch. With
    ``loop.chunk`` the call is made on fixed-size chunks of that many rows (the last padded):
    CPU kernels pick their algorithm by batch size, so a sample's numbers then do not depend
    on how many others share its batch, its position in it, or the batch size."""

    def __init__(self, loop: Loop, x: torch.Tensor, cond: Cond, null: Cond) -> None:
        self.loop, self.size = loop, x.shape[0]
        rows = 2 * self.size if loop.guided else self.size
        self.chunk = loop.chunk or 0
        padded = -(-rows // self.chunk) * self.chunk if self.chunk else rows
        cond = _cat(cond, null) if loop.guided else cond
        self.direct = not self.chunk and not loop.guided  # nothing to copy: call on x itself
        self.buffer = None if self.direct else x.new_zeros((padded, *x.shape[1:]))
        self.cond = _pad(cond, padded)
        self.times = [t.expand(padded) for t in loop.times]  # views
        self.starts = list(range(0, padded, self.chunk or padded))
        self.out: list[torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, i: int) -> tuple:
        loop, n = self.loop, self.size
        if self.direct:
            return as_tuple(loop.denoiser(x, self.times[i], self.cond))
        assert self.buffer is not None
        self.buffer[:n].copy_(x)
        if loop.guided:
            self.buffer[n : 2 * n].copy_(x)
        if len(self.starts) == 1:
            out = as_tuple(loop.denoiser(self.buffer, self.times[i], self.cond))
        else:
            out = self._chunked(i)
        if not loop.guided:
            return tuple(p[:n] for p in out)
        return tuple(torch.lerp(p[n : 2 * n], p[:n], loop.guidance) for p in out)

    def _chunked(self, i: int) -> tuple:
        assert self.buffer is not None
        step, t = self.chunk, self.times[i]
        for start in self.starts:
            rows = slice(start, start + step)
            cond = None if self.cond is None else {k: v[rows] for k, v in self.cond.items()}
            part = as_tuple(self.loop.denoiser(self.buffer[rows], t[rows], cond))
            if any(p.shape[0] != step for p in part):
                owner = type(self.loop.denoiser)
                raise PluginError(
                    f"denoiser {owner.__module__}.{owner.__qualname__} breaks its contract: "
                    f"called on {step} rows it returned {[tuple(p.shape) for p in part]}"
                )
            if self.out is None:  # the prediction buffers, made once per batch
                self.out = [p.new_empty((len(self.buffer), *p.shape[1:])) for p in part]
            for buffer, p in zip(self.out, part, strict=False):
                buffer[rows].copy_(p)
        assert self.out is not None
        return tuple(self.out)


def _pad(cond: Cond, rows: int) -> Cond:
    """Conditions with their batch padded to ``rows`` (repeating the last row)."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        extra = rows - value.shape[0]
        out[key] = (
            value if extra <= 0 else torch.cat([value, value[-1:].expand(extra, *value.shape[1:])])
        )
    return out


def _inputs(
    conditioner: Conditioner | None, conditions: Sequence[Any] | None, start: int, size: int
) -> list[Any] | None:
    if conditioner is None:
        return None
    return list(conditions[start : start + size]) if conditions is not None else [None] * size


def _conditioning(
    conditioner: Conditioner | None,
    inputs: list[Any] | None,
    seeds: Sequence[int],
    guided: bool,
    chunk: int = 0,
    negatives: list[Any] | None = None,
    everything: Sequence[Any] = (),
) -> tuple[Cond, Cond]:
    """Conditions and, guided, the unconditional half's conditions of a batch, made ``chunk``
    inputs at a time so a text encoder's numbers do not depend on the batch either.

    The unconditional half is the conditioner's ``null`` or, given ``negatives`` (one
    negative prompt per sample), their encoding by ``condition``, exactly as a prompt is
    encoded: the only place either is built, for every sampler. All parts then go through
    the conditioner's ``align`` (``everything``: the draw's inputs) so that they concatenate."""
    if conditioner is None or inputs is None:
        return None, None
    step = chunk or len(inputs)
    starts = range(0, len(inputs), step)
    parts = [conditioner.condition(inputs[k : k + step], seeds[k : k + step]) for k in starts]
    if not guided:
        return _join(_align(conditioner, parts, everything)), None
    if negatives is not None:
        nulls = [conditioner.condition(negatives[k : k + step], seeds[k : k + step])
                 for k in starts]  # fmt: skip
    else:
        nulls = [conditioner.null(len(inputs[k : k + step])) for k in starts]
    aligned = _align(conditioner, [*parts, *nulls], everything)
    return _join(aligned[: len(parts)]), _join(aligned[len(parts) :])


def _align(conditioner: Conditioner, parts: list[Cond], everything: Sequence[Any]) -> list[Cond]:
    """``conditioner.align`` (a duck-typed conditioner without it: the parts as they are)."""
    align = getattr(conditioner, "align", None)
    return list(parts) if align is None else align(parts, everything)


def _join(parts: list[Cond]) -> Cond:
    if any(p is None for p in parts):
        return None
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index]


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               chunk: int) -> torch.Tensor:  # fmt: skip
    """``fn`` (a decoder) on fixed-size chunks of x, the last padded with zeros."""
    if not chunk:
        return fn(x)
    out = []
    for k in range(0, len(x), chunk):
        part = x[k : k + chunk]
        pad = chunk - len(part)
        if pad:
            part = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])
        out.append(fn(part)[: chunk - pad])
    return torch.cat(out)


def _try_shape(
    denoiser: Denoiser, conditioner: Conditioner | None, t: torch.Tensor,
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, latent: bool,
) -> None:  # fmt: skip
    """One call at a size the model was not made for: refused with the reason (a U-Net
    whose levels do not divide it, a positional table too short) before any batch runs.
    Sizes read width x height, as ``--size`` takes them."""

    def name(s: Sequence[int]) -> str:
        return "x".join(str(v) for v in reversed(s[1:])) + (" latents" if latent else "")

    size = name(shape)
    if len(shape) != len(denoiser.sample_shape) or shape[0] != denoiser.sample_shape[0]:
        raise UserError(f"size {size}: the model samples {denoiser.sample_shape[0]}-channel "
                        f"arrays of {len(denoiser.sample_shape) - 1} dimensions")  # fmt: skip
    x = torch.zeros(1, *shape, device=device, dtype=dtype)
    with torch.inference_mode():
        cond = _with_mask(denoiser, x, conditioner.null(1) if conditioner else None)
    try:
        out = _call_once(denoiser, x, t, cond, dtype)
    except Exception as exc:  # whatever the plugin raised, the reason is the size
        raise UserError(
            f"this model cannot sample at {size} (its own size is "
            f"{name(denoiser.sample_shape)}): {type(exc).__name__}: {exc}"
        ) from None
    if any(tuple(o.shape) != tuple(x.shape) for o in (out if isinstance(out, tuple | list)
                                                      else (out,))):  # fmt: skip
        raise UserError(f"this model cannot sample at {size}: its output has another shape")


def _call_once(
    denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond, dtype: torch.dtype
) -> Any:
    """The denoiser on one sample ``x`` at time ``t``, as the loop will call it (eval mode,
    autocast in half precision)."""
    was_training = denoiser.training
    denoiser.eval()  # as the loop will call it (batch norm, dropout)
    try:
        with torch.inference_mode(), _autocast(x.device, dtype):
            return denoiser(x, t.reshape(1), cond)
    finally:
        denoiser.train(was_training)


def _with_mask(denoiser: Denoiser, x: torch.Tensor, cond: Cond) -> Cond:
    """``cond`` with an inpainting denoiser's mask and masked image (all regenerated)."""
    if not takes_mask(denoiser):
        return cond
    return {**(cond or {}), "mask": x.new_ones((1, 1, *x.shape[-2:])), "masked": x}


def _preflight(
    denoiser: Denoiser, conditioner: Conditioner, t: torch.Tensor, device: torch.device,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    """One single-sample call under the null condition before any batch runs: a conditioner
    whose output the denoiser cannot read (another width, channel count or format) is refused
    with the reason here, not as a shape error from deep inside the first step."""
    with torch.inference_mode():
        null = conditioner.null(1)
    if null is None:  # no null condition to try (and no guidance): the first step will tell
        return
    x = torch.zeros(1, *denoiser.sample_shape, device=device, dtype=dtype)
    null = _with_mask(denoiser, x, null)
    try:
        _call_once(denoiser, x, t, null, dtype)
    except Exception as exc:  # whatever the plugin raised, the reason is the combination
        given = {k: tuple(v.shape) for k, v in null.items()}
        raise IncompatibleError(
            f"the denoiser ({type(denoiser).__name__}, {denoiser.conditioning} "
            "conditioning) cannot read what conditioner "
            f"{conditioner.name or type(conditioner).__name__!r} gives ({given}): {exc}"
        ) from None


def _cat(a: Cond, b: Cond) -> Cond:
    if a is None or b is None:
        return a if b is None else b
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _raise_if_nonfinite(health: torch.Tensor, seeds: Sequence[int], plan: Plan) -> None:
    bad = ~torch.isfinite(health)
    if bool(bad.any()):
        step, k = (int(v) for v in bad.nonzero()[0])
        raise NonFiniteError(
            f"the denoiser returned NaN or Inf at step {step + 1}/{len(plan)} "
            f"(t={float(plan.t[step]):g}) for sample {k} of its batch (seed {seeds[k]})"
        )
    raise NonFiniteError(
        "sampling produced NaN or Inf although the denoiser's outputs were finite: the "
        "sampler's update overflowed (try fewer extreme options or float32)"
    )
