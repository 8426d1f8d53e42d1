"""``diffplug import-diffusers FOLDER -o OUT.safetensors``: a diffusers folder to a checkpoint.

The checkpoint is an ordinary diffplug denoiser file (``diffusers-unet``): ``diffplug run
--model OUT.safetensors --sampler ddim`` loads it with no folder and no network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.command(name="import-diffusers")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="the checkpoint to write (.safetensors)",
)
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option(
    "--prediction",
    type=click.Choice(["eps", "x0", "v"]),
    default=None,
    help="what the UNet predicts  [default: the scheduler config's, else eps]",
)
@click.option(
    "--beta-schedule",
    default=None,
    type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    help="the training betas  [default: the scheduler config's, else linear]",
)
@click.option("--beta-start", type=float, default=None, help="[default: scheduler config, 1e-4]")
@click.option("--beta-end", type=float, default=None, help="[default: scheduler config, 0.02]")
@click.option(
    "--num-train-timesteps",
    type=click.IntRange(min=2),
    default=None,
    help="training timesteps T  [default: the scheduler config's, else 1000]",
)
@click.option(
    "--rescale-zero-terminal-snr/--no-rescale-zero-terminal-snr",
    default=None,
    help="betas rescaled to zero terminal SNR  [default: the scheduler config's]",
)
@click.option(
    "--variant",
    default=None,
    help="a folder: a weights variant, e.g. fp16; a single file: sd15, sd2, sd2-v or sdxl "
    "(needed for SD 2, whose file does not say eps or v)",
)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="a single file's tokenizer (it holds none): a CLIP tokenizer folder, or a diffusers "
    "SD pipeline folder (tokenizer/, tokenizer_2/)",
)
def import_diffusers(
    folder: Path,
    output: Path,
    overwrite: bool,
    prediction: str | None,
    variant: str | None,
    tokenizer: Path | None,
    **process: object,
) -> None:
    """Convert a local diffusers folder (a UNet folder with config.json and
    diffusion_pytorch_model.safetensors, or a pipeline folder with model_index.json: UNet,
    VAE, text encoders, tokenizers and scheduler, all into one file) or a single-file Stable
    Diffusion checkpoint (the original layout) into a diffplug checkpoint. Safetensors
    weights only; nothing is downloaded."""
    from diffplug import check_output_path

    _refuse_writing_into_the_source(output, folder)
    check_output_path(output, overwrite, {".safetensors": "a checkpoint"})
    from diffplug_diffusers.pipeline import is_pipeline, read_pipeline
    from diffplug_diffusers.single_file import VARIANTS, read_single_file
    from diffplug_diffusers.unet import DiffusersUNet, load_unet, read_folder, resolve_process

    overrides = {k: v for k, v in process.items() if v is not None}
    if folder.is_file() or (folder.is_dir() and is_pipeline(folder)):
        if folder.is_file():
            if variant is not None and variant not in VARIANTS:
                from diffplug import UserError

                raise UserError(f"--variant {variant}: a single file's is one of {VARIANTS}")
            bundle = read_single_file(folder, variant=variant, tokenizer=tokenizer)
        else:
            bundle = read_pipeline(folder, variant=variant, prediction=prediction,
                                   overrides=overrides)  # fmt: skip
        _save(bundle.model, output, bundle.extra, bundle.tensors)
        print(f"diffplug: wrote {output} ({bundle.extra['diffusers']['pipeline']}: UNet, VAE "
              f"and text encoders in one file)", file=sys.stderr)  # fmt: skip
        return
    found = read_folder(folder, variant=variant)
    kind, spec, note = resolve_process(found.scheduler_config, prediction, overrides)
    if note:
        click.echo(f"diffplug: note: {note}", err=True)
    model = DiffusersUNet.from_unet(load_unet(found), prediction=kind, process=spec)
    _save(model, output, found.extra())
    shape = "x".join(map(str, model.sample_shape))
    print(
        f"diffplug: wrote {output} ({found.unet_class} {shape}, {kind} prediction, "
        f"{spec['beta_schedule']} betas, T={spec['num_train_timesteps']}"
        f"{', ' + model.conditioning + '-conditional' if model.conditioning else ''})",
        file=sys.stderr,
    )


def _save(model: object, output: Path, extra: dict, tensors: dict | None = None) -> None:
    from diffplug import save_component

    try:
        save_component(model, output, kind="denoiser", extra=extra, tensors=tensors)  # atomic
    except OSError as exc:  # a full disk: the temporary file is gone, the target untouched
        from diffplug import UserError

        raise UserError(f"cannot write {output}: {exc.strerror or exc}; nothing written") from None


def _refuse_writing_into_the_source(output: Path, folder: Path) -> None:
    """An output that is an existing file of the source folder (its weights, through a
    symlink too) would replace what is being imported: refused, even with --overwrite."""
    from diffplug import UserError

    real, source = Path(os.path.realpath(output)), Path(os.path.realpath(folder))
    if real.is_file() and real.is_relative_to(source):
        raise UserError(
            f"output {output} is one of this import's inputs (a file of {folder}); write elsewhere"
        )
