"""One run, resolved once: ``diffplug.load(...)`` returns a ``Run`` that owns it.

``load`` turns names (as on the command line: a bare name, ``dist:name``, a path) and
options into components, checks that they fit and prepares the loop (plan, bridge, folded
tables) once; ``Run.sample`` then only steps. Its recipe names every component with its
plugin and version, every option, the seeds and the SHA-256 of every weights file, so
``diffplug.load(recipe=...)`` (``diffplug run --recipe``) makes the same samples again and
refuses, naming the difference, when what is installed is not what made them.

    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=20)
    run.sample(8, seed=0).save("grid.png")
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffplug import __version__, init_image
from diffplug.checkpoint import file_sha256, load_component, read_metadata
from diffplug.components import Autoencoder, Conditioner, Denoiser, Schedule, Scheduler
from diffplug.conditioners import build_conditioner, load_condition_images, recorded_conditioner
from diffplug.errors import CheckpointError, IncompatibleError, OptionError, UserError
from diffplug.init_image import (
    Init,
    Source,
    check_repaint,
    check_strength,
    load_images,
    load_masks,
)
from diffplug.options import build_config, describe
from diffplug.output import read_recipe, to_unit
from diffplug.pipeline import configure, starting_base
from diffplug.registry import Entry, Registry, default_registry
from diffplug.resolve import find_default_model, model_path, recorded_name
from diffplug.samples import Samples
from diffplug.sampling import Loop, Step, prepare
from diffplug.transforms import THRESHOLDS, thresholds

RECIPE_FORMAT = "diffplug.recipe/2"
DEFAULT_PERCENTILE = 0.995
#: the largest side ``size`` takes (an SDXL image is 1024)
MAX_SIZE = 8192


def load(
    model: str | os.PathLike[str] | None = None,
    sampler: str | None = None,
    *,
    steps: int | None = None,
    schedule: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    conditioner: str | None = None,
    autoencoder: str | os.PathLike[str] | None = None,
    guidance: float | None = None,
    threshold: str | None = None,
    percentile: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    chunk: int | None = None,
    size: int | tuple[int, int] | None = None,
    pipeline: str | None = None,
    recipe: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_different: bool = False,
    registry: Registry | None = None,
    **options: Any,
) -> Run | PipelineRun:
    """Resolve, check and prepare a run; nothing is sampled yet.

    ``model`` is a pretrained name or a ``.safetensors`` path (default: the first installed
    model the sampler can run); ``sampler`` a sampler name (``diffplug list samplers``;
    default: the one the model records, as an imported SD pipeline records its scheduler).
    ``options`` are the components' own options as keyword arguments (``eta=0.5``,
    ``spacing="trailing"``): the sampler's first, then the schedule's, the rest the
    conditioner's, refused with the CLI's messages when no component has them. ``schedule``
    chooses the noise levels the sampler visits (``diffplug list schedules``) within the
    model's range or [``sigma_min``, ``sigma_max``]. ``conditioner`` replaces the one the model
    was trained with; ``autoencoder`` the one it records. ``pipeline`` runs a whole cascade
    instead, with ``options`` as its options. ``recipe`` (a dict, or a ``.png`` /
    ``.safetensors`` that ``Samples.save`` wrote) re-runs what made those samples; anything
    installed that differs from it (a plugin version, a weights file) is refused unless
    ``allow_different``, which warns instead. ``chunk`` is the number of rows per denoiser
    call (default 64 on the CPU: sample k is then bitwise the same at any batch size and
    thread count; 0 calls on whole batches, the default on GPUs). ``device`` is ``auto``
    (cuda, then mps, then cpu), ``cpu``, ``cuda`` or ``mps``; ``dtype`` (``float32``,
    ``float16``, ``bfloat16``) the precision of the components and the loop. Either,
    unavailable here, is a one-line ``UserError``. ``size`` (``(height, width)``, or one
    side of a square) samples images of another size than the model's own, where its
    network allows (a Stable Diffusion U-Net at 768x512, say); it is checked by one call at
    that size before anything is drawn.
    """
    registry = registry or default_registry()
    if recipe is not None:
        given = dict(model=model, sampler=sampler, steps=steps, schedule=schedule,
                     sigma_min=sigma_min, sigma_max=sigma_max, conditioner=conditioner,
                     autoencoder=autoencoder, guidance=guidance, threshold=threshold,
                     percentile=percentile, pipeline=pipeline, chunk=chunk, dtype=dtype,
                     size=size, **options)  # fmt: skip
        extra = sorted(k for k, v in given.items() if v is not None)
        if extra:
            raise UserError(
                f"a recipe fixes the whole run; do not also give {', '.join(extra)} "
                "(change the recipe, or load without it)"
            )
        return _replay(recipe, registry, device=device, allow_different=allow_different)
    if pipeline is not None:
        if model is not None or sampler is not None or conditioner is not None or schedule:
            raise UserError(
                "a pipeline runs its own stages: model, sampler, schedule and conditioner are "
                "its options (`diffplug info PIPELINE`)"
            )
        if chunk is not None:
            raise UserError("chunk goes with a single model; a pipeline's stages use the default")
        if size is not None:
            raise UserError("size goes with a single model; a pipeline's stages set their own")
        if dtype is not None and resolve_dtype(dtype) != torch.float32:
            raise UserError("dtype goes with a single model; a pipeline's stages run in float32")
        shared = {"guidance": guidance, "threshold": threshold, "percentile": percentile,
                  "base_steps": steps}  # fmt: skip
        options = {**{k: v for k, v in shared.items() if v is not None}, **options}
        return PipelineRun(registry, pipeline, options, resolve_device(device))
    if sampler is None:
        sampler, steps, options = _recorded_sampling(registry, model, steps, options)
    return Run(
        registry,
        sampler=sampler,
        model=None if model is None else os.fspath(model),
        steps=steps,
        schedule=schedule,
        sigma_range=(sigma_min, sigma_max),
        conditioner=conditioner,
        autoencoder=None if autoencoder is None else os.fspath(autoencoder),
        guidance=guidance,
        threshold=threshold,
        percentile=percentile,
        device=(where := resolve_device(device)),
        dtype=resolve_dtype(dtype, where),
        options=options,
        chunk=chunk,
        size=None if size is None else ((size, size) if isinstance(size, int) else size),
    )


def _recorded_sampling(
    registry: Registry, model: str | os.PathLike[str] | None, steps: int | None,
    options: dict[str, Any],
) -> tuple[str, int | None, dict[str, Any]]:  # fmt: skip
    """The sampler a model records (``extra["sampling"]``, as ``import-diffusers`` writes the
    pipeline's own scheduler), with its options under the given ones and its steps unless
    steps are given; no sampler is guessed for a model that records none."""
    if model is None:
        raise UserError("missing sampler (or pipeline); `diffplug list samplers` names them")
    path, name = model_path(registry, os.fspath(model))
    recorded = read_metadata(path).get("extra", {}).get("sampling")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sampler"), str):
        raise UserError(
            f"missing sampler: model {name} records none to run it with; name one "
            "(`diffplug list samplers`)"
        )
    steps = recorded.get("steps") if steps is None else steps
    return recorded["sampler"], steps, {**recorded.get("options", {}), **options}


class Run:
    """A model, a sampler and everything around them, resolved and checked once.

    ``sample`` draws from it as often as asked; ``recipe`` describes it before any sample is
    drawn. The components are attributes (``denoiser``, ``scheduler``, ``conditioner``,
    ``autoencoder``) for those who want to look inside.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        sampler: str,
        model: str | None,
        steps: int | None,
        conditioner: str | None,
        autoencoder: str | None,
        schedule: str | None = None,
        sigma_range: tuple[float | None, float | None] = (None, None),
        guidance: float | None,
        threshold: str | None,
        percentile: float | None,
        device: torch.device,
        options: dict[str, Any],
        strict_options: bool = True,
        chunk: int | None = None,
        dtype: torch.dtype = torch.float32,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.registry, self.device, self.dtype = registry, device, dtype
        self._sampler_entry = registry.get("scheduler", sampler)
        sampler_cls = self._sampler_entry.load()
        own = {o.name for o in describe(sampler_cls.Config)}
        rest = {k: v for k, v in options.items() if k not in own}
        self.scheduler: Scheduler = _build(
            self._sampler_entry,
            sampler_cls,
            {k: v for k, v in options.items() if k in own},
        )
        self.schedule, self._schedule_entry = self._schedule(schedule, sigma_range, rest)
        if model is None:
            self._model_path, self.model_name = find_default_model(registry, self.scheduler)
            self.model_source = self.model_name
        else:
            self.model_source = model
            self._model_path, self.model_name = model_path(registry, model)
        self._model_meta = read_metadata(self._model_path)
        self.denoiser: Denoiser = load_component(
            self._model_path, kind="denoiser", registry=registry, device=device
        )
        self.conditioner, self._conditioner_chosen = self._conditioner(conditioner, rest)
        if rest and not self._conditioner_chosen:
            if self.conditioner is None:
                if strict_options:  # no conditioner to take them: the sampler names them
                    left = {k: v for k, v in options.items() if k in own or k in rest}
                    build_config(sampler_cls.Config, left, owner=f"sampler {sampler!r}")
            else:
                configure(self.conditioner, rest, strict=strict_options)
        self._autoencoder_path: str | None = None
        self.autoencoder, self._autoencoder_source = self._autoencoder(autoencoder)
        self._autoencoder_chosen = autoencoder is not None
        self.guidance = self._guidance(guidance)
        self.threshold, self.percentile = self._thresholding(threshold, percentile)
        self.steps = self.scheduler.default_steps if steps is None else steps
        if dtype != torch.float32:  # the whole model in that precision, and the loop
            for part in (self.denoiser, self.conditioner, self.autoencoder):
                if part is not None:
                    part.to(dtype)
        self.size = None if size is None else self._size(size)
        try:
            self.loop: Loop = prepare(
                self.denoiser,
                self.scheduler,
                steps=self.steps,
                conditioner=self.conditioner,
                guidance=self.guidance,
                autoencoder=self.autoencoder,
                transforms=thresholds(self.threshold, self.percentile),
                device=device,
                dtype=dtype,
                chunk=chunk,
                shape=None if self.size is None else self._latent_shape(self.size),
            )
        except IncompatibleError as exc:
            raise IncompatibleError(f"model {self.model_name}: {exc}") from None
        #: what ``sample()`` draws when called without seeds or prompts (set by a replay)
        self.defaults: dict[str, Any] = {}

    # -- resolution, once ----------------------------------------------------------------
    def _size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the images asked for, checked against what the model takes."""
        try:
            height, width = (int(v) for v in size)
        except (TypeError, ValueError):
            raise UserError(f"size must be (height, width); got {size!r}") from None
        if not (0 < height <= MAX_SIZE and 0 < width <= MAX_SIZE):
            raise UserError(f"size {width}x{height}: each side must be from 1 to {MAX_SIZE}")
        if self.conditioning == "image":
            raise UserError(
                f"--size: model {self.model_name} is conditioned on an image, whose size sets "
                "its output's; resize the condition images instead"
            )
        return height, width

    def _latent_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        """What the denoiser steps to make images of ``size``: the autoencoder's latents of
        them, or the images themselves."""
        native = tuple(self.denoiser.sample_shape)
        if self.autoencoder is None:
            return (native[0], *size)
        channels = self.autoencoder.image_shape(native)[0]
        return tuple(self.autoencoder.latent_shape((channels, *size)))

    def _schedule(
        self,
        name: str | None,
        sigma_range: tuple[float | None, float | None],
        options: dict[str, Any],
    ) -> tuple[Schedule | None, Entry | None]:
        """The chosen schedule, built from the options it owns (taken out of ``options``),
        set on the sampler; refused for a sampler that does not walk noise levels."""
        scheduler = self.scheduler
        given = [f"--{k}" for k, v in zip(("sigma-min", "sigma-max"), sigma_range, strict=True)
                 if v is not None]  # fmt: skip
        if name is None:
            if given:
                raise UserError(f"{' and '.join(given)} set a schedule's range: add --schedule")
            return None, None
        if not scheduler.walks_noise_levels:
            raise IncompatibleError(
                f"sampler {scheduler.name!r} chooses its own steps and walks no schedule's "
                "noise levels: drop --schedule (`diffplug list samplers` shows which samplers "
                "take one)"
            )
        entry = self.registry.get("schedule", name)
        cls = entry.load()
        owned = {o.name for o in describe(cls.Config)}
        mine = {k: options.pop(k) for k in list(options) if k in owned}
        schedule = _build(entry, cls, mine)
        scheduler.schedule, scheduler.sigma_range = schedule, sigma_range
        return schedule, entry

    def _conditioner(
        self, name: str | None, options: dict[str, Any]
    ) -> tuple[Conditioner | None, bool]:
        if name is not None:  # in place of the recorded one, shaped like the model's input
            shape = _condition_shape(self.denoiser)
            chosen = build_conditioner(self.registry, name, options, shape).eval()
            return (chosen.to(self.device) if chosen.kind is not None else None), True
        recorded = recorded_conditioner(self.denoiser, self.registry)
        return recorded, False

    def _autoencoder(self, source: str | None) -> tuple[Autoencoder | None, str | None]:
        """The given autoencoder, else the one the model records (None in pixel space); its
        fit (fingerprint, shapes) is checked once, by ``prepare``."""
        record = getattr(self.denoiser, "checkpoint_extra", {}).get("autoencoder")
        if source is None and record is None:
            return None, None
        name = source if source is not None else recorded_name(self.registry, record["source"])
        try:
            self._autoencoder_path, _ = model_path(self.registry, name)
            autoencoder = load_component(self._autoencoder_path, kind="autoencoder",
                                         registry=self.registry, device=self.device)  # fmt: skip
        except UserError as exc:
            if source is not None:
                raise
            raise CheckpointError(
                f"the model works in the latents of autoencoder {name!r}, which cannot be "
                f"loaded: {exc}"
            ) from None
        return autoencoder.eval(), name

    def _thresholding(self, threshold: str | None, percentile: float | None) -> tuple[str, float]:
        """The given thresholding, else the one the model records (``extra["threshold"]``,
        chosen by measurement: docs/claims.md), else none; each part falls back alone."""
        extra = getattr(self.denoiser, "checkpoint_extra", {})
        recorded = extra.get("threshold") if isinstance(extra.get("threshold"), dict) else {}
        kind = threshold if threshold is not None else recorded.get("kind", "none")
        if kind not in THRESHOLDS:
            choices = ", ".join(THRESHOLDS)
            raise OptionError(f"threshold must be one of {choices}; got {kind!r}")
        if percentile is None:
            percentile = recorded.get("percentile", DEFAULT_PERCENTILE)
        percentile = float(percentile)  # type: ignore[arg-type]
        if not 0 < percentile <= 1:  # NaN too: click's range lets it through
            raise OptionError(f"percentile must be in (0, 1]; got {percentile!r}")
        return kind, percentile

    def _guidance(self, guidance: float | None) -> float:
        if guidance is None:
            extra = getattr(self.denoiser, "checkpoint_extra", {})
            return float(extra.get("guidance", 1.0)) if self.conditioner is not None else 1.0
        guidance = float(guidance)
        if not torch.isfinite(torch.tensor(guidance)):
            raise UserError("guidance must be a finite number")
        if guidance != 1.0 and self.conditioner is None:
            raise UserError(
                f"guidance: model {self.model_name} is unconditional; there is nothing to guide"
            )
        return guidance

    # -- sampling ------------------------------------------------------------------------
    @property
    def conditioning(self) -> str | None:
        """What the run conditions on: None, "text" or "image"."""
        return None if self.conditioner is None else self.conditioner.kind

    def sample(
        self,
        n: int | None = None,
        *,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        images: str | os.PathLike[str] | Sequence[torch.Tensor] | None = None,
        init: Source | None = None,
        mask: Source | None = None,
        strength: float | None = None,
        repaint: int | None = None,
        batch_size: int | None = None,
        callback: Callable[[Step], None] | None = None,
        progress: bool = True,
    ) -> Samples:
        """Draw samples; sample k uses ``seeds[k]`` (default ``seed + k``) and is the same
        whatever ``batch_size``. ``prompt`` (one for all, or a list, cycled) for a text model;
        ``negative_prompt`` (the same) replaces the empty prompt of guidance's unconditional
        half (refused unguided, where it would change nothing); ``images`` (a folder, a
        samples ``.safetensors``, or tensors in [-1, 1]) for an image-conditional one. ``n``
        defaults to one per prompt, else one per seed, else 1.

        ``init`` (img2img: an image, a folder whose k-th image goes to sample k, a samples
        ``.safetensors``, a PIL image or a tensor in [0, 1]) starts the last
        ``int(steps * strength)`` steps from it, noised with the sample's own noise;
        ``mask`` (the same forms; white = regenerate) inpaints: the black region is kept,
        ``repaint`` N resamples each step N more times (docs/generation.md)."""
        seeds, prompts = _seeds_and_prompts(self.defaults, n, seed, seeds, prompt)
        negative = (_prompts(negative_prompt) if negative_prompt is not None
                    else self.defaults.get("negative_prompts"))  # fmt: skip
        if images is None:
            images = self.defaults.get("condition_images")
        negatives = self.negatives(len(seeds), negative)  # refused first: cheap to check
        start = self.init(len(seeds), init, mask, strength, repaint)
        conditions = self.conditions(len(seeds), prompts, images)
        x = self.draw(seeds, conditions, negatives=negatives, batch_size=batch_size,
                      callback=callback, progress=progress, init=start)  # fmt: skip
        recipe = self.recipe_for(seeds, prompts, images, len(seeds), negative)
        return Samples(to_unit(x), {**recipe, **(start.record() if start else {})})

    def init(
        self,
        n: int,
        init: Source | None = None,
        mask: Source | None = None,
        strength: float | None = None,
        repaint: int | None = None,
    ) -> Init | None:
        """The init of ``n`` samples (img2img, inpainting), checked, or None (or a replay's);
        ``Init.record`` is what the recipe keeps of it."""
        index = None
        if init is None and mask is None and strength is None and repaint is None:
            given = self.defaults
            init, mask, strength = given.get("init_image"), given.get("mask"), given.get("strength")
            repaint, index = given.get("repaint"), given.get("init_index")
        if init is None:
            for name, value in (("mask", mask), ("strength", strength)):
                if value is not None:
                    raise UserError(f"--{name} goes with --init-image (the image to start from)")
            if repaint:
                raise UserError("--repaint goes with --mask and --init-image")
            return None
        strength = 1.0 if strength is None else check_strength(strength)
        repaint = check_repaint(repaint or 0)
        if repaint and mask is None:
            raise UserError("--repaint resamples an inpainted region: it goes with --mask")
        images = load_images(init, n, self.image_shape, index=index)
        masks = None if mask is None else load_masks(mask, n, self.image_shape[-2:], index)
        names = (init_image.describe(init), None if mask is None else init_image.describe(mask))
        return Init(images, strength, masks, repaint, names, None if index is None else (*index,))

    def draw(
        self,
        seeds: Sequence[int],
        conditions: Sequence[Any] | None = None,
        *,
        negatives: Sequence[str] | None = None,
        batch_size: int | None = None,
        callback: Callable[[Step], None] | None = None,
        progress: bool = False,
        init: Init | None = None,
    ) -> torch.Tensor:
        """Samples in the data range [-1, 1] (on the run's device) for ``seeds``, one
        condition input (and, guided, optionally one negative prompt: ``negatives``) per
        seed, from one ``init`` row per seed if given: the building block of ``sample``,
        pipelines and torchrun."""
        if not seeds:
            return torch.zeros((0, *self.image_shape), device=self.device)
        return self.loop.draw(seeds, conditions, negatives=negatives, batch_size=batch_size,
                              callback=callback, progress=progress, init=init)  # fmt: skip

    @property
    def image_shape(self) -> tuple[int, ...]:
        shape = self.loop.sample_shape
        return tuple(self.autoencoder.image_shape(shape)) if self.autoencoder else shape

    def conditions(
        self,
        n: int,
        prompts: list[str] | None,
        images: str | os.PathLike[str] | Sequence[torch.Tensor] | None,
    ) -> list[Any] | None:
        """One conditioner input per sample (prompts or images, cycled), checked against
        what the model takes."""
        kind, label = self.conditioning, self.model_name
        if prompts and kind != "text":
            raise UserError(f"--prompt: model {label} is not text-conditional")
        if images is not None and kind != "image":
            raise UserError(f"--condition-images: model {label} is not image-conditional")
        for p in prompts or []:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8, escaped by the shell
                raise UserError(f"prompt {p!r} is not valid UTF-8 text") from None
        if kind == "text":
            if not prompts:
                raise UserError(
                    f"model {label} is text-conditional: pass --prompt TEXT (repeat it for one "
                    'per sample; --prompt "" samples unconditionally)'
                )
            return [prompts[k % len(prompts)] for k in range(n)]
        if kind == "image":
            if images is None:
                raise UserError(
                    f"model {label} is conditioned on an image ({self.conditioner_name}): pass "
                    "--condition-images FOLDER (or a samples .safetensors), one image per sample"
                )
            if isinstance(images, str | os.PathLike):
                assert self.conditioner is not None
                channels = getattr(self.conditioner.config, "channels",
                                   self.denoiser.sample_shape[0])  # fmt: skip
                images = load_condition_images(images, self.denoiser.sample_shape[-1], channels)
            items = list(images)
            if not items:
                raise UserError("no condition images given")
            return [items[k % len(items)] for k in range(n)]
        return None

    def negatives(self, n: int, negative_prompts: list[str] | None) -> list[str] | None:
        """One negative prompt per sample (cycled), or None for none. Refused for a model
        that is not text-conditional, or when guidance is off: there is no unconditional
        half for it to replace, so it would change nothing."""
        if not negative_prompts:
            return None
        label = self.model_name
        if self.conditioning != "text":
            raise UserError(
                f"--negative-prompt: model {label} is not text-conditional (a negative prompt "
                "replaces the empty prompt of guidance's unconditional half)"
            )
        if not self.loop.guided:
            raise UserError(
                f"--negative-prompt: guidance is off (--guidance {self.guidance:g}), so a "
                "negative prompt would change nothing; pass --guidance W with W != 1 (e.g. 3)"
            )
        for p in negative_prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8, escaped by the shell
                raise UserError(f"negative prompt {p!r} is not valid UTF-8 text") from None
        return [negative_prompts[k % len(negative_prompts)] for k in range(n)]

    @property
    def conditioner_name(self) -> str | None:
        return None if self.conditioner is None else self.conditioner.name

    # -- the recipe ----------------------------------------------------------------------
    @property
    def recipe(self) -> dict[str, Any]:
        """Everything that makes this run's samples, before any is drawn (seeds, prompts
        and inputs are added by ``sample``)."""
        plan, view = self.loop.plan, self.loop.view
        scheduler = self.scheduler
        recipe: dict[str, Any] = {
            "format": RECIPE_FORMAT,
            "sampler": {
                **self._component(self._sampler_entry),
                "options": dataclasses.asdict(scheduler.config),
            },
            "model": {
                "name": self.model_name,
                "source": self.model_source,
                **self._plugin(self._model_meta["plugin"]),
                "component": self._model_meta["name"],
                "config": dataclasses.asdict(self.denoiser.config),
                "sha256": file_sha256(self._model_path),
            },
            "steps": self.steps,
            "evaluations": len(plan),
            **self._schedule_record(),
            "timesteps": plan.info.get("timesteps"),
            "guidance": self.guidance,
            "threshold": self.threshold,
            "percentile": self.percentile,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "chunk": self.loop.chunk,
            "versions": self.versions(),
        }
        if self.size is not None:  # only when asked: the model's own size needs no record
            recipe["size"] = list(self.size)
        if view is not None and "bridged_times" in view.info:
            model_process = self.denoiser.process
            planned = self.scheduler.native_process()
            recipe["bridged"] = {"from": model_process.spec(),
                                 "to": planned.spec() if planned else None}  # fmt: skip
        if self.conditioner is not None:
            entry = self.registry.get("conditioner", self.conditioner.name)
            recipe["conditioner"] = {
                **self._component(entry),
                "options": dataclasses.asdict(self.conditioner.config),
                "chosen": self._conditioner_chosen,
            }
        if self.autoencoder is not None:
            recipe["autoencoder"] = {
                "source": self._autoencoder_source,
                "sha256": file_sha256(self._autoencoder_path),
                "chosen": self._autoencoder_chosen,
            }
        return recipe

    def _schedule_record(self) -> dict[str, Any]:
        if self.schedule is None or self._schedule_entry is None:
            return {}
        low, high = self.scheduler.sigma_range
        return {
            "schedule": {
                **self._component(self._schedule_entry),
                "options": dataclasses.asdict(self.schedule.config),
                "sigma_min": low,
                "sigma_max": high,
            }
        }

    def recipe_for(
        self,
        seeds: Sequence[int],
        prompts: list[str] | None,
        images: Any,
        n: int,
        negative_prompts: list[str] | None = None,
    ) -> dict[str, Any]:
        """The run's recipe with what one ``sample`` call drew: seeds, prompts, negative
        prompts, inputs."""
        recipe = {**self.recipe, "seeds": list(seeds)}
        if prompts:
            recipe["prompts"] = [prompts[k % len(prompts)] for k in range(n)]
        if negative_prompts:
            recipe["negative_prompts"] = [negative_prompts[k % len(negative_prompts)]
                                          for k in range(n)]  # fmt: skip
        if isinstance(images, str | os.PathLike):
            recipe["condition_images"] = os.fspath(images)
        elif images is not None:
            recipe["condition_images"] = "(tensors given in Python: not replayable)"
        return recipe

    def versions(self) -> dict[str, str]:
        return {"diffplug": __version__, "torch": torch.__version__} | {
            p.name: p.version for p in self.registry.plugins.values()
        }

    def _plugin(self, dist: str) -> dict[str, str]:
        info = self.registry.plugins.get(dist)
        return {"plugin": dist, "version": info.version if info else "?"}

    def _component(self, entry: Entry) -> dict[str, str]:
        return {"name": entry.name, **self._plugin(entry.dist)}

    def __repr__(self) -> str:
        return (
            f"Run(model={self.model_name!r}, sampler={self.scheduler.name!r}, "
            f"steps={self.steps}, guidance={self.guidance}, device={str(self.device)!r})"
        )


class PipelineRun:
    """A whole cascade (``diffplug list pipelines``), resolved once; stages are ``Run``s."""

    def __init__(
        self, registry: Registry, name: str, options: dict[str, Any], device: torch.device
    ) -> None:
        self.registry, self.device = registry, device
        self._entry = registry.get("pipeline", name)
        cls = self._entry.load()
        config = build_config(cls.Config, options, owner=f"pipeline {self._entry.name!r}")
        self.pipeline = _build(self._entry, cls, config, configured=True)
        self.defaults: dict[str, Any] = {}

    def sample(
        self,
        n: int | None = None,
        *,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        init: Source | None = None,
        mask: Source | None = None,
        strength: float | None = None,
        repaint: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Samples:
        """The final stage's images; ``Samples.stages`` holds every stage's, base first.
        ``init``, ``mask``, ``strength`` and ``repaint`` go to the base stage (as
        ``Run.sample``'s, at the base model's image size)."""
        if negative_prompt is not None:
            raise UserError(
                "negative_prompt goes with a single text model; a pipeline's stages guide "
                "with the empty prompt"
            )
        seeds, prompts = _seeds_and_prompts(self.defaults, n, seed, seeds, prompt)
        cycled = [prompts[k % len(prompts)] for k in range(len(seeds))] if prompts else None
        given = {"init": init, "mask": mask, "strength": strength, "repaint": repaint}
        if all(v is None for v in given.values()):
            given = {k: self.defaults.get(r) for k, r in (("init", "init_image"), ("mask", "mask"),
                     ("strength", "strength"), ("repaint", "repaint"))}  # fmt: skip
        with starting_base(given) as used:
            stages = self.pipeline.run(prompts=cycled, seeds=seeds, batch_size=batch_size or 64,
                                       device=self.device, progress=progress)  # fmt: skip
        base = {**self.recipe, "seeds": seeds, "prompts": cycled, **used}
        each = [Samples(to_unit(s.images), {**base, "stage": k, **s.recipe})
                for k, s in enumerate(stages)]  # fmt: skip
        return Samples(each[-1].tensor, {**base, "stages": [s.recipe for s in stages]}, each)

    @property
    def recipe(self) -> dict[str, Any]:
        info = self.registry.plugins.get(self._entry.dist)
        return {
            "format": RECIPE_FORMAT,
            "pipeline": {
                "name": self._entry.name,
                "plugin": self._entry.dist,
                "version": info.version if info else "?",
                "options": dataclasses.asdict(self.pipeline.config),
            },
            "device": str(self.device),
            "versions": {"diffplug": __version__, "torch": torch.__version__}
            | {p.name: p.version for p in self.registry.plugins.values()},
        }


# -- replay ------------------------------------------------------------------------------
def _replay(
    source: str | os.PathLike[str] | dict[str, Any],
    registry: Registry,
    *,
    device: str | torch.device | None,
    allow_different: bool,
) -> Run | PipelineRun:
    """The run a recipe describes, with its seeds, prompts and negative prompts as
    ``sample()``'s defaults."""
    recipe = source if isinstance(source, dict) else read_recipe(source)
    label = "recipe" if isinstance(source, dict) else f"recipe {os.fspath(source)}"
    if recipe.get("format") != RECIPE_FORMAT:
        raise UserError(
            f"{label}: written by an older diffplug (format {recipe.get('format', '1')!r}); "
            "it records too little to be re-run exactly"
        )
    differences = _differences(recipe, registry)
    if differences:
        message = f"{label}: not what made it: {'; '.join(differences)}"
        if not allow_different:
            raise UserError(f"{message} (--allow-different runs it anyway)")
        print(f"diffplug: warning: {message}; running it anyway", file=sys.stderr)
    device = device if device is not None else recipe.get("device")
    run: Run | PipelineRun
    if "pipeline" in recipe:
        spec = recipe["pipeline"]
        run = PipelineRun(registry, _qualified(spec), spec["options"], resolve_device(device))
    else:
        conditioner = recipe.get("conditioner") or {}
        schedule = recipe.get("schedule") or {}
        # the sampler's own options win a name both have (its --spacing over normal's)
        options = {**schedule.get("options", {}), **recipe["sampler"]["options"]}
        chosen = conditioner.get("chosen", False)
        if conditioner:
            options.update(conditioner["options"])
        run = Run(
            registry,
            sampler=_qualified(recipe["sampler"]),
            model=recipe["model"]["source"],
            steps=recipe["steps"],
            schedule=_qualified(schedule) if schedule else None,
            sigma_range=(schedule.get("sigma_min"), schedule.get("sigma_max")),
            conditioner=_qualified(conditioner) if chosen else None,
            autoencoder=_chosen_source(recipe.get("autoencoder")),
            guidance=recipe["guidance"],
            threshold=recipe["threshold"],
            percentile=recipe["percentile"],
            device=(where := resolve_device(device)),
            dtype=resolve_dtype(recipe.get("dtype"), where),
            options=options,
            strict_options=False,
            chunk=recipe.get("chunk", 0),
            size=recipe.get("size"),
        )
    run.defaults = {k: recipe[k] for k in ("seeds", "prompts", "negative_prompts",
                                           "condition_images", "init_image", "mask",
                                           "strength", "repaint", "init_index")
                    if recipe.get(k) is not None}  # fmt: skip
    return run


def _chosen_source(record: dict[str, Any] | None) -> str | None:
    """The autoencoder a recipe names, when it was given in place of the model's own."""
    return record["source"] if record and record.get("chosen") else None


def _qualified(record: dict[str, Any]) -> str:
    return f"{record['plugin']}:{record['name']}" if record.get("plugin") else record["name"]


def _differences(recipe: dict[str, Any], registry: Registry) -> list[str]:
    """What is installed or on disk now that differs from what the recipe recorded."""
    out: list[str] = []
    installed = {p.name: p.version for p in registry.plugins.values()}

    def visit(node: Any, where: str) -> None:
        if isinstance(node, list):
            for k, item in enumerate(node):
                visit(item, f"{where}[{k}]")
            return
        if not isinstance(node, dict):
            return
        plugin, version = node.get("plugin"), node.get("version")
        if isinstance(plugin, str) and isinstance(version, str):
            now = installed.get(plugin)
            if now is None:
                out.append(f"{where} needs plugin {plugin} {version}, which is not installed")
            elif now != version:
                out.append(f"{where}: plugin {plugin} is {now}, the recipe has {version}")
        source, digest = node.get("source"), node.get("sha256")
        if isinstance(source, str) and isinstance(digest, str):
            try:
                path, _ = model_path(registry, source)
                now_digest = file_sha256(path)
            except UserError as exc:
                out.append(f"{where} {source}: {exc}")
            else:
                if now_digest != digest:
                    out.append(
                        f"{where} {source}: weights fingerprint {now_digest[:12]}... differs "
                        f"from the recipe's {digest[:12]}..."
                    )
        for key, value in node.items():
            if key not in ("config", "options"):
                visit(value, f"{where}.{key}" if where else key)

    visit({k: v for k, v in recipe.items() if k != "versions"}, "")
    return out


# -- small helpers -----------------------------------------------------------------------
def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None): cuda, then mps, then cpu; an unavailable device is refused."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type == "mps" and not _mps_available():
        raise UserError("--device mps: no Apple MPS device is available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: diffplug samples on cpu, cuda or mps")
    return device


#: the precisions sampling runs in
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(
    name: str | torch.dtype | None, device: torch.device | None = None
) -> torch.dtype:
    """``float32`` (None), ``float16`` or ``bfloat16``; one the device cannot run is refused."""
    if name is None:
        return torch.float32
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    dtype = DTYPES[key]
    cuda = device is not None and device.type == "cuda"
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bfloat16: this CUDA device has no bfloat16; use float16")
    return dtype


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _build(entry: Entry, cls: type, options: Any, configured: bool = False) -> Any:
    """The component ``entry`` registers, from its already-loaded class (loaded once)."""
    config = (
        options
        if configured
        else build_config(cls.Config, options, owner=f"{_label(entry.kind)} {entry.name!r}")
    )
    component = entry.construct(config, cls=cls)
    component.name = entry.name
    return component


def _label(kind: str) -> str:
    return "sampler" if kind == "scheduler" else kind


def _condition_shape(denoiser: Denoiser) -> dict[str, Any]:
    """The model's sizes (channels, a condition image's side...), offered to a conditioner
    chosen in place of its own: it takes those named like its own options."""
    config = dataclasses.asdict(denoiser.config)
    return {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}


def _seeds_and_prompts(
    defaults: dict[str, Any],
    n: int | None,
    seed: int,
    seeds: Sequence[int] | None,
    prompt: str | Sequence[str] | None,
) -> tuple[list[int], list[str] | None]:
    """What one ``sample`` call draws: the given seeds, or ``n`` from ``seed`` (default one per
    prompt, else 1), or a replay's recorded seeds and prompts when nothing is given."""
    prompts = _prompts(prompt if prompt is not None else defaults.get("prompts"))
    if seeds is None and n is None and "seeds" in defaults and prompt is None:
        seeds = defaults["seeds"]
    if seeds is None:
        n = n if n is not None else (len(prompts) if prompts and len(prompts) > 1 else 1)
        seeds = range(seed, seed + _count(n))
    return [_seed(s) for s in seeds], prompts


def _prompts(prompt: str | Sequence[str] | None) -> list[str] | None:
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        if not isinstance(p, str):
            raise UserError(f"prompts must be text; got {type(p).__name__}")

    return prompts or None


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"the number of samples must be a positive integer; got {n!r}")
    return n


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"seeds must be integers; got {value!r}")
    if not 0 <= value < 2**64:
        raise UserError(f"seed {value} is outside 0 .. 2^64-1")
    return value


__all__ = ["PipelineRun", "Run", "load", "resolve_device", "resolve_dtype"]
