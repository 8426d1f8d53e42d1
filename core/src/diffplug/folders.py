"""A folder of the user's images as training data: one scan that says what is there, and
one image read the way the model sees it.

The scan walks the folder once (sorted, so every process sees the same order), decodes every
image to refuse what cannot be read before the first step, and reads the captions beside the
images (``cat.png`` + ``cat.txt``, one caption per non-empty line) and, when asked, class
labels from the immediate sub-folders (sorted names -> 0..K-1). What it leaves out is counted
and said in one line: a corrupt image, one over ``MAX_PIXELS``, a file that is not an image, an
image without its caption or with an empty caption file, a caption file without an image.

``read_image`` is the per-draw path of the streaming loader: an image with transparency is
composited on white, converted to greyscale or RGB, cropped to a square (centred, or at the
draw's offset along the long side), resized to the model's side and optionally mirrored.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffplug.errors import UserError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
CAPTION_SUFFIX = ".txt"
#: an image with more pixels (width x height) is skipped and counted: decoding one 20000 px
#: square photo would take gigabytes, and a training set of small images never needs it
MAX_PIXELS = 8192 * 8192
#: how many file names a skip note shows
SHOWN = 2


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, image by image (relative paths, sorted)."""

    root: Path
    files: tuple[str, ...]
    #: (width, height) of each image
    sizes: tuple[tuple[int, int], ...]
    #: PIL mode of each image as stored ("RGB", "RGBA", "L", "P", ...)
    modes: tuple[str, ...]
    #: whether each image has colour (a pixel whose R, G and B differ)
    colour: tuple[bool, ...]
    #: each image's class index, with ``labels_from_folders``
    labels: tuple[int, ...] | None = None
    #: class names by index: the sub-folders' names, sorted
    classes: tuple[str, ...] = ()
    #: each image's captions, when the folder has caption files and they were asked for
    captions: tuple[tuple[str, ...], ...] | None = None
    #: what was left out, reason -> the files (relative paths)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def note(self) -> str:
        """One line of what was skipped or ignored, or "" when nothing was."""
        parts = []
        for reason, files in self.skipped.items():
            shown = ", ".join(files[:SHOWN]) + (", ..." if len(files) > SHOWN else "")
            parts.append(f"{len(files)} {reason} ({shown})")
        return "; ".join(parts)


def scan_folder(
    root: str | os.PathLike[str], *, labels_from_folders: bool = False, captions: bool = False
) -> FolderScan:
    """Every usable image under ``root`` (recursively; hidden files and folders are passed
    over), with captions when ``captions`` and labels when ``labels_from_folders``. A folder
    with no usable image is a ``UserError`` saying why."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a directory")
    images, texts, others = [], set(), []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(rel)
        elif suffix == CAPTION_SUFFIX:
            texts.add(rel)
        else:
            others.append(rel.as_posix())
    skipped: dict[str, list[str]] = {}

    def skip(reason: str, rel: Path | str) -> None:
        skipped.setdefault(reason, []).append(Path(rel).as_posix())

    for rel in others:
        skip("files that are not images, ignored", rel)
    if not images:
        raise UserError(
            f"no images in {root} (looked for {', '.join(IMAGE_SUFFIXES)})"
            + (f"; {len(others)} other file(s) ignored" if others else "")
        )
    want_captions = captions and bool(texts)
    if want_captions:
        stems = {rel.with_suffix("") for rel in images}
        for rel in sorted(texts):
            if rel.with_suffix("") not in stems:
                skip("caption files without an image, ignored", rel)
    kept: list[tuple[Path, tuple[int, int], str, bool, tuple[str, ...]]] = []
    for rel in images:
        if labels_from_folders and len(rel.parts) < 2:
            skip("images not in a class sub-folder, skipped", rel)
            continue
        lines: tuple[str, ...] = ()
        if want_captions:
            text = rel.with_suffix(CAPTION_SUFFIX)
            if text not in texts:
                skip("images without a caption file, skipped", rel)
                continue
            lines = _caption_lines(root / text)
            if not lines:
                skip("images with an empty caption file, skipped", text)
                continue
        try:
            with Image.open(root / rel) as im:
                size, mode = im.size, im.mode
                if size[0] * size[1] > MAX_PIXELS:
                    skip(f"images over {MAX_PIXELS} pixels, skipped", rel)
                    continue
                colour = has_colour(im)  # decodes it: a truncated file fails here
        except Image.DecompressionBombError:
            skip(f"images over {MAX_PIXELS} pixels, skipped", rel)
            continue
        except (OSError, ValueError, SyntaxError):  # PIL's errors for bad files
            skip("unreadable images, skipped", rel)
            continue
        kept.append((rel, size, mode, colour, lines))
    if not kept:
        raise UserError(f"no usable images in {root}: {_note(skipped)}")
    labels, classes = None, ()
    if labels_from_folders:
        classes = tuple(sorted({rel.parts[0] for rel, *_ in kept}))
        index = {name: k for k, name in enumerate(classes)}
        labels = tuple(index[rel.parts[0]] for rel, *_ in kept)
    return FolderScan(
        root=root,
        files=tuple(rel.as_posix() for rel, *_ in kept),
        sizes=tuple(size for _, size, *_ in kept),
        modes=tuple(mode for _, _, mode, *_ in kept),
        colour=tuple(c for *_, c, _ in kept),
        labels=labels,
        classes=classes,
        captions=tuple(lines for *_, lines in kept) if want_captions else None,
        skipped=skipped,
    )


def infer_shape(scan: FolderScan, size: int | None, channels: int | None) -> tuple[int, int]:
    """The model's side and channels: those given, else the most common short side of the
    images (the larger on a tie) and RGB if any image has colour, greyscale otherwise."""
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 (greyscale) or 3 (RGB); got {channels}")
    if size is None:
        sides = Counter(min(w, h) for w, h in scan.sizes)
        size = max(sides, key=lambda s: (sides[s], s))
    if channels is None:
        channels = 3 if any(scan.colour) else 1
    return size, channels


def mode_note(scan: FolderScan, channels: int) -> str:
    """A line such as "converted 3 RGBA, 1 L image(s) to RGB" when images are stored in
    modes other than the one trained on (transparency composited on white), else empty."""
    target = "L" if channels == 1 else "RGB"
    others = Counter(m for m in scan.modes if m != target)
    if not others:
        return ""
    what = ", ".join(f"{n} {m}" for m, n in sorted(others.items()))
    return f"converted {what} image(s) to {target}"


def has_colour(im: object) -> bool:
    """Whether a PIL image, composited on white, has a pixel whose R, G and B differ."""
    if im.mode in ("1", "L", "LA", "I", "I;16", "F"):  # type: ignore[attr-defined]
        im.load()  # type: ignore[attr-defined]
        return False
    rgb = np.asarray(_convert(im, 3))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def read_image(
    path: str | os.PathLike[str],
    size: int,
    channels: int,
    offset: tuple[float, float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """One image as uint8 (channels, size, size): a square crop of side min(w, h), centred
    or (``offset``, two numbers in [0, 1)) at ``floor(u * (slack + 1))`` along each axis,
    resized (bicubic, antialiased) to ``size`` and mirrored when ``flip``."""
    from PIL import Image

    with Image.open(path) as im:
        im = _convert(im, channels)
        im.load()  # before the file closes: a conversion to its own mode is lazy
    side = min(im.size)
    slack_x, slack_y = im.width - side, im.height - side
    if offset is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = min(int(offset[0] * (slack_x + 1)), slack_x)
        top = min(int(offset[1] * (slack_y + 1)), slack_y)
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _convert(im: object, channels: int) -> object:
    """``im`` as "L" or "RGB"; transparent pixels become white (as the emoji were)."""
    from PIL import Image

    target = "L" if channels == 1 else "RGB"
    mode = im.mode  # type: ignore[attr-defined]
    alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info  # type: ignore[attr-defined]
    )
    if alpha:
        rgba = im.convert("RGBA")  # type: ignore[attr-defined]
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(target)
    return im if mode == target else im.convert(target)  # type: ignore[attr-defined]


def _caption_lines(path: Path) -> tuple[str, ...]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _note(skipped: dict[str, list[str]]) -> str:
    return FolderScan(Path("."), (), (), (), (), skipped=skipped).note() or "nothing usable"
