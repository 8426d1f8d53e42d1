"""``diffplug run``: sample a model with a sampler and write a PNG grid or a tensor file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from diffplug.errors import UserError


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any other --OPTION is passed to the sampler; `diffplug info SAMPLER` lists them.",
)
@click.option("--sampler", required=True, help="sampler name (`diffplug list samplers`)")
@click.option("--model", help="pretrained model name or a .safetensors checkpoint path")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="default: the sampler's (50; adm 10)"
)
@click.option("--seed", type=int, default=0, show_default=True, help="sample k uses seed+k")
@click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available)")
@click.option(
    "--output", "-o", default="samples.png", show_default=True, help=".png grid or .safetensors"
)
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option(
    "--threshold",
    type=click.Choice(["none", "static", "dynamic"]),
    default="none",
    show_default=True,
    help="x0_hat thresholding at every step",
)
@click.option(
    "--threshold-percentile",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.995,
    show_default=True,
    help="p for dynamic thresholding",
)
@click.option(
    "--condition-images",
    default=None,
    help="for a conditional model: a folder of images or a samples .safetensors, one per sample "
    "(cycled)",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Draw samples from a model with a sampler."""
    from diffplug.output import check_output_path
    from diffplug.resolve import parse_extra_options

    output = check_output_path(kw.pop("output"), kw["overwrite"])
    sampler_options = parse_extra_options(list(ctx.args))
    _run(output=output, sampler_options=sampler_options, **kw)


def _run(output: Path, sampler_options: dict[str, str], **kw: Any) -> None:
    import torch

    from diffplug import __version__, distributed
    from diffplug.output import write_samples
    from diffplug.registry import default_registry
    from diffplug.resolve import build_scheduler, default_model, load_model
    from diffplug.sampling import sample
    from diffplug.transforms import DynamicConfig, DynamicThreshold, StaticThreshold

    registry = default_registry()
    scheduler = build_scheduler(registry, kw["sampler"], sampler_options)
    if kw["steps"] is None:
        kw["steps"] = scheduler.default_steps
    device = distributed.local_device(_device(kw["device"]))
    model_name = kw["model"] or default_model(registry, scheduler)
    denoiser, label = load_model(registry, model_name, device=device)
    conditioner, conditions = _conditions(registry, denoiser, label, kw)
    transforms = []
    if kw["threshold"] == "static":
        transforms.append(StaticThreshold())
    elif kw["threshold"] == "dynamic":
        transforms.append(DynamicThreshold(DynamicConfig(percentile=kw["threshold_percentile"])))
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
                transforms=transforms,
                progress=not kw["quiet"] and rank == 0,
                device=device,
            )
            if mine
            else torch.zeros((0, *denoiser.sample_shape), device=device)
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
        **(
            {"bridged": {"from": denoiser.process.spec(), "to": process.spec()}}
            if process is not denoiser.process
            else {}
        ),
        "device": str(device),
        **(
            {
                "conditioner": {"name": conditioner.name, **dataclasses.asdict(conditioner.config)},
                "condition_images": kw["condition_images"],
            }
            if conditioner is not None
            else {}
        ),
        "versions": {"diffplug": __version__, "torch": torch.__version__}
        | {p.name: p.version for p in registry.plugins.values()},
    }
    write_samples(samples, output, recipe)
    print(f"diffplug: wrote {len(seeds)} samples to {output}", file=sys.stderr)


def _conditions(registry: Any, denoiser: Any, label: str, kw: dict[str, Any]) -> tuple[Any, Any]:
    """The model's recorded conditioner and one input per sample from --condition-images."""
    from diffplug.conditioners import load_condition_images, recorded_conditioner

    conditioner = recorded_conditioner(denoiser, registry)
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
