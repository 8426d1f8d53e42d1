"""``diffplug train``: train a denoiser with a method's loss on a registered data set
(``--data digits``, a plugin's, `diffplug list datasets`) or a folder of images (streamed by
DataLoader workers: ``diffplug.streaming``), with metrics.jsonl and preview grids on the way.

A method that trains another kind (``Method.trains``, e.g. ``autoencoder``) gets its model
from that registry kind; ``--denoiser`` then names that model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from diffplug.errors import OptionError, UserError


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Other --OPTIONs go to the method, the denoiser, the conditioner or the loop, "
    "whichever has them (`diffplug info METHOD`, `diffplug info DENOISER`, "
    "`diffplug info lowres`).",
)
@click.option("--method", required=True, help="training method (`diffplug list methods`)")
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="a data set (`diffplug list datasets`) or an image folder",
)
@click.option(
    "--size",
    type=click.IntRange(min=4, max=4096),
    default=None,
    help="pixels  [default: the data set's; a folder's: its most common short side]",
)
@click.option(
    "--channels",
    type=click.Choice(["1", "3"]),
    default=None,
    help="[default: the data set's; a folder's: 3 if any image has colour, else 1]",
)
@click.option(
    "--crop",
    type=click.Choice(["centre", "center", "random"]),
    default="centre",
    show_default=True,
    help="a folder's square crop after resizing the short side to --size: centred, or at a "
    "random offset per draw",
)
@click.option("--hflip", is_flag=True, help="mirror a folder's images at random, per draw")
@click.option(
    "--labels-from-folders",
    is_flag=True,
    help="class labels from a folder's sub-folders (sorted names -> 0..K-1)",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="DataLoader workers reading a folder (0: the main process)  [default: 2]",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="steps between lines of OUT/metrics.jsonl (0: none)",
)
@click.option(
    "--preview-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="steps between preview grids OUT/previews/step-N.png from the EMA weights (0: none)",
)
@click.option(
    "--preview-steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="sampler steps of a preview",
)
@click.option(
    "--preview-count",
    type=click.IntRange(min=1, max=256),
    default=16,
    show_default=True,
    help="samples per preview (a class model: one per class)",
)
@click.option(
    "--preview-sampler",
    default=None,
    help="sampler of the previews  [default: DDIM, or the first that runs the model]",
)
@click.option(
    "--denoiser",
    default=None,
    help="denoiser name (default: the method's); an autoencoder's for an autoencoder method",
)
@click.option(
    "--conditioner",
    default=None,
    help="builds each batch's condition from its images, e.g. lowres (super-resolution)",
)
@click.option(
    "--autoencoder",
    default=None,
    help="train in this autoencoder's latent space (a pretrained name or a .safetensors path); "
    "the model records it and `run` decodes through it",
)
@click.option("--steps", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--out", default=None, help="output directory (default: runs/METHOD)")
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in --out")
@click.option("--overwrite", is_flag=True, help="start over in an --out that has a run")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="pause at this step (checkpointed; the LR schedule still spans --steps)",
)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.pass_context
def train(ctx: click.Context, **kw: Any) -> None:
    """Train a denoiser (or an autoencoder, by its method); the EMA weights land in
    OUT/model.safetensors."""
    from diffplug.resolve import parse_extra_options

    extras = parse_extra_options(list(ctx.args))
    out = Path(kw.pop("out") or f"runs/{kw['method']}")
    if (out / "latest").exists() and not (kw["resume"] or kw["overwrite"]):
        raise UserError(f"{out} already holds a run; pass --resume to continue or --overwrite")
    if kw["resume"] and not (out / "latest").exists():
        raise UserError(f"--resume: {out} has no checkpoint to resume from")
    if kw["resume"] and kw["overwrite"]:
        raise UserError("--resume and --overwrite contradict each other")
    _check_out(out)
    _train(out, extras, **kw)


def _check_out(out: Path) -> None:
    """--out must be a directory we can write, checked before any step (not when the first
    checkpoint is due, which loses the run); what a killed run's checkpoint write left
    behind is removed (and said) by the training loop (``training.clean_stale``)."""
    import os

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


def _no_default_model(registry: Any, method: str, kind: str) -> str:
    """Why training cannot start: the method names no default model, so one must be chosen."""
    installed = ", ".join(registry.names(kind)) or "none installed"
    return (
        f"method {method} names no default {kind}: pass --denoiser NAME "
        f"(installed {kind}s: {installed})"
    )


def _train(out: Path, extras: dict[str, str], **kw: Any) -> None:
    import dataclasses
    import inspect

    import torch

    from diffplug.data import open_data
    from diffplug.options import build_config, describe
    from diffplug.previews import PreviewConfig
    from diffplug.registry import default_registry
    from diffplug.run import resolve_device
    from diffplug.streaming import FolderData
    from diffplug.training import TrainConfig, check_conditioner, check_guidance, train

    registry = default_registry()
    method_cls = registry.load("method", kw["method"])
    kind = method_cls.trains  # "denoiser", or another component kind (an autoencoder)
    denoiser_name = kw["denoiser"] or method_cls.default_denoiser
    if denoiser_name is None:
        raise UserError(_no_default_model(registry, kw["method"], kind))
    denoiser_cls = registry.load(kind, denoiser_name)

    def owned(cls: type) -> set[str]:
        return {o.name for o in describe(cls)}

    if kw["conditioner"] and kind != "denoiser":
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(
            f"--conditioner is for denoisers; method {kw['method']} trains {article} {kind}"
        )
    conditioner_entry = (
        registry.get("conditioner", kw["conditioner"]) if kw["conditioner"] else None
    )
    conditioner_cls = conditioner_entry.load() if conditioner_entry else None

    groups: dict[str, dict[str, str]] = {
        "method": {},
        "denoiser": {},
        "loop": {},
        "conditioner": {},
    }
    owners = [
        ("method", owned(method_cls.Config)),
        ("loop", owned(TrainConfig)),
        ("denoiser", owned(denoiser_cls.Config)),
        ("conditioner", owned(conditioner_cls.Config) if conditioner_cls else set()),
    ]
    for key, value in extras.items():
        owner = next((name for name, keys in owners if key in keys), None)
        if owner is None:
            every = sorted(set().union(*(keys for _, keys in owners)))
            kinds = f"method, {kind}" + (", conditioner or loop" if conditioner_cls else " or loop")
            raise OptionError(
                f"no {kinds} option --{key.replace('_', '-')}; options: "
                + ", ".join("--" + k.replace("_", "-") for k in every)
            )
        groups[owner][key] = value
        # the denoiser and its conditioner describe one interface (a super-resolution
        # stage's --low-size): an option both declare goes to both
        if owner == "denoiser" and key in owners[3][1]:
            groups["conditioner"][key] = value
    method = method_cls(build_config(method_cls.Config, groups["method"], owner=kw["method"]))
    loop = build_config(
        TrainConfig,
        {**groups["loop"], "steps": kw["steps"], "batch_size": kw["batch_size"]},
        owner="train",
    )
    channels = int(kw["channels"]) if kw["channels"] is not None else None
    # a folder's captions are read for a conditioner that takes them (text, clip)
    captions = conditioner_cls is not None and (
        "captions" in inspect.signature(conditioner_cls.from_data).parameters
    )
    data = open_data(kw["data"], kw["size"], channels, registry, crop=kw["crop"],
                     hflip=kw["hflip"], labels_from_folders=kw["labels_from_folders"],
                     captions=captions, workers=kw["workers"])  # fmt: skip
    log = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    # unset --size / --channels: the data's own (a folder's inferred from its images)
    if isinstance(data, FolderData):
        log(f"diffplug: {data.describe()}", file=sys.stderr)
        kw["size"], kw["channels"] = data.size, str(data.channels)
    else:
        kw["size"], kw["channels"] = int(data.images.shape[-1]), str(int(data.images.shape[1]))
    # the data's shape goes to a model that has these options (every denoiser does)
    shape = {"channels": int(kw["channels"]), "size": kw["size"]}
    latent_record, autoencoder = None, None
    if kw["autoencoder"] is not None:
        if kind != "denoiser":
            raise UserError(
                f"--autoencoder is for denoisers; method {kw['method']} trains a {kind}"
            )
        from diffplug.latent import autoencoder_record, encode_dataset, load_autoencoder

        autoencoder = load_autoencoder(kw["autoencoder"], registry)
        if isinstance(data, FolderData):
            if data.hflip or data.crop == "random":
                raise UserError(
                    "--hflip and --crop random change the pixels per draw; with --autoencoder "
                    "the images are encoded once (train without them)"
                )
            data = data.in_memory()
        data = encode_dataset(autoencoder, data)  # once: the posterior means, scaled
        latent = data.images.shape[1:]
        shape = {"channels": int(latent[0]), "size": int(latent[-1])}
        latent_record = autoencoder_record(autoencoder, kw["autoencoder"])
    classes = data.classes if isinstance(data, FolderData) else ()
    # labels from sub-folders make a class-conditional denoiser of that many classes
    class_defaults = {}
    if classes and conditioner_cls is None and kind == "denoiser":
        class_defaults = {"conditioning": "class", "num_classes": len(classes)}
    denoiser_options = {
        **{k: v for k, v in {**shape, **class_defaults}.items() if k in owned(denoiser_cls.Config)},
        **method.denoiser_defaults(),
        **groups["denoiser"],
    }
    given = denoiser_options.get("num_classes")
    if classes and given is not None and int(given) < len(classes):
        raise UserError(
            f"--num-classes {given}: the data has {len(classes)} classes (its sub-folders)"
        )
    torch.manual_seed(loop.seed)
    denoiser = denoiser_cls.from_options(**denoiser_options)
    conditioner = None
    if conditioner_entry is not None:
        from diffplug.conditioners import build_conditioner

        # a condition made from the images has the images' shape unless told otherwise
        data_shape = {"channels": kw["channels"], "image_size": kw["size"]}
        conditioner = build_conditioner(registry, kw["conditioner"], groups["conditioner"],
                                        data_shape)  # fmt: skip
    if kind == "denoiser":
        check_conditioner(denoiser, conditioner)  # before --overwrite deletes anything
    check_guidance(denoiser, loop.guidance)
    if kw["overwrite"] and out.exists() and os.environ.get("RANK", "0") == "0":
        import shutil

        for item in [out / "latest", out / "model.safetensors", *out.glob("state-*"),
                     out / "metrics.jsonl", out / "previews"]:  # fmt: skip
            if item.is_dir():
                shutil.rmtree(item)
            elif item.exists():
                item.unlink()
    from diffplug import distributed

    device = distributed.local_device(resolve_device(kw["device"]))
    params = sum(p.numel() for p in denoiser.parameters())
    log(
        f"diffplug: training {denoiser_name} ({params / 1e6:.2f}M parameters) with "
        f"{kw['method']} on {len(data)} images, {loop.steps} steps -> {out}",
        file=sys.stderr,
    )
    extra = {
        "method": {"name": kw["method"], **dataclasses.asdict(method.config)},
        "data": {
            "spec": kw["data"],
            "size": kw["size"],
            "channels": int(kw["channels"]),
            "images": len(data),
            # a registered data set: its name, plugin, version, split, license; a folder: its
            # path, what was inferred, crop, flips, class names, captions and skips
            **(data.record() if isinstance(data, FolderData) else data.source),
        },
        "command": " ".join(["diffplug", "train", *sys.argv[2:]]),
        **({"autoencoder": latent_record} if latent_record is not None else {}),
    }
    preview = None
    if kw["preview_every"]:
        preview = PreviewConfig(kw["preview_every"], kw["preview_steps"], kw["preview_count"],
                                kw["preview_sampler"], seed=loop.seed)  # fmt: skip
    with distributed.process_group(device):
        result = train(
            denoiser,
            method,
            data,
            loop,
            out,
            resume=kw["resume"],
            device=device,
            progress=not kw["quiet"],
            extra=extra,
            stop_after=kw["stop_after"],
            conditioner=conditioner,
            log_every=kw["log_every"],
            preview=preview,
            autoencoder=autoencoder,
        )
    log(
        f"diffplug: done: {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.images_per_second:.0f} images/s; model at {out / 'model.safetensors'}",
        file=sys.stderr,
    )
    del torch
