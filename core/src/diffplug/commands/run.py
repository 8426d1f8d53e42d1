"""``diffplug run``: sample a model with a sampler and write a PNG grid or a tensor file."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from diffplug.errors import IncompatibleError, UserError


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any other --OPTION goes to the sampler or the model's conditioner (with --pipeline: "
    "to the pipeline); `diffplug info NAME` lists each one's options.",
)
@click.option("--sampler", help="sampler name (`diffplug list samplers`); not with --pipeline")
@click.option("--model", help="pretrained model name or a .safetensors checkpoint path")
@click.option("--pipeline", help="a whole recipe instead (`diffplug list pipelines`), e.g. imagen")
@click.option(
    "--conditioner",
    help="use this conditioner instead of the one the model was trained with (e.g. t5 --path "
    "DIR for an imported diffusers text UNet); its options go to it",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="text prompt; repeat for one per sample (cycled), or give one for all",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="classifier-free guidance weight w: uncond + w*(cond - uncond) (default: the model's "
    "recommendation, else 1 = none)",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="default: the sampler's (50; adm 10)"
)
@click.option("--seed", type=int, default=0, show_default=True, help="sample k uses seed+k")
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="default 64, or one per --prompt when several are given",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available)")
@click.option(
    "--output", "-o", default="samples.png", show_default=True, help=".png grid or .safetensors"
)
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option(
    "--threshold",
    type=click.Choice(["none", "static", "dynamic"]),
    default=None,
    help="x0_hat thresholding at every step  [default: none; a pipeline's own]",
)
@click.option(
    "--threshold-percentile",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="p for dynamic thresholding  [default: 0.995]",
)
@click.option(
    "--condition-images",
    default=None,
    help="for a conditional model: a folder of images or a samples .safetensors, one per sample "
    "(cycled)",
)
@click.option("--save-stages", is_flag=True, help="with --pipeline: also write each stage's images")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Draw samples from a model with a sampler."""
    from diffplug.output import check_output_path
    from diffplug.resolve import parse_extra_options

    output = check_output_path(kw.pop("output"), kw["overwrite"])
    extra = parse_extra_options(list(ctx.args))
    prompts = list(kw.pop("prompts"))
    if kw["guidance"] is not None and not math.isfinite(kw["guidance"]):
        raise UserError("--guidance must be a finite number")
    if kw["num_samples"] is None:
        kw["num_samples"] = len(prompts) if len(prompts) > 1 else 64
    if kw["pipeline"] is not None:
        if kw["sampler"] or kw["model"] or kw["condition_images"] or kw["conditioner"]:
            raise UserError(
                "--pipeline runs its own stages: --sampler, --model, --conditioner and "
                "--condition-images are its options (`diffplug info PIPELINE`)"
            )
        # the loop's own options, given, set the pipeline's (base stage) ones
        shared = {"guidance": "guidance", "threshold": "threshold",
                  "threshold_percentile": "percentile", "steps": "base_steps"}  # fmt: skip
        for flag, key in shared.items():
            if kw[flag] is not None:
                extra[key] = str(kw[flag])
        _run_pipeline(output=output, options=extra, prompts=prompts, **kw)
        return
    kw["threshold"] = kw["threshold"] or "none"
    kw["threshold_percentile"] = kw["threshold_percentile"] or 0.995
    if kw["save_stages"]:
        raise UserError("--save-stages needs --pipeline")
    if not kw["sampler"]:
        raise UserError("missing --sampler (or --pipeline); `diffplug list samplers` names them")
    _run(output=output, extra_options=extra, prompts=prompts, **kw)


def _run_pipeline(output: Path, options: dict[str, str], prompts: list[str], **kw: Any) -> None:
    import torch

    from diffplug import __version__
    from diffplug.output import write_samples
    from diffplug.registry import default_registry

    registry = default_registry()
    entry = registry.get("pipeline", kw["pipeline"])
    cls = entry.load()
    from diffplug.options import build_config

    pipeline = entry.construct(build_config(cls.Config, options, owner=f"pipeline {entry.name!r}"))
    pipeline.name = entry.name
    seeds = list(range(kw["seed"], kw["seed"] + kw["num_samples"]))
    cycled = [prompts[k % len(prompts)] for k in range(len(seeds))] if prompts else None
    stages = pipeline.run(
        prompts=cycled,
        seeds=seeds,
        batch_size=kw["batch_size"],
        device=_device(kw["device"]),
        progress=not kw["quiet"],
    )
    base = {
        "pipeline": entry.name,
        "prompts": cycled,
        "seeds": seeds,
        "versions": {"diffplug": __version__, "torch": torch.__version__}
        | {p.name: p.version for p in registry.plugins.values()},
    }
    if kw["save_stages"]:
        for k, stage in enumerate(stages[:-1]):
            path = output.with_name(f"{output.stem}.stage{k}{output.suffix}")
            if path.exists() and not kw["overwrite"]:
                raise UserError(f"{path} exists; pass --overwrite to replace it")
            write_samples(stage.images, path, {**base, "stage": k, **stage.recipe})
            print(f"diffplug: wrote stage {k} ({stage.name}) to {path}", file=sys.stderr)
    final = stages[-1]
    recipe = {**base, "stages": [s.recipe for s in stages]}
    write_samples(final.images, output, recipe)
    print(f"diffplug: wrote {len(seeds)} samples to {output}", file=sys.stderr)


def _run(output: Path, extra_options: dict[str, str], prompts: list[str], **kw: Any) -> None:
    import torch

    from diffplug import __version__, distributed
    from diffplug.output import write_samples
    from diffplug.registry import default_registry
    from diffplug.resolve import build_scheduler, default_model, load_model
    from diffplug.sampling import sample
    from diffplug.transforms import thresholds

    registry = default_registry()
    sampler_cls = registry.load("scheduler", kw["sampler"])
    sampler_options, conditioner_options = _split_options(sampler_cls, extra_options)
    scheduler = build_scheduler(registry, kw["sampler"], sampler_options)
    if kw["steps"] is None:
        kw["steps"] = scheduler.default_steps
    device = distributed.local_device(_device(kw["device"]))
    model_name = kw["model"] or default_model(registry, scheduler)
    denoiser, label = load_model(registry, model_name, device=device)
    chosen = None
    if kw["conditioner"]:  # in place of the recorded one; the model's condition shape
        from diffplug.conditioners import build_conditioner

        shape = {"channels": denoiser.sample_shape[0],
                 "low_size": getattr(denoiser.config, "low_size", None)}  # fmt: skip
        chosen = build_conditioner(registry, kw["conditioner"], conditioner_options, shape).eval()
        conditioner_options = {}
    conditioner, conditions = _conditions(registry, denoiser, label, kw, prompts, chosen)
    from diffplug.latent import recorded_autoencoder

    autoencoder = recorded_autoencoder(denoiser, registry)  # latent models decode through it
    if conditioner_options:
        if conditioner is None:
            sampler_options.update(conditioner_options)  # let the sampler name the bad option
            build_scheduler(registry, kw["sampler"], sampler_options)
        from diffplug.pipeline import configure

        conditioner = configure(conditioner, conditioner_options)
    guidance = kw["guidance"]
    if guidance is None:
        guidance = float(getattr(denoiser, "checkpoint_extra", {}).get("guidance", 1.0))
    if guidance != 1.0 and conditioner is None:
        raise UserError(f"--guidance: model {label} is unconditional; there is nothing to guide")
    transforms = thresholds(kw["threshold"], kw["threshold_percentile"])
    seeds = list(range(kw["seed"], kw["seed"] + kw["num_samples"]))
    from diffplug.bridge import planning_process

    process = planning_process(scheduler, denoiser.process)  # another process: bridged
    plan_info = scheduler.plan(process, kw["steps"]).info
    rank, size = distributed.world()
    with distributed.process_group(device):
        mine = distributed.shard(seeds, kw["batch_size"], rank, size)
        local = (
            sample(
                denoiser,
                scheduler,
                steps=kw["steps"],
                seeds=mine,
                batch_size=kw["batch_size"],
                conditioner=conditioner.to(device) if conditioner is not None else None,
                conditions=[conditions[s - kw["seed"]] for s in mine] if conditions else None,
                guidance=guidance,
                autoencoder=autoencoder,
                transforms=transforms,
                progress=not kw["quiet"] and rank == 0,
                device=device,
            )
            if mine
            else torch.zeros((0, *_image_shape(denoiser, autoencoder)), device=device)
        )
        samples = distributed.gather(local, len(seeds), kw["batch_size"], rank, size)
    if samples is None:  # not rank 0: rank 0 writes
        return
    import dataclasses

    recipe = {
        "sampler": {"name": scheduler.name, "options": dataclasses.asdict(scheduler.config)},
        "model": {"name": label, "config": dataclasses.asdict(denoiser.config)},
        "steps": kw["steps"],
        "timesteps": plan_info.get("timesteps"),
        "seeds": seeds,
        "threshold": kw["threshold"],
        "guidance": guidance,
        **(
            {"bridged": {"from": denoiser.process.spec(), "to": process.spec()}}
            if process is not denoiser.process
            else {}
        ),
        "device": str(device),
        **(
            {"autoencoder": denoiser.checkpoint_extra["autoencoder"]["source"]}
            if autoencoder is not None
            else {}
        ),
        **(
            {
                "conditioner": {"name": conditioner.name, **dataclasses.asdict(conditioner.config)},
                "condition_images": kw["condition_images"],
                "prompts": [conditions[k] for k in range(len(seeds))] if prompts else None,
            }
            if conditioner is not None
            else {}
        ),
        "versions": {"diffplug": __version__, "torch": torch.__version__}
        | {p.name: p.version for p in registry.plugins.values()},
    }
    write_samples(samples, output, recipe)
    print(f"diffplug: wrote {len(seeds)} samples to {output}", file=sys.stderr)


def _image_shape(denoiser: Any, autoencoder: Any) -> tuple[int, ...]:
    shape = denoiser.sample_shape
    return tuple(autoencoder.image_shape(shape)) if autoencoder is not None else shape


def _split_options(
    sampler_cls: Any, options: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Extra options the sampler owns, and the rest (for the model's conditioner)."""
    from diffplug.options import describe

    owned = {o.name for o in describe(sampler_cls.Config)}
    mine = {k: v for k, v in options.items() if k in owned}
    return mine, {k: v for k, v in options.items() if k not in owned}


def _conditions(
    registry: Any,
    denoiser: Any,
    label: str,
    kw: dict[str, Any],
    prompts: list[str],
    chosen: Any = None,
) -> tuple[Any, Any]:
    """The chosen or the model's recorded conditioner, and one input per sample (prompts or
    images)."""
    from diffplug.conditioners import load_condition_images, recorded_conditioner
    from diffplug.sampling import check_conditioning

    conditioner = chosen if chosen is not None else recorded_conditioner(denoiser, registry)
    try:  # before the prompt and image checks below, which assume a fit
        check_conditioning(denoiser, conditioner)
    except IncompatibleError as exc:
        raise IncompatibleError(f"model {label}: {exc}") from None
    if conditioner is not None and conditioner.kind is None:
        conditioner = None  # --conditioner none on an unconditional model
    kind = getattr(conditioner, "kind", None)
    if prompts and kind != "text":
        raise UserError(f"--prompt: model {label} is not text-conditional")
    if kind == "text":
        if kw["condition_images"] is not None:
            raise UserError(f"--condition-images: model {label} is text-conditional")
        if not prompts:
            raise UserError(
                f"model {label} is text-conditional: pass --prompt TEXT (repeat it for one per "
                'sample; --prompt "" samples unconditionally)'
            )
        return conditioner, [prompts[k % len(prompts)] for k in range(kw["num_samples"])]
    path = kw["condition_images"]
    if conditioner is None or conditioner.kind != "image":
        if path is not None:
            raise UserError(f"--condition-images: model {label} is not image-conditional")
        return conditioner, None
    if path is None:
        raise UserError(
            f"model {label} is conditioned on an image ({conditioner.name}): pass "
            "--condition-images FOLDER (or a samples .safetensors), one image per sample"
        )
    channels = getattr(conditioner.config, "channels", denoiser.sample_shape[0])
    images = load_condition_images(path, denoiser.sample_shape[-1], channels)
    return conditioner, [images[k % len(images)] for k in range(kw["num_samples"])]


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return device
