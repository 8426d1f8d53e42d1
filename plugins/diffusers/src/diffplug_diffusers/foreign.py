"""``diffplug run --model FOLDER``: a diffusers pipeline folder converted once and cached.

Core offers a folder (or a safetensors file without diffplug metadata) to every denoiser
class with ``convert_foreign``; this one takes diffusers pipeline folders. The checkpoint is
what ``import-diffusers`` writes, kept in ``$DIFFPLUG_CACHE_DIR`` (default
``~/.cache/diffplug``) under ``imports/``, named by the folder's path and its files' sizes
and modification times, so a run of an unchanged folder reuses it and a recipe that names
the folder finds the same bytes again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from diffplug import UserError, read_header, save_component
from diffplug_diffusers import keymap


def cache_dir() -> Path:
    root = os.environ.get("DIFFPLUG_CACHE_DIR") or Path.home() / ".cache" / "diffplug"
    return Path(root) / "imports"


def folder_key(folder: Path) -> str:
    """The folder's identity: this plugin's version, its real path, every file's size and
    modification time."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    facts = [importlib.metadata.version("diffplug-diffusers"), os.path.realpath(folder)]
    facts += [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:20]


def convert_foreign(path: Path) -> Path | None:
    """The cached checkpoint of a pipeline folder, or None for what is not one. A
    single-file SD checkpoint is refused here with how to import it (it needs a tokenizer
    and maybe a variant)."""
    from diffplug_diffusers.pipeline import is_pipeline, read_pipeline

    path = Path(path)
    if path.is_file():
        header, _ = read_header(path)
        if any(k.startswith((keymap.UNET, keymap.XL_CLIP)) for k in header):
            raise UserError(
                f"{path}: a single-file Stable Diffusion checkpoint, which holds no tokenizer: "
                f"import it first, `diffplug import-diffusers {path} --tokenizer DIR "
                "[--variant sd15|sd2|sd2-v|sdxl] -o model.safetensors`"
            )
        return None
    if not (path / "model_index.json").is_file() and not is_pipeline(path):
        return None
    out = cache_dir() / f"{path.resolve().name}-{folder_key(path)}.safetensors"
    if out.is_file():
        return out
    bundle = read_pipeline(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_component(bundle.model, out, kind="denoiser", extra=bundle.extra, tensors=bundle.tensors)
    print(f"diffplug: converted {path} into {out} (reused while the folder is unchanged)",
          file=sys.stderr)  # fmt: skip
    return out
