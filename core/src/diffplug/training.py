"""The one training loop: AdamW, warm-up, gradient clipping, EMA, mixed precision on GPUs,
atomic checkpoints and exact resume.

Layout of an output directory::

    model.safetensors          the EMA model: `diffplug run --model DIR/model.safetensors`
    state-<step>/              raw weights, optimizer, RNG (safetensors) and state.json
    latest                     the name of the newest complete state directory
    metrics.jsonl              a line every --log-every steps (``diffplug.trainlog``)
    previews/step-<N>.png      grids from the EMA weights (``diffplug.previews``)

A state directory is complete and durable (every file fsynced, renamed into place) before
``latest`` (written atomically) names it, ``model.safetensors`` is written after ``latest``
and older states are removed last, so a crash or power loss at any moment leaves a resumable
run; a full disk is one error line naming the checkpoint that still stands, and what a
killed write left behind (``.tmp-state-N/``, temporary files) goes at the next run. Every
random draw comes from one generator whose state is saved (a streamed folder's batches from
the step number: ``diffplug.streaming``), so N steps in one run equal N/2 steps, a resume, and
N/2 more, with or without previews.

The model is a denoiser unless the method trains another kind (``Method.trains``, e.g. an
autoencoder): the loop is the same, model.safetensors records that kind (an autoencoder's is
loaded with ``load_component(path, kind="autoencoder")``, not ``run --model``), and
conditioners and class labels are denoiser-only.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffplug import distributed
from diffplug.atomic import atomic_path, atomic_write, fsync_dir, report_removed, stale_temp_files
from diffplug.checkpoint import CONDITIONER_PREFIX, identify, load_tensors, save_component
from diffplug.components import Autoencoder, Conditioner, Denoiser
from diffplug.data import Dataset
from diffplug.errors import CheckpointError, Interrupted, UserError
from diffplug.method import Method
from diffplug.options import option
from diffplug.previews import PreviewConfig, Previewer
from diffplug.streaming import FolderData, Stream
from diffplug.trainlog import FILE as METRICS_FILE
from diffplug.trainlog import MetricsLog


@dataclass
class TrainConfig:
    steps: int = option(20000, "optimizer steps", min=1)
    batch_size: int = option(128, "images per step", min=1)
    lr: float = option(1e-3, "peak learning rate", min=0.0, min_exclusive=True)
    lr_schedule: str = option("cosine", "after warm-up", choices=("constant", "cosine"))
    warmup: int = option(500, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm (0: off)", min=0.0)
    ema_decay: float = option(
        0.999, "EMA decay (the EMA weights are used for sampling)", min=0.0, max=1.0
    )
    ema_warmup: bool = option(True, "ramp the EMA decay as min(decay, (1+n)/(10+n))")
    cond_dropout: float = option(
        0.1, "probability of replacing a condition by the null one (guidance)", min=0.0, max=1.0
    )
    guidance: float = option(
        1.0, "the guidance weight `run` uses by default for this model (recorded; 1 = none)",
        min=0.0,
    )  # fmt: skip
    precision: str = option(
        "auto", "bf16 autocast on CUDA with auto", choices=("auto", "fp32", "bf16")
    )
    checkpoint_every: int = option(1000, "steps between checkpoints", min=1)
    seed: int = option(0, "seed of every random draw")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    images_per_second: float
    seconds: float
    losses: list[float]


def lr_at(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Trainer:
    """Holds the model, its EMA copy, the optimizer and the generator; runs steps."""

    def __init__(
        self,
        denoiser: Denoiser | Autoencoder,
        method: Method,
        data: Dataset | FolderData,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        conditioner: Conditioner | None = None,
    ) -> None:
        #: the component kind trained, recorded in model.safetensors
        self.kind = method.trains
        if self.kind == "denoiser":
            check_conditioner(denoiser, conditioner)  # type: ignore[arg-type]
        elif conditioner is not None:
            raise UserError(f"only denoisers train with a conditioner, not the {self.kind}")
        self.config = config
        self.device = torch.device(device)
        self.model = denoiser.to(self.device).train()
        self.conditioner = conditioner.to(self.device).train() if conditioner is not None else None
        # a trainable conditioner (a text encoder learned from scratch) trains with the model
        self.joint = self.conditioner if conditioner is not None and conditioner.trainable else None
        self.params = [*self.model.parameters(),
                       *(self.joint.parameters() if self.joint is not None else ())]  # fmt: skip
        self.ema = [p.detach().clone() for p in self.params]
        self.method = method
        self.rank, self.world = distributed.world()
        # a folder streams from DataLoader workers; data in memory is indexed on the device
        self.stream = None
        self.data_record = None  # what a resume must share with the run (a folder's)
        if isinstance(data, FolderData):
            self.stream = Stream(data, config.batch_size, config.seed, self.rank, self.device)
            self.data_record = data.resume_record()
            self.images, self.labels = None, None
        else:
            self.images = data.images.to(self.device)
            self.labels = data.labels.to(self.device) if data.labels is not None else None
        # each image's captions; one per image is drawn for every batch it is in
        self.captions = data.captions if _takes_captions(conditioner) else None
        #: the last step's total gradient norm before clipping (a device tensor), its
        #: learning rate and EMA decay: what metrics.jsonl reports
        self.grad_norm: torch.Tensor | None = None
        self.lr, self.decay = 0.0, 0.0
        # the fused kernel: one pass over all parameters (5x faster than the default on CPU)
        self.opt = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        # one stream per rank: ranks draw different batches and noise, reproducibly
        self.generator = torch.Generator().manual_seed(config.seed + 1_000_003 * self.rank)
        self.forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            torch.manual_seed(config.seed + 1_000_003 * self.rank)  # own dropout masks per rank

            self.forward = _Forward(self.model, DistributedDataParallel(self.model))
        self.step = 0
        self._writing = Path()  # the file a checkpoint write is at (named if it fails)
        bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.class_conditional = (
            conditioner is None
            and self.kind == "denoiser"
            and denoiser.conditioning == "class"  # type: ignore[union-attr]
            and data.labels is not None
        )
        if self.class_conditional:
            self.null_label = denoiser.null_label  # type: ignore[union-attr]

    def batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """This step's clean images and their condition. In memory, the images and the
        captions' phrasings are drawn from the trainer's generator; streamed, from the
        step's own stream (``diffplug.streaming``). The condition and its dropout draw from
        the trainer's generator either way."""
        captions = None
        if self.stream is not None:
            x0, labels, streamed = self.stream.batch(self.step)
            if self.captions is not None and self.conditioner is not None:
                captions = streamed
        else:
            idx = torch.randint(
                0, len(self.images), (self.config.batch_size,), generator=self.generator
            )
            idx = idx.to(self.device)
            x0 = self.images[idx]
            labels = self.labels[idx] if self.labels is not None else None
            if self.captions is not None and self.conditioner is not None:
                captions = draw_captions(self.captions, idx.tolist(), self.generator)
        n = len(x0)
        if self.conditioner is not None:
            if captions is None:
                cond = self.conditioner.from_data(x0, self.generator, labels)
            else:
                cond = self.conditioner.from_data(x0, self.generator, labels, captions=captions)
            if self.config.cond_dropout > 0:
                drop = torch.rand(n, generator=self.generator) < self.config.cond_dropout
                cond = self.conditioner.drop(cond, drop.to(self.device))
            return x0, cond
        if not self.class_conditional:
            return x0, None
        assert labels is not None
        labels = labels.clone()
        drop = torch.rand(n, generator=self.generator).to(self.device)
        labels[drop < self.config.cond_dropout] = self.null_label
        return x0, {"labels": labels}

    def close(self) -> None:
        """Stop a streamed folder's loader workers."""
        if self.stream is not None:
            self.stream.close()

    def train_step(self) -> torch.Tensor:
        cfg = self.config
        self.lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        x0, cond = self.batch()
        with self.autocast:
            loss = self.method.loss(self.forward, x0, cond, self.generator)  # type: ignore[arg-type]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.joint is not None and self.world > 1:  # outside DDP: average its gradients
            distributed.average_gradients(self.joint.parameters())
        if cfg.grad_clip > 0:  # the norm before clipping, left on the device
            self.grad_norm = torch.nn.utils.clip_grad_norm_(
                self.params, cfg.grad_clip, foreach=True
            )
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        self.opt.step()
        decay = cfg.ema_decay
        if cfg.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        self.decay = decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        self.step += 1
        return loss.detach()

    # -- checkpoints ---------------------------------------------------------------------
    def raw_state(self) -> dict[str, torch.Tensor]:
        """The denoiser's state dict, plus a trained conditioner's under ``conditioner.``."""
        state = dict(self.model.state_dict())
        if self.joint is not None:
            state.update({CONDITIONER_PREFIX + k: v for k, v in self.joint.state_dict().items()})
        return state

    def ema_state(self) -> dict[str, torch.Tensor]:
        state = self.raw_state()
        names = [n for n, _ in self.model.named_parameters()]
        if self.joint is not None:
            names += [CONDITIONER_PREFIX + n for n, _ in self.joint.named_parameters()]
        for name, value in zip(names, self.ema, strict=True):
            state[name] = value
        return state

    def save(self, out: Path, extra: dict[str, Any]) -> None:
        """Write a complete state directory, then point ``latest`` at it, then the EMA model,
        then remove the older states (rank 0 writes everything but each rank's own RNG state).

        Every file is fsynced, the directory renamed into place and ``out`` fsynced before
        ``latest`` names it, and ``latest`` is durable before any older state is removed: at
        any moment, power loss included, ``latest`` names a complete state and
        ``model.safetensors`` is never newer than it. A step whose state ``latest`` already
        names is not written again (the only complete state is never replaced in place). A
        write that fails (disk full) on any rank removes the partial state and raises
        ``UserError`` on every rank, naming the last complete checkpoint: no rank is left
        waiting for one that gave up."""
        state_dir = out / f"state-{self.step:08d}"
        tmp_dir = out / f".tmp-state-{self.step:08d}"
        if latest_state(out) == state_dir.name:  # every rank reads the same file
            if self.rank == 0 and model_step(out) != self.step:  # a write died before it
                self._together(out, lambda: self._mend_model(out, state_dir, extra))
            else:
                self._together(out, lambda: None)
            return
        self._together(out, lambda: self._make_temporary(out, tmp_dir), tmp_dir)
        self._together(out, lambda: self._write_rng(tmp_dir), tmp_dir)
        self._together(out, lambda: self._write_state(out, state_dir, tmp_dir, extra), tmp_dir)

    def _mend_model(self, out: Path, state_dir: Path, extra: dict[str, Any]) -> None:
        self.save_model(out, extra)
        _rotate(out, state_dir.name)

    def _make_temporary(self, out: Path, tmp_dir: Path) -> None:
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()

    def _write_rng(self, tmp_dir: Path) -> None:
        """Each rank's own RNG state (the others are rank 0's to write)."""
        from safetensors.torch import save_file

        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        self._file(tmp_dir / f"rng-{self.rank}.safetensors", lambda p: save_file(rng, str(p)))

    def _write_state(
        self, out: Path, state_dir: Path, tmp_dir: Path, extra: dict[str, Any]
    ) -> None:
        from safetensors.torch import save_file

        if self.rank != 0:
            return
        raw, ema = _contiguous(self.raw_state()), _contiguous(dict(enumerate(self.ema)))
        self._file(tmp_dir / "raw.safetensors", lambda p: save_file(raw, str(p)))
        self._file(tmp_dir / "ema.safetensors", lambda p: save_file(ema, str(p)))
        opt_tensors, opt_meta = _flatten_optimizer(self.opt.state_dict())
        self._file(tmp_dir / "optimizer.safetensors", lambda p: save_file(opt_tensors, str(p)))
        text = json.dumps(
            {"step": self.step, "world": self.world, "train": dataclasses.asdict(self.config),
             "optimizer": opt_meta, "model": dataclasses.asdict(self.model.config),
             **({"data": self.data_record} if self.data_record is not None else {})},
            indent=1)  # fmt: skip
        self._file(tmp_dir / "state.json", lambda p: p.write_text(text))
        fsync_dir(tmp_dir)
        self._writing = state_dir
        if state_dir.exists():  # a stale one (never what `latest` names: see save)
            shutil.rmtree(state_dir)
        tmp_dir.rename(state_dir)
        fsync_dir(out)
        self._writing = out / "latest"
        atomic_write(out / "latest", lambda p: p.write_text(state_dir.name))  # fsyncs both
        self.save_model(out, extra)  # after `latest`: never newer than the state it names
        _rotate(out, state_dir.name)  # only now: the new state and its model are durable

    def save_model(self, out: Path, extra: dict[str, Any]) -> None:
        """Write the EMA model, ``out/model.safetensors`` (atomically, fsynced)."""
        self._writing = out / "model.safetensors"
        save_component(self.model, out / "model.safetensors", kind=self.kind,
                       tensors=self.ema_state(), extra=extra)  # fmt: skip

    def _file(self, path: Path, write: Callable[[Path], None]) -> None:
        """``write(path)``, then fsync it: its bytes are on disk before anything names it."""
        self._writing = path
        write(path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())

    def _together(self, out: Path, write: Callable[[], None], tmp_dir: Path | None = None) -> None:
        """Run ``write`` on every rank, then learn whether it failed on any (this is also the
        ranks' barrier). An OSError (a full disk, a vanished folder) anywhere removes the
        partial state and becomes one ``UserError`` line on every rank, naming the last
        complete checkpoint."""
        self._writing = out
        failure: OSError | None = None
        try:
            write()
        except OSError as exc:
            failure = exc
        except KeyboardInterrupt:  # a second Ctrl-C mid-write: the partial state goes now
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        if not distributed.any_rank(failure is not None):
            return
        if tmp_dir is not None and (failure is not None or self.rank == 0):
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if failure is not None:
            raise UserError(_write_failure(failure, self._location(out), out)) from None
        raise UserError(
            f"another process could not write the checkpoint in {out} (its error says why); "
            f"{_still_standing(out)}"
        )

    def _location(self, out: Path) -> str:
        """The file being written, named where it lands (``state-N/x``, not the temp dir)."""
        path = self._writing
        if path.parent.name.startswith(".tmp-state-"):
            return str(out / path.parent.name.removeprefix(".tmp-") / path.name)
        return str(path)

    def load(self, out: Path) -> None:
        latest = out / "latest"
        if not latest.is_file():
            raise UserError(f"--resume: {out} has no checkpoint to resume from")
        state_dir = out / latest.read_text().strip()
        try:
            meta = json.loads((state_dir / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"--resume: cannot read {state_dir}: {exc}") from None
        self._check_same_run(meta)
        try:
            raw = load_tensors(state_dir / "raw.safetensors")
            own = {k: v for k, v in raw.items() if not k.startswith(CONDITIONER_PREFIX)}
            self.model.load_state_dict(own)
            if self.joint is not None:
                n = len(CONDITIONER_PREFIX)
                self.joint.load_state_dict(
                    {k[n:]: v for k, v in raw.items() if k.startswith(CONDITIONER_PREFIX)}
                )
            ema = load_tensors(state_dir / "ema.safetensors")
            for i, p in enumerate(self.ema):
                p.copy_(ema[str(i)])
            self.opt.load_state_dict(
                _unflatten_optimizer(
                    load_tensors(state_dir / "optimizer.safetensors"), meta["optimizer"]
                )
            )
            if meta.get("world", 1) != self.world:
                raise UserError(
                    f"--resume: {state_dir} was written by {meta.get('world', 1)} processes; "
                    f"resume it with as many (this run has {self.world})"
                )
            rng = load_tensors(state_dir / f"rng-{self.rank}.safetensors")
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"--resume: cannot read {state_dir}: {exc}") from None
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        self.step = int(meta["step"])

    def _check_same_run(self, meta: dict[str, Any]) -> None:
        """A resumed run must be the run it continues: the model's config and every option
        that changes the steps are compared with the recorded ones (``--steps`` may grow:
        the learning-rate schedule then spans the new length), naming what differs."""
        changes = []
        recorded, current = meta.get("model", {}), dataclasses.asdict(self.model.config)
        changes += [f"model {k} {current[k]!r} (the run has {recorded[k]!r})"
                    for k in current if k in recorded and recorded[k] != current[k]]  # fmt: skip
        recorded, current = meta.get("train", {}), dataclasses.asdict(self.config)
        free = {"steps", "checkpoint_every", "guidance"}  # none changes a step
        changes += [f"--{k.replace('_', '-')} {current[k]!r} (the run has {recorded[k]!r})"
                    for k in current if k not in free and k in recorded
                    and recorded[k] != current[k]]  # fmt: skip
        recorded, current = meta.get("data") or {}, self.data_record or {}
        changes += [f"data {k} {current[k]!r} (the run has {recorded[k]!r})"
                    for k in current if k in recorded and recorded[k] != current[k]]  # fmt: skip
        if changes:
            raise UserError(
                f"--resume would change the run: {'; '.join(changes[:4])}; resume with the "
                "run's own options (or start a new run in another --out)"
            )


def _takes_captions(conditioner: Conditioner | None) -> bool:
    """Whether the conditioner's ``from_data`` reads captions (older ones take labels only)."""
    if conditioner is None:
        return False
    return "captions" in inspect.signature(conditioner.from_data).parameters


def draw_captions(
    captions: list[list[str]], index: list[int], generator: torch.Generator
) -> list[str]:
    """One of each indexed image's captions, uniformly, drawn from ``generator``."""
    u = torch.rand(len(index), generator=generator, dtype=torch.float64).tolist()
    return [captions[i][min(int(r * len(captions[i])), len(captions[i]) - 1)]
            for i, r in zip(index, u, strict=True)]  # fmt: skip


def check_conditioner(denoiser: Denoiser, conditioner: Conditioner | None) -> None:
    """Refuse, before any step, a conditioner that cannot feed this denoiser."""
    wanted = denoiser.conditioning
    if conditioner is None:
        if wanted not in (None, "class"):  # class labels come with the data
            raise UserError(
                f"the denoiser expects {wanted} conditioning: train it with a conditioner that "
                "builds it from the images (--conditioner lowres for 'image')"
            )
        return
    if conditioner.kind != wanted:
        name = conditioner.name or type(conditioner).__name__
        raise UserError(
            f"conditioner {name} gives {conditioner.kind or 'no'} conditioning but the denoiser "
            f"expects {wanted or 'none'}"
        )


def check_guidance(model: Any, guidance: float) -> None:
    """A recommended guidance weight only means something for a conditional denoiser."""
    if guidance != 1.0 and getattr(model, "conditioning", None) is None:
        raise UserError(
            f"--guidance {guidance:g}: the model is unconditional; there is nothing to guide"
        )


#: a state directory being written (``Trainer.save``): a killed run may leave one behind
TEMP_STATE = re.compile(r"^\.tmp-state-\d{8}$")
#: the files of an output directory that ``Trainer.save`` writes through ``atomic_path``
ATOMIC_FILES = ("model.safetensors", "latest")


def latest_state(out: Path) -> str | None:
    """The state directory ``out/latest`` names, or None."""
    try:
        return (out / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def model_step(out: Path) -> int | None:
    """The step ``out/model.safetensors`` records (None: missing or unreadable)."""
    from diffplug.checkpoint import read_metadata

    try:
        step = read_metadata(out / "model.safetensors")["extra"].get("step")
    except (UserError, OSError):
        return None
    return step if isinstance(step, int) else None


def clean_stale(out: Path) -> list[str]:
    """Remove what a killed checkpoint write left in ``out``: ``.tmp-state-N/`` folders and
    the temporary files of ``model.safetensors`` and ``latest`` whose writer is dead. Says
    so in one stderr line; never touches another file. Returns the names removed."""
    if not out.is_dir():
        return []
    removed = []
    for path in sorted(out.iterdir()):
        if TEMP_STATE.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name + "/")
    removed += [p.name for name in ATOMIC_FILES for p in stale_temp_files(out, name)
                if _unlinked(p)]  # fmt: skip
    if removed:
        report_removed(out, removed)
    return removed


def _rotate(out: Path, keep: str) -> None:
    """Remove every state directory but ``keep`` (the one ``latest`` durably names)."""
    for old in out.glob("state-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _unlinked(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _write_failure(exc: OSError, location: str, out: Path) -> str:
    """One line: what could not be written, why, and the checkpoint that still stands."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on device while writing {location}"
    else:
        what = f"cannot write {location}: {exc.strerror or exc}"
    return f"{what}; {_still_standing(out)}"


def _complete_state(out: Path) -> tuple[Path, int | None] | None:
    """The complete state ``latest`` names, with its step (None if unreadable), or None."""
    name = latest_state(out)
    if name is None or not (out / name / "state.json").is_file():
        return None
    try:
        return out / name, int(json.loads((out / name / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return out / name, None


def _kept(out: Path) -> str:
    """What an aborted save left resumable (it may have got as far as naming its state)."""
    state = _complete_state(out)
    if state is None:
        return "nothing was saved"
    where = state[0] if state[1] is None else f"step {state[1]}"
    return f"{out} keeps its checkpoint at {where} (continue with --resume)"


def _still_standing(out: Path) -> str:
    """The checkpoint in ``out`` that a failed write left complete, in words."""
    state = _complete_state(out)
    if state is None:
        return "no checkpoint is complete yet"
    path, step = state
    if step is None:
        return f"the last complete checkpoint is {path}"
    return (
        f"the last complete checkpoint is step {step} at {path} "
        "(free space, then continue with --resume)"
    )


def conditioner_record(conditioner: Conditioner) -> dict[str, Any]:
    """What a checkpoint keeps of its conditioner so that sampling can rebuild it."""
    plugin, name = identify(conditioner, "conditioner")
    return {
        "plugin": plugin,
        "name": name,
        "config": dataclasses.asdict(conditioner.config),
        # its weights are in the model's file, under CONDITIONER_PREFIX
        "weights": conditioner.trainable,
    }


class _Forward:
    """The model's attributes, but calls go through DistributedDataParallel."""

    def __init__(self, module: Denoiser | Autoencoder, ddp: torch.nn.Module) -> None:
        self.module, self.ddp = module, ddp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp(*args, **kwargs)


class _Signals:
    """While active, SIGINT and SIGTERM set ``caught`` instead of interrupting; a second one
    interrupts at once (KeyboardInterrupt). Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.caught: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.caught is not None:
            raise KeyboardInterrupt
        self.caught = signum

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _contiguous(state: dict[Any, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(k): v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    scalars: dict[str, Any] = {}
    for idx, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def train(
    denoiser: Denoiser | Autoencoder,
    method: Method,
    data: Dataset | FolderData,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
    conditioner: Conditioner | None = None,
    log_every: int = 0,
    preview: PreviewConfig | None = None,
    autoencoder: Autoencoder | None = None,
) -> TrainResult:
    """Train to ``config.steps`` steps, checkpointing into ``out``; resumes with ``resume``.

    ``denoiser`` is the model trained: a denoiser, or the kind ``method.trains`` names.
    ``data`` is in memory (``Dataset``) or a folder streamed by DataLoader workers
    (``diffplug.streaming.FolderData``); either resumes exactly.

    ``stop_after`` pauses at that step (with a checkpoint) without changing the learning-rate
    schedule, which spans ``config.steps``: a later ``resume`` continues exactly.
    ``conditioner`` makes each batch's condition from its images (``from_data``); it is
    recorded in the checkpoint's extra metadata (``conditioner``) for sampling.
    Every ``log_every`` steps a line goes to ``out/metrics.jsonl`` (``diffplug.trainlog``; 0,
    the default here, writes none; ``diffplug train --log-every`` defaults to 10);
    ``preview`` writes grids from the EMA weights (``diffplug.previews``), decoded through
    ``autoencoder`` for a latent model.
    """
    out = Path(out)
    trainer = Trainer(denoiser, method, data, config, device, conditioner)
    try:
        return _train(trainer, data, config, out, resume=resume, progress=progress,
                      extra=extra, on_step=on_step, stop_after=stop_after,
                      log_every=log_every, preview=preview, autoencoder=autoencoder)  # fmt: skip
    finally:
        trainer.close()


def _train(
    trainer: Trainer,
    data: Dataset | FolderData,
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    extra: dict[str, Any] | None,
    on_step: Callable[[int, float], None] | None,
    stop_after: int | None,
    log_every: int,
    preview: PreviewConfig | None,
    autoencoder: Autoencoder | None,
) -> TrainResult:
    extra = dict(extra or {})
    if trainer.conditioner is not None:
        extra["conditioner"] = conditioner_record(trainer.conditioner)
    if config.guidance != 1.0:
        check_guidance(trainer.model, config.guidance)
        extra["guidance"] = config.guidance
    lead = trainer.rank == 0
    previewer = None
    if preview is not None and lead:  # before any step: a bad --preview-sampler costs none
        previewer = Previewer(preview, trainer, data, autoencoder=autoencoder)
    if lead:
        clean_stale(out)  # what a killed run's checkpoint write left behind
    if resume:
        trainer.load(out)
        # the state `latest` names is on disk; its model too, unless a write died before it
        trainer.save(out, {"step": trainer.step, "train": dataclasses.asdict(config), **extra})
    metrics = None
    if log_every > 0 and lead:
        metrics = MetricsLog(out / METRICS_FILE, log_every, config.batch_size * trainer.world)
        metrics.start(trainer.step)  # lines beyond the resumed step did not happen
    losses: list[float] = []
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        disable=not progress or not lead,
        desc="training",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    start, images, pending = time.perf_counter(), 0, []
    saved = trainer.step if resume else -1  # the step whose state is on disk
    signals = _Signals()

    def paused(since: float) -> None:  # time that was not training
        nonlocal start
        seconds = time.perf_counter() - since
        start += seconds
        if metrics is not None:
            metrics.pause(seconds)

    try:
        with signals:
            end = min(config.steps, stop_after if stop_after is not None else config.steps)
            while trainer.step < end:
                # a signal only raises a flag: the step in flight finishes, so the state saved
                # below is one consistent step (weights, EMA, optimizer and RNG together)
                if distributed.any_rank(signals.caught is not None):
                    raise KeyboardInterrupt
                loss = trainer.train_step()
                pending.append(loss)
                images += config.batch_size * trainer.world
                bar.update(1)
                if metrics is not None:
                    metrics.add(loss, trainer.grad_norm)
                    if metrics.due(trainer.step):
                        line = metrics.write(trainer.step, trainer.lr, trainer.decay)
                        if line["loss"] is not None:
                            bar.set_postfix(loss=f"{line['loss']:.4f}",
                                            img_s=f"{line['images_per_s']:.0f}")  # fmt: skip
                if len(pending) == 50 or trainer.step == end:  # one sync per 50 steps
                    values = torch.stack(pending).float().cpu().tolist()
                    losses.extend(values)
                    pending = []
                    rate = images / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{sum(values) / len(values):.4f}", img_s=f"{rate:.0f}")
                    if on_step is not None:
                        on_step(trainer.step, values[-1])
                if previewer is not None and previewer.due(trainer.step):
                    pause = time.perf_counter()
                    previewer = _preview(previewer, trainer, out)
                    paused(pause)
                if trainer.step % config.checkpoint_every == 0 or trainer.step == end:
                    pause = time.perf_counter()
                    trainer.save(
                        out, {"step": trainer.step, "train": dataclasses.asdict(config), **extra}
                    )
                    saved = trainer.step
                    paused(pause)  # checkpoint time is not training time
    except KeyboardInterrupt:
        bar.close()
        if signals.caught is None:  # a second signal, or Ctrl-C outside a step: no save
            raise
        if trainer.step > max(saved, 0):  # else the state on disk is already this step
            try:
                with signals:  # a second Ctrl-C during the save aborts it; `latest` stays valid
                    trainer.save(
                        out, {"step": trainer.step, "train": dataclasses.asdict(config), **extra}
                    )
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted again while saving step {trainer.step}; {_kept(out)}"
                ) from None
        raise Interrupted(
            f"interrupted; checkpoint at step {trainer.step} in {out} (continue with --resume)"
            if trainer.step > 0
            else "interrupted before the first step; nothing was saved"
        ) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return TrainResult(
        trainer.step,
        losses[-1] if losses else float("nan"),
        images / max(seconds, 1e-9),
        seconds,
        losses,
    )


def _preview(previewer: Previewer, trainer: Trainer, out: Path) -> Previewer | None:
    """Write one preview; one that cannot be drawn (a caption the text encoder refuses, a
    sampler that fails) turns previews off with one line, and training goes on."""
    try:
        previewer.write(trainer, out)
    except UserError as exc:
        print(f"diffplug: previews off: {exc}", file=sys.stderr)
        return None
    return previewer


__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "atomic_path",
    "check_conditioner",
    "check_guidance",
    "clean_stale",
    "conditioner_record",
    "lr_at",
    "train",
]
