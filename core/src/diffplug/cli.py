"""The ``diffplug`` command line. Listing commands never import torch.

Exit codes: 0 ok; 2 bad input or usage (one clear line); 1 internal failure; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

import click

from diffplug.errors import (
    AmbiguousComponentError,
    DiffplugError,
    Interrupted,
    NonFiniteError,
    PluginError,
    UnknownComponentError,
    UserError,
)
from diffplug.registry import KINDS, Registry, default_registry, resolve_kind

BUILTIN_COMMANDS = {
    "run": ("diffplug.commands.run:run", "Draw samples from a model with a sampler."),
    "train": ("diffplug.commands.train:train", "Train a denoiser with a method's loss."),
    "eval": (
        "diffplug.commands.evaluate:evaluate",
        "Score samples: digits FD, classes, memorisation.",
    ),
    "new-plugin": ("diffplug.commands.new_plugin:new_plugin", "Write a new plugin package."),
}
PLURALS = {"scheduler": "samplers", "process": "processes", "pretrained": "pretrained models"}


class LazyGroup(click.Group):
    """Commands (core's and plugins') are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(BUILTIN_COMMANDS)
        names |= {e.name for e in default_registry().entries("command")}
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        if name in BUILTIN_COMMANDS:
            module, _, attr = BUILTIN_COMMANDS[name][0].partition(":")
            import importlib

            return getattr(importlib.import_module(module), attr)
        for entry in default_registry().entries("command"):
            if entry.name == name:
                loaded = entry.load()
                if not isinstance(loaded, click.Command):
                    raise PluginError(f"plugin {entry.dist}: {entry.target} is not a click command")
                return loaded
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from their registered summaries: no plugin code is imported."""
        rows = [(n, c.get_short_help_str(60)) for n, c in self.commands.items()]
        rows += [(n, help) for n, (_, help) in BUILTIN_COMMANDS.items()]
        rows += [(e.name, e.summary) for e in default_registry().entries("command")]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffplug")
def cli() -> None:
    """diffplug: diffusion samplers and models as plugins.

    \b
    diffplug plugins                 what is installed
    diffplug list samplers           components of one kind
    diffplug run --sampler ddim      sample the default model to samples.png
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool) -> None:
    """Installed plugins, their versions, components, and load errors."""
    registry = default_registry()
    rows: list[dict[str, Any]] = []
    for info in registry.plugins.values():
        by_kind: dict[str, list[str]] = {}
        for e in info.entries:
            by_kind.setdefault(e.kind, []).append(e.name)
        rows.append(
            {
                "name": info.name,
                "version": info.version,
                "module": info.module,
                "components": by_kind,
                "error": info.error,
                "warnings": info.warnings,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        status = f"  FAILED: {row['error']}" if row["error"] else ""
        click.echo(f"{row['name']} {row['version']}{status}")
        for kind, names in row["components"].items():
            click.echo(f"  {kind}: {', '.join(names)}")
        for warning in row["warnings"]:
            click.echo(f"  warning: {warning}")


@cli.command(name="list")
@click.argument("kind", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_components(kind: str | None, as_json: bool) -> None:
    """Components of KIND (samplers, denoisers, models, ...), or of every kind.

    `list samplers` also gives each sampler's order, denoiser calls per step and whether it
    draws noise: it imports the sampler classes (and torch) to read them; a sampler that
    fails to import is listed with its error. `list datasets` gives each data set's size,
    split, resolution, channels, captions, labels and license, from its `info()` (which
    imports no torch). Every other listing imports no plugin code."""
    registry = default_registry()
    kinds = [resolve_kind(kind)] if kind else list(KINDS)
    data: dict[str, list[dict[str, Any]]] = {
        k: [
            {"name": n, "plugin": registry.get(k, n).dist, "summary": registry.get(k, n).summary}
            for n in registry.names(k)
        ]
        for k in kinds
    }
    facts = kinds == ["scheduler"]  # only when samplers alone are asked for
    if facts:
        for row in data["scheduler"]:
            row.update(_sampler_facts_of(registry.get("scheduler", row["name"])))
    datasets = kinds == ["dataset"]
    if datasets:
        for row in data["dataset"]:
            row.update(_dataset_facts_of(registry.get("dataset", row["name"])))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if datasets:
        _echo_datasets(data["dataset"])
        return
    for k, rows in data.items():
        if not rows and not kind:
            continue
        click.echo(f"{PLURALS.get(k, k + 's')}:")
        width = max([20, *(len(row["name"]) for row in rows)]) if facts else 20
        if facts and rows:
            head = ("order", "calls", "noise", "schedule")
            click.echo(f"  {'name':<{width}} {_columns(head)} summary  [plugin]")
        for row in rows:
            if facts:
                line = " ".join(p for p in (_sampler_columns(row), row["summary"]) if p)
                click.echo(f"  {row['name']:<{width}} {line}  [{row['plugin']}]")
            else:
                click.echo(f"  {row['name']:<{width}} {row['summary']}  [{row['plugin']}]")
        if not rows:
            click.echo("  (none installed)")


#: the keys ``list datasets`` adds to each row (``_dataset_facts_of``)
DATASET_FACTS = ("images", "splits", "resolution", "channels", "captions", "labels", "license")


def _dataset_facts_of(entry: Any) -> dict[str, Any]:
    """A registered data set's ``info()`` as a row's facts, or ``error`` with None facts when
    it cannot be imported, built or asked: one broken plugin never breaks the listing."""
    try:
        info = entry.construct(cls=entry.load()).info()
        facts = {
            "images": int(info.size),
            "splits": {k: int(v) for k, v in info.splits.items()},
            "resolution": [int(v) for v in info.resolution],
            "channels": int(info.channels),
            "captions": bool(info.captions),
            "labels": bool(info.labels),
            "license": str(info.license),
        }
    except (Exception, SystemExit) as exc:  # a plugin's failure, reported in its row
        message = str(exc) if isinstance(exc, DiffplugError) else f"{type(exc).__name__}: {exc}"
        return {**dict.fromkeys(DATASET_FACTS), "error": message}
    return {**facts, "error": None}


def _echo_datasets(rows: list[dict[str, Any]]) -> None:
    """``list datasets``: one line of facts per data set, its summary on the next."""
    click.echo("datasets:")
    if not rows:
        click.echo("  (none installed)")
        return
    width = max([12, *(len(row["name"]) for row in rows)])
    head = ("images", "train/held-out", "size", "channels", "captions", "labels")
    click.echo(f"  {'name':<{width}} {_dataset_columns(head)} license  [plugin]")
    for row in rows:
        if row["error"] is not None:
            line = f"(cannot load: {row['error']})"
        else:
            splits = row["splits"]
            split = f"{splits.get('train', '?')}/{splits.get('heldout', '?')}"
            h, w = row["resolution"]
            channels = f"{row['channels']} ({'grey' if row['channels'] == 1 else 'RGB'})"
            yes = {True: "yes", False: "no"}
            cells = (row["images"], split, f"{h}x{w}", channels, yes[row["captions"]],
                     yes[row["labels"]])  # fmt: skip
            line = f"{_dataset_columns(cells)} {row['license']}"
        click.echo(f"  {row['name']:<{width}} {line}  [{row['plugin']}]")
        if row["summary"]:
            click.echo(f"  {'':<{width}} {row['summary']}")


def _dataset_columns(values: tuple[Any, ...]) -> str:
    """The fixed-width columns of ``list datasets``."""
    widths = (6, 14, 7, 8, 8, 6)
    return " ".join(f"{str(v):<{w}}" for v, w in zip(values, widths, strict=True))


def _sampler_facts_of(entry: Any) -> dict[str, Any]:
    """A registered sampler's facts (``_sampler_facts``), or ``error`` with None facts when
    its class cannot be imported or read: one broken plugin never breaks the listing."""
    try:
        return {**_sampler_facts(entry.load()), "error": None}
    except (Exception, SystemExit) as exc:  # a plugin's failure, reported in its row
        message = str(exc) if isinstance(exc, DiffplugError) else f"{type(exc).__name__}: {exc}"
        return {**dict.fromkeys(SAMPLER_FACTS), "error": message}


def _columns(values: tuple[Any, ...]) -> str:
    """The fixed-width ``order calls noise schedule`` columns of ``list samplers``."""
    return " ".join(f"{str(v):<{w}}" for v, w in zip(values, (5, 5, 14, 8), strict=True))


def _sampler_columns(row: dict[str, Any]) -> str:
    """One ``list samplers`` row's columns: order ("-": not declared), denoiser calls per
    step, noise, whether it takes ``--schedule``; or its load error."""
    if row["error"] is not None:
        return f"(cannot load: {row['error']})"
    order = "-" if row["order"] is None else f"{row['order']:g}"
    schedule = "yes" if row["walks_noise_levels"] else "no"
    return _columns((order, row["evaluations_per_step"], NOISE[row["stochastic"]], schedule))


@cli.command()
@click.argument("name")
@click.option("--kind", help="the kind, when NAME is used by several kinds")
def info(name: str, kind: str | None) -> None:
    """One component (its origin and options), or a checkpoint file (NAME.safetensors: what
    it holds, how it was made, its SHA-256)."""
    registry = default_registry()
    if kind is None and _is_checkpoint_path(registry, name):
        _describe_checkpoint_file(name)
        return
    entry = _find_any(registry, name, kind)
    click.echo(f"{entry.name} ({_kind_label(entry.kind)}) from {entry.dist}")
    if entry.summary:
        click.echo(f"  {entry.summary}")
    click.echo(f"  target: {entry.target}")
    if entry.kind == "pretrained":
        from diffplug.checkpoint import read_metadata

        meta = read_metadata(entry.load())
        click.echo(f"  {meta['kind']} {meta['plugin']}:{meta['name']}")
        for k, v in sorted(meta["config"].items()):
            click.echo(f"    {k} = {v!r}")
        for k, v in sorted(meta["extra"].items()):
            click.echo(f"    [{k}] {v!r}" if not isinstance(v, dict | list) else f"    [{k}] ...")
        return
    obj = entry.load()
    if entry.kind == "scheduler":
        _describe_sampler(obj)
    _describe_options(obj)


#: what ``info`` and ``list samplers`` say of a sampler's noise (``Scheduler.stochastic``)
NOISE = {True: "stochastic", False: "deterministic", None: "set by options"}
#: the keys of ``_sampler_facts``, in order
SAMPLER_FACTS = ("order", "evaluations_per_step", "stochastic", "default_steps",
                 "walks_noise_levels", "default_schedule")  # fmt: skip


def _sampler_facts(cls: Any) -> dict[str, Any]:
    """What a user choosing a sampler asks first (its class attributes, see ``Scheduler``):
    order of accuracy (None: not declared), denoiser calls per step, whether it draws noise
    (None: its options decide, e.g. DDIM's eta), default steps, and whether it takes
    ``--schedule`` (and which one it uses without it; None: its own timesteps)."""
    order = getattr(cls, "order", None)
    walks = bool(getattr(cls, "walks_noise_levels", False))
    default = getattr(cls, "default_schedule", None) if walks else None
    return {
        "order": None if order is None else float(order),
        "evaluations_per_step": int(getattr(cls, "evaluations_per_step", 1)),
        "stochastic": getattr(cls, "stochastic", None),
        "default_steps": getattr(cls, "default_steps", None),
        "walks_noise_levels": walks,
        "default_schedule": default.__name__.lower() if default is not None else None,
    }


def _describe_sampler(cls: Any) -> None:
    """What a user choosing a sampler asks first: order, calls per step, noise, schedule."""
    facts = _sampler_facts(cls)
    order = facts["order"]
    noise = {**NOISE, None: "noise set by its options"}
    click.echo(
        f"  order {order if order is not None else '(not declared)'}, "
        f"{facts['evaluations_per_step']} denoiser call(s) per step, "
        f"{noise[facts['stochastic']]}, default "
        f"{facts['default_steps'] if facts['default_steps'] is not None else '?'} steps"
    )
    if facts["walks_noise_levels"]:
        which = facts["default_schedule"] or "its own timesteps"
        click.echo(f"  takes --schedule NAME (default: {which})")
    else:
        click.echo("  chooses its own steps (no --schedule)")


#: the extra keys a training run records that say how to remake or use the model
RECORDED = ("command", "guidance", "threshold", "conditioner", "autoencoder")


def _is_checkpoint_path(registry: Registry, name: str) -> bool:
    """A .safetensors name (a missing one then says so), or a file that is no component's
    name (a stray file called ``ddim`` in the working directory must not hide the sampler)."""
    if name.lower().endswith(".safetensors"):
        return True
    return os.path.isfile(name) and (os.sep in name or not _kinds_of(registry, name))


def _describe_checkpoint_file(path: str) -> None:
    """What a checkpoint holds, from its validated header alone (no tensor is read)."""
    from diffplug.checkpoint import read_metadata

    meta = read_metadata(path)  # a CheckpointError (exit 2) for a non-diffplug or broken file
    click.echo(path)
    click.echo(f"  kind: {meta['kind']}")
    click.echo(f"  component: {meta['plugin']}:{meta['name']}")
    click.echo(f"  sha256: {_sha256(path)}")
    click.echo("  config:")
    for k, v in sorted(meta["config"].items()):
        click.echo(f"    {k} = {v!r}")
    extra = meta["extra"]
    recorded = [k for k in RECORDED if k in extra] + sorted(set(extra) - set(RECORDED))
    if recorded:
        click.echo("  recorded:")
    for k in recorded:
        click.echo(f"    {k}: {json.dumps(extra[k], sort_keys=True)}")


def _sha256(path: str, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, read in chunks: a checkpoint may be larger than memory allows."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _describe_options(obj: Any) -> None:
    """A component's options with their defaults (nothing for one without a Config)."""
    config = getattr(obj, "Config", None)
    if config is None:
        return
    from diffplug.options import describe

    options = describe(config)
    click.echo("  options:" if options else "  no options")
    for o in options:
        extra = f" (one of: {', '.join(map(str, o.choices))})" if o.choices else ""
        flag = "--" + o.name.replace("_", "-")
        click.echo(f"    {flag:<24} default {o.default!r}: {o.help}{extra}")


def _kind_label(kind: str) -> str:
    return "sampler" if kind == "scheduler" else kind


def _find_any(registry: Registry, name: str, kind: str | None) -> Any:
    """The entry a bare or qualified (``dist:name``) NAME means, whatever its kind."""
    if kind:
        return registry.get(kind, name)
    kinds = _kinds_of(registry, name)
    if not kinds:
        everything = sorted({e.name for k in KINDS for e in registry.entries(k)})
        hints = "".join(f". {h}" for h in registry.missing_hints())
        raise UserError(
            f"nothing named {name!r} is installed; installed: {', '.join(everything)}{hints}"
        )
    if len(kinds) > 1:
        labels = " and a ".join(map(_kind_label, kinds))
        flags = " or ".join(f"--kind {_kind_label(k)}" for k in kinds)
        raise UserError(f"{name!r} names a {labels}; pass {flags}")
    return registry.get(kinds[0], name)


def _kinds_of(registry: Registry, name: str) -> list[str]:
    """The kinds under which a bare or qualified ``name`` is registered, resolved as
    ``registry.get`` resolves them (a name two plugins share still counts)."""
    kinds = []
    for k in KINDS:
        try:
            registry.get(k, name)
        except AmbiguousComponentError:
            pass
        except UnknownComponentError:
            continue
        kinds.append(k)
    return kinds


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning errors into one line and an exit code."""
    debug = os.environ.get("DIFFPLUG_DEBUG", "") not in ("", "0")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # TERM is a Ctrl-C: same clean exit
    try:
        cli.main(args=argv, prog_name="diffplug", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns KeyboardInterrupt into Abort; a clean stop says what it kept
        stop = exc if isinstance(exc, Interrupted) else exc.__cause__
        if isinstance(stop, Interrupted):
            if os.environ.get("RANK", "0") == "0":
                click.echo(f"diffplug: {stop}", err=True)
            sys.exit(130)
        click.echo("diffplug: interrupted; nothing partial was written", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code == 2 else exc.exit_code)
    except (UserError, PluginError) as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"diffplug: error: {exc}", err=True)
        sys.exit(2)
    except NonFiniteError as exc:
        click.echo(f"diffplug: error: {exc}", err=True)
        sys.exit(1)
    except (DiffplugError, Exception) as exc:  # an internal failure: short, with a way to see more
        if debug:
            traceback.print_exc()
        click.echo(
            f"diffplug: internal error: {type(exc).__name__}: {exc} (DIFFPLUG_DEBUG=1 shows "
            "the traceback)",
            err=True,
        )
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(0)
