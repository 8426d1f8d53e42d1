"""Training batches read from a folder by DataLoader workers, never all in memory, drawn so
that a resumed run sees exactly the batches the uninterrupted one would.

Every draw of step ``s`` (which images, their crop offsets, flips and caption phrasings)
comes from a generator seeded by a hash of (seed, rank, step) alone (``step_draws``): the
batch sampler computes them in the main process and the workers only read files. The batches
are therefore a pure function of the step, the same at any ``--workers`` and after any
``--resume``, and they take nothing from the trainer's own generator (which keeps drawing
the noise, the times and the condition dropout as for data in memory).

Images are drawn uniformly with replacement, as the in-memory path draws them.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from diffplug.data import Dataset
from diffplug.errors import UserError
from diffplug.folders import FolderScan, infer_shape, mode_note, read_image

#: the DataLoader workers a folder is read by unless --workers says otherwise
DEFAULT_WORKERS = 2
CROPS = ("centre", "random")


@dataclass(frozen=True)
class Draw:
    """One image of one batch: which, where its crop starts, mirrored or not, which caption."""

    index: int
    offset: tuple[float, float] | None
    flip: bool
    caption: float


class FolderData:
    """A scanned folder as training data: the model's size and channels (given or inferred),
    the crop and flip applied per draw, labels and captions from the scan."""

    def __init__(
        self,
        scan: FolderScan,
        size: int | None = None,
        channels: int | None = None,
        *,
        crop: str = "centre",
        hflip: bool = False,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        crop = "centre" if crop == "center" else crop
        if crop not in CROPS:
            raise UserError(f"--crop must be one of {', '.join(CROPS)}; got {crop!r}")
        if workers < 0:
            raise UserError(f"--workers must be 0 or more; got {workers}")
        self.scan = scan
        self.size, self.channels = infer_shape(scan, size, channels)
        self.inferred = [k for k, v in (("size", size), ("channels", channels)) if v is None]
        self.crop, self.hflip, self.workers = crop, hflip, workers
        self.labels = torch.tensor(scan.labels) if scan.labels is not None else None
        self.captions = [list(c) for c in scan.captions] if scan.captions is not None else None

    def __len__(self) -> int:
        return len(self.scan)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.scan.classes

    def describe(self) -> str:
        """The one line printed at the start of training."""
        what = "RGB" if self.channels == 3 else "greyscale"
        line = f"data {self.scan.root}: {len(self)} images -> {self.size}x{self.size} {what}"
        if self.inferred:
            line += f" ({' and '.join(self.inferred)} inferred from the images)"
        line += f", {self.crop} crop" + (", random flips" if self.hflip else "")
        if self.classes:
            line += f", {len(self.classes)} classes from sub-folders"
        if self.captions is not None:
            line += f", {sum(map(len, self.captions))} captions"
        line += f", {self.workers} loader worker(s)"
        notes = [n for n in (self.scan.note(), mode_note(self.scan, self.channels)) if n]
        return line + "".join(f"; {n}" for n in notes)

    def record(self) -> dict[str, Any]:
        """What the checkpoint's data record adds for a folder."""
        out: dict[str, Any] = {"folder": str(self.scan.root), "inferred": self.inferred,
                               "crop": self.crop, "hflip": self.hflip}  # fmt: skip
        if self.classes:
            out["classes"] = list(self.classes)
        if self.captions is not None:
            out["captions"] = sum(map(len, self.captions))
        skipped = {reason: len(files) for reason, files in self.scan.skipped.items()}
        if skipped:
            out["skipped"] = skipped
        return out

    def resume_record(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (besides the model)."""
        return {
            "images": len(self),
            "crop": self.crop,
            "hflip": self.hflip,
            "labels": self.labels is not None,
            "captions": self.captions is not None,
        }

    def image(self, i: int, offset: tuple[float, float] | None = None, flip: bool = False) -> Any:
        """Image ``i`` as uint8 (C, S, S)."""
        return read_image(self.scan.path(i), self.size, self.channels, offset, flip)

    def in_memory(self) -> Dataset:
        """Every image centre-cropped, in [-1, 1], in memory (to encode into latents once)."""
        images = torch.stack([self.image(i) for i in range(len(self))]).float() / 127.5 - 1
        return Dataset(images, self.labels, self.captions)

    def loader(self, batch_size: int, seed: int, rank: int, start: int) -> Any:
        """A DataLoader of the batches of steps ``start``, ``start + 1``, ... (unending)."""
        return torch.utils.data.DataLoader(
            _Images(self),
            batch_sampler=_Steps(self, batch_size, seed, rank, start),
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=_ignore_interrupts,
        )


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed that depends on (seed, rank, step) only."""
    digest = hashlib.sha256(f"diffplug-batch:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_draws(data: FolderData, batch_size: int, seed: int, rank: int, step: int) -> list[Draw]:
    """The draws of one step: a pure function of its arguments."""
    g = torch.Generator().manual_seed(step_seed(seed, rank, step))
    index = torch.randint(0, len(data), (batch_size,), generator=g).tolist()
    offsets = torch.rand(batch_size, 2, generator=g, dtype=torch.float64).tolist()
    flips = (torch.rand(batch_size, generator=g) < 0.5).tolist()
    captions = torch.rand(batch_size, generator=g, dtype=torch.float64).tolist()
    random_crop = data.crop == "random"
    return [Draw(i, tuple(o) if random_crop else None, f and data.hflip, c)  # type: ignore[arg-type]
            for i, o, f, c in zip(index, offsets, flips, captions, strict=True)]  # fmt: skip


class _Steps(torch.utils.data.Sampler):
    """The batch sampler: step after step from ``start``, each one's draws."""

    def __init__(self, data: FolderData, batch_size: int, seed: int, rank: int, start: int):
        self.data, self.batch_size, self.seed, self.rank, self.start = (
            data, batch_size, seed, rank, start)  # fmt: skip

    def __iter__(self) -> Iterator[list[tuple[int, Draw]]]:
        step = self.start
        while True:
            draws = step_draws(self.data, self.batch_size, self.seed, self.rank, step)
            yield [(step, d) for d in draws]
            step += 1


class _Images(torch.utils.data.Dataset):
    """What a worker does with one draw: read the file (an error is returned, not raised,
    so that the main process says it in one line)."""

    def __init__(self, data: FolderData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, Draw]) -> dict[str, Any]:
        step, draw = item
        data = self.data
        try:
            image = data.image(draw.index, draw.offset, draw.flip)
        except Exception as exc:  # a file changed or vanished since the scan
            reason = str(exc) or type(exc).__name__
            return {"step": step, "error": f"{data.scan.path(draw.index)}: {reason}"}
        caption = None  # numpy, not a tensor: nothing goes through shared-memory handles
        if data.captions is not None:
            options = data.captions[draw.index]
            caption = options[min(int(draw.caption * len(options)), len(options) - 1)]
        label = int(data.labels[draw.index]) if data.labels is not None else -1
        return {"step": step, "image": image.numpy(), "label": label, "caption": caption}


def _ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the trainer, which finishes its step (reading from
    them) and checkpoints; they exit when it closes the loader, or when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"step": items[0]["step"], "error": errors[0]}
    return {
        "step": items[0]["step"],
        "images": np.stack([item["image"] for item in items]),
        "labels": np.asarray([item["label"] for item in items], dtype=np.int64),
        "captions": [item["caption"] for item in items],
    }


class Stream:
    """The trainer's side of the loader: the batch of a given step, on the device, in [-1, 1];
    the loader is started (again) at whatever step is asked for first (after a resume)."""

    def __init__(self, data: FolderData, batch_size: int, seed: int, rank: int,
                 device: torch.device) -> None:  # fmt: skip
        self.data, self.batch_size, self.seed, self.rank, self.device = (
            data, batch_size, seed, rank, device)  # fmt: skip
        self._batches: Iterator[dict[str, Any]] | None = None
        self._next = -1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        """(images, labels, captions) of ``step``."""
        if self._batches is None or self._next != step:
            self.close()
            loader = self.data.loader(self.batch_size, self.seed, self.rank, step)
            self._batches = iter(loader)
        item = next(self._batches)
        self._next = step + 1
        assert item["step"] == step, (item["step"], step)
        if "error" in item:
            self.close()
            raise UserError(f"cannot read a training image: {item['error']}")
        images = torch.from_numpy(item["images"]).to(self.device).float() / 127.5 - 1
        labels = None
        if self.data.labels is not None:
            labels = torch.from_numpy(item["labels"]).to(self.device)
        return images, labels, item["captions"] if self.data.captions is not None else None

    def close(self) -> None:
        """Stop the workers (a run's end, an interruption, a restart at another step)."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
