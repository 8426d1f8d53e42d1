"""``diffplug run``: sample a model with a sampler and write a PNG grid or a tensor file."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import click

from diffplug.errors import UserError


class SizeParam(click.ParamType):
    """``768x512`` (width x height, as image editors write it) or ``512`` (a square), as
    ``(height, width)``."""

    name = "WIDTHxHEIGHT"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            sides = [int(v) for v in parts]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2) or min(sides) < 1:
            self.fail(f"{value!r} is not WIDTHxHEIGHT (e.g. 768x512) or one positive side", param,
                      ctx)  # fmt: skip
        width, height = sides if len(sides) == 2 else sides * 2
        return height, width


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any other --OPTION goes to the sampler or the model's conditioner (with --pipeline: "
    "to the pipeline); `diffplug info NAME` lists each one's options.",
)
@click.option(
    "--sampler",
    help="sampler name (`diffplug list samplers`); not with --pipeline  [default: the one the "
    "model records, as an imported SD pipeline records its scheduler]",
)
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
    "--negative-prompt",
    "negative_prompts",
    multiple=True,
    help="what to steer away from: encoded in place of the empty prompt of guidance's "
    "unconditional half (needs --guidance != 1); repeat for one per sample (cycled)",
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
@click.option(
    "--schedule",
    default=None,
    help="the noise levels the sampler visits (`diffplug list schedules`: karras, exponential, "
    "...); its options follow as --OPTION  [default: the sampler's own timesteps]",
)
@click.option(
    "--sigma-min", type=click.FloatRange(min=0, min_open=True), default=None,
    help="with --schedule: the lowest noise level  [default: the model's]",
)  # fmt: skip
@click.option(
    "--sigma-max", type=click.FloatRange(min=0, min_open=True), default=None,
    help="with --schedule: the highest noise level  [default: the model's]",
)  # fmt: skip
@click.option("--seed", type=int, default=None, help="sample k uses seed+k  [default: 0]")
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="default 64, or one per --prompt when several are given",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--chunk",
    type=click.IntRange(min=0),
    default=None,
    help="rows per denoiser call, the last padded: sample k is then bitwise the same at any "
    "--batch-size and thread count (0: whole batches)  [default: 64 on the CPU, 0 on GPUs]",
)
@click.option(
    "--size",
    type=SizeParam(),
    default=None,
    help="WIDTHxHEIGHT (or one side, square) of the images, where the model's network takes "
    "it (a Stable Diffusion U-Net at 768x512)  [default: the model's own]",
)
@click.option(
    "--device",
    default=None,
    help="auto, cpu, cuda or mps  [default: auto: cuda, then mps, then cpu]",
)
@click.option(
    "--dtype",
    default=None,
    help="float32, float16 or bfloat16: the model's and the loop's precision  [default: float32]",
)
@click.option(
    "--init-image",
    default=None,
    help="img2img: start from this image (for every sample), a folder (its k-th image, sorted, "
    "for sample k) or a samples .safetensors",
)
@click.option(
    "--strength",
    type=float,
    default=None,
    help="with --init-image: run the last int(steps*S) steps, S in (0, 1]  [default: 1]",
)
@click.option(
    "--mask",
    default=None,
    help="with --init-image: inpaint; white regenerates, black keeps (same forms as --init-image)",
)
@click.option(
    "--repaint",
    type=int,
    default=None,
    help="with --mask: RePaint resamplings per step (noise back, step again)  [default: 0]",
)
@click.option(
    "--output",
    "-o",
    default="samples.png",
    show_default=True,
    help=".png grid, .safetensors tensor, or DIR/ (one PNG per sample)",
)
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option(
    "--threshold",
    type=click.Choice(["none", "static", "dynamic"]),
    default=None,
    help="x0_hat thresholding at every step  [default: the model's recorded, else none; a "
    "pipeline's own]",
)
@click.option(
    "--threshold-percentile",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="p for dynamic thresholding  [default: the model's recorded, else 0.995]",
)
@click.option(
    "--condition-images",
    default=None,
    help="for a conditional model: a folder of images or a samples .safetensors, one per sample "
    "(cycled)",
)
@click.option("--save-stages", is_flag=True, help="with --pipeline: also write each stage's images")
@click.option(
    "--recipe",
    default=None,
    help="re-run the recipe stored in a .png or .safetensors that diffplug wrote: same "
    "components, options, seeds and prompts, so the same pixels on the same device",
)
@click.option(
    "--allow-different",
    is_flag=True,
    help="with --recipe: run even if a plugin version or weights file differs (a warning)",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Draw samples from a model with a sampler."""
    from diffplug.output import check_output_path
    from diffplug.resolve import parse_extra_options

    output = check_output_path(kw["output"], kw["overwrite"], folders=True)
    extra = parse_extra_options(list(ctx.args))
    prompts = list(kw["prompts"])
    negatives = list(kw["negative_prompts"])
    if kw["guidance"] is not None and not math.isfinite(kw["guidance"]):
        raise UserError("--guidance must be a finite number")
    _check_init_flags(kw)
    if kw["recipe"] is not None:
        given = [f"--{k.replace('_', '-')}" for k in RECIPE_FIXES if kw[k] is not None]
        given += [f"--{k.replace('_', '-')}" for k in extra]
        if prompts:
            given.append("--prompt")
        if negatives:
            given.append("--negative-prompt")
        if given:
            raise UserError(
                f"--recipe fixes the whole run; do not also give {', '.join(given)} "
                "(only -o, --overwrite, --device, --batch-size, --allow-different, --quiet)"
            )
    elif kw["allow_different"]:
        raise UserError("--allow-different goes with --recipe")
    elif kw["pipeline"] is not None:
        if any(kw[k] for k in ("sampler", "model", "condition_images", "conditioner", "schedule")):
            raise UserError(
                "--pipeline runs its own stages: --sampler, --model, --schedule, --conditioner "
                "and --condition-images are its options (`diffplug info PIPELINE`)"
            )
        if negatives:
            raise UserError(
                "--negative-prompt goes with a single text model (--model, --sampler); a "
                "pipeline's stages guide with the empty prompt"
            )
    else:
        if kw["save_stages"]:
            raise UserError("--save-stages needs --pipeline")
        if not kw["sampler"] and not kw["model"]:
            raise UserError(
                "missing --sampler (or --pipeline); `diffplug list samplers` names them"
            )
    kw["seed"] = kw["seed"] or 0
    stage_paths = _stage_paths(output, kw) if kw["save_stages"] else []
    _sample(output, stage_paths, extra, prompts, negatives, kw)


#: flags a recipe already fixes
RECIPE_FIXES = ("sampler", "model", "pipeline", "conditioner", "guidance", "steps", "seed",
                "num_samples", "threshold", "threshold_percentile", "condition_images",
                "schedule", "sigma_min", "sigma_max", "chunk", "dtype", "size", "init_image",
                "strength", "mask", "repaint")  # fmt: skip


def _check_init_flags(kw: dict[str, Any]) -> None:
    """img2img's and inpainting's flags that only make sense together, refused at once."""
    from diffplug.init_image import check_repaint, check_strength

    if kw["recipe"] is not None:
        return
    if kw["init_image"] is None:
        for flag in ("mask", "strength", "repaint"):
            if kw[flag] is not None:
                raise UserError(f"--{flag} goes with --init-image (the image to start from)")
    if kw["strength"] is not None:
        check_strength(kw["strength"])
    if kw["repaint"] is not None:
        check_repaint(kw["repaint"])
        if kw["mask"] is None:
            raise UserError("--repaint resamples an inpainted region: it goes with --mask")


def _stage_paths(output: Path, kw: dict[str, Any]) -> list[Path]:
    """Where --save-stages writes, checked before any work (the stage count is the
    pipeline's: every name it could use is checked)."""
    from diffplug.output import check_output_path, is_folder_target

    if is_folder_target(output):
        raise UserError("--save-stages writes files beside -o FILE; give a .png or .safetensors")
    paths = [output.with_name(f"{output.stem}.stage{k}{output.suffix}") for k in range(8)]
    for path in paths:
        if path.exists():
            check_output_path(path, kw["overwrite"])
    return paths


def _sample(
    output: Path, stage_paths: list[Path], extra: dict[str, str], prompts: list[str],
    negative: list[str], kw: dict[str, Any],
) -> None:  # fmt: skip
    """Load once, sample (sharded across torchrun's processes), write on rank 0."""
    import diffplug
    from diffplug import distributed
    from diffplug.run import Run, resolve_device
    from diffplug.samples import Samples

    device = distributed.local_device(resolve_device(kw["device"]))
    if kw["recipe"] is not None:
        run = diffplug.load(recipe=kw["recipe"], device=device,
                            allow_different=kw["allow_different"])  # fmt: skip
        init = {}
    else:
        init = {"init": kw["init_image"], "mask": kw["mask"], "strength": kw["strength"],
                "repaint": kw["repaint"]}  # fmt: skip
        run = diffplug.load(
            model=kw["model"], sampler=kw["sampler"], pipeline=kw["pipeline"],
            steps=kw["steps"], schedule=kw["schedule"], sigma_min=kw["sigma_min"],
            sigma_max=kw["sigma_max"], conditioner=kw["conditioner"], guidance=kw["guidance"],
            chunk=kw["chunk"], dtype=kw["dtype"], size=kw["size"],
            threshold=kw["threshold"], percentile=kw["threshold_percentile"], device=device,
            **extra,
        )  # fmt: skip
    _refuse_overwriting_inputs(output, run, kw)
    quiet = kw["quiet"]
    if not isinstance(run, Run):  # a pipeline: its stages shard nothing, rank 0 does it all
        rank, _ = distributed.world()
        if rank != 0:
            return
        n = kw["num_samples"] or (len(prompts) if len(prompts) > 1 else None)
        n = n if n is not None or run.defaults else 64
        samples = run.sample(n, seed=kw["seed"], prompt=prompts or None, **init,
                             batch_size=kw["batch_size"], progress=not quiet)  # fmt: skip
        for k, stage in enumerate(samples.stages[:-1] if stage_paths else []):
            stage.save(stage_paths[k], overwrite=True)
            print(f"diffplug: wrote stage {k} to {stage_paths[k]}", file=sys.stderr)
        _write(samples, output, kw["overwrite"])
        return
    n = kw["num_samples"] or (len(prompts) if len(prompts) > 1 else 64)
    prompts = prompts or run.defaults.get("prompts") or []
    images = kw["condition_images"] or run.defaults.get("condition_images")
    seeds = list(run.defaults["seeds"]) if kw["recipe"] else _seeds(kw["seed"], n)
    negative = negative or run.defaults.get("negative_prompts") or []
    negatives = run.negatives(len(seeds), negative or None)  # refused first: cheap to check
    start = run.init(len(seeds), **init)  # {} on a replay: the recipe's own
    conditions = run.conditions(len(seeds), prompts or None, images)
    rank, size = distributed.world()
    with distributed.process_group(device):
        mine = distributed.shard(seeds, kw["batch_size"], rank, size)
        index = {s: k for k, s in enumerate(seeds)}
        local = run.draw(
            mine,
            [conditions[index[s]] for s in mine] if conditions else None,
            negatives=[negatives[index[s]] for s in mine] if negatives else None,
            batch_size=kw["batch_size"],
            progress=not quiet and rank == 0,
            init=_rows(start, [index[s] for s in mine]),
        )
        gathered = distributed.gather(local, len(seeds), kw["batch_size"], rank, size)
    if gathered is None:  # not rank 0: rank 0 writes
        return
    from diffplug.output import to_unit

    recipe = run.recipe_for(seeds, prompts or None, images, len(seeds), negative or None)
    recipe.update(start.record() if start is not None else {})
    _write(Samples(to_unit(gathered), recipe), output, kw["overwrite"])


def _rows(start: Any, rows: list[int]) -> Any:
    """The init of this process's shard of samples (``rows`` of the whole draw)."""
    if start is None:
        return None
    mask = None if start.mask is None else start.mask[rows]
    return dataclasses.replace(start, images=start.images[rows], mask=mask)


def _refuse_overwriting_inputs(output: Path, run: Any, kw: dict[str, Any]) -> None:
    """An output that is one of the run's own inputs (the model, its autoencoder, the recipe
    or condition file) would destroy it: refused, even with --overwrite."""
    import os

    inputs = [kw["recipe"], kw["condition_images"], kw["init_image"], kw["mask"],
              getattr(run, "_model_path", None),
              getattr(run, "_autoencoder_path", None)]  # fmt: skip
    target = os.path.realpath(output)
    for item in inputs:
        if item is not None and os.path.realpath(item) == target:
            raise UserError(
                f"output {output} is one of this run's inputs ({item}); write elsewhere"
            )


#: samples one run draws at most (a list of a billion seeds alone is 36 GB)
MAX_SAMPLES = 1_000_000


def _seeds(seed: int, n: int) -> list[int]:
    if n > MAX_SAMPLES:
        raise UserError(
            f"--num-samples {n}: at most {MAX_SAMPLES} per run; draw more in several runs "
            "with --seed (sample k of --seed S is the same in any run)"
        )
    if seed < 0 or seed + n > 2**64:
        raise UserError(f"--seed: seeds {seed} .. {seed + n - 1} must lie in 0 .. 2^64-1")
    return list(range(seed, seed + n))


def _write(samples: Any, output: Path, overwrite: bool) -> None:
    path = samples.save(output, overwrite=overwrite)
    where = f"{path}/" if path.is_dir() else str(path)
    print(f"diffplug: wrote {len(samples)} samples to {where}", file=sys.stderr)
