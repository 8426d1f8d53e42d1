"""Checkpoints: safetensors only, self-describing, validated before anything is allocated.

The metadata records the component's kind, plugin, registered name and full config, so a
file alone rebuilds its component. Pickles (.pt, .ckpt, .bin, ...) are refused: loading one
can run arbitrary code. The header is checked (JSON size, dtypes, shapes, offsets against the
file length) before safetensors reads a byte of tensor data, so a hostile header cannot make
the loader allocate unbounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffplug.atomic import atomic_path
from diffplug.errors import CheckpointError, UnknownComponentError, UserError
from diffplug.registry import Registry, default_registry

FORMAT = "diffplug/1"
#: a denoiser file's tensors under this prefix are its trained conditioner's (a text encoder)
CONDITIONER_PREFIX = "conditioner."
#: a denoiser file's tensors under this prefix are its autoencoder's, when its record says
#: ``"weights": true`` (a whole imported pipeline in one file)
AUTOENCODER_PREFIX = "autoencoder."
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"}
MAX_HEADER = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def pickle_files(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the files in ``folder`` that are pickles by their extension (a folder whose
    weights exist only as these is refused, with how to convert them)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


#: validated headers by (path, size, mtime): a run reads each file's header once, however
#: many of its steps (the default-model search, the load, the shape check) look at it
_HEADERS: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, str]]] = {}
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's header; return (tensor entries, metadata). No torch.
    Remembered while the file is unchanged (same size and modification time)."""
    path = Path(path)
    key = _stat_key(path) if path.is_file() else None
    if key is not None and key in _HEADERS:
        header, meta = _HEADERS[key]
        return dict(header), dict(meta)
    header, meta = _read_header(path)
    if key is not None:
        _HEADERS[key] = (header, meta)
    return dict(header), dict(meta)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (the weights fingerprint a recipe keeps), computed once
    while the file is unchanged."""
    path = Path(path)
    key = _stat_key(path)
    if key is not None and key in _DIGESTS:
        return _DIGESTS[key]
    value = _digest_file(path)
    if key is not None:
        _DIGESTS[key] = value
    return value


def _digest_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickles, which can run code when loaded; "
            "diffplug loads only .safetensors checkpoints (convert it with safetensors first)"
        )
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        # A safetensors length prefix may itself start with 0x80 or "PK" (lengths 0x..80,
        # 0x4b50): only a file that is not a plausible safetensors header is sniffed as pickle.
        plausible = (
            len(head) == 9
            and head[8:9] == b"{"
            and (struct.unpack("<Q", head[:8])[0] <= min(MAX_HEADER, size - 8))
        )
        head = head[:8]
        fh.seek(8)
        if not plausible and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise CheckpointError(
                f"{path}: this is a pickle (torch.save) file, which can run code when loaded; "
                "diffplug loads only safetensors checkpoints"
            )
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (bad header size)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # nesting bombs too
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: malformed metadata")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        spans.append(_check_entry(path, name, entry, data_len))
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise CheckpointError(f"{path}: tensor data overlaps or has gaps (corrupt file)")
        end = stop
    if end != data_len:
        raise CheckpointError(
            f"{path}: truncated or padded: header describes {end} bytes of data, file has "
            f"{data_len}"
        )
    return header, metadata


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[int, int]:
    bad = CheckpointError(f"{path}: malformed header entry for tensor {name!r}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list is not even hashable
        raise bad
    if not isinstance(shape, list) or not isinstance(offsets, list):
        raise bad
    if len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in (*shape, *offsets)):
        raise bad
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} is larger than the file (truncated?)")
    begin, stop = offsets
    if stop - begin != numel * DTYPE_SIZES[dtype] or stop > data_len or begin > stop:
        raise CheckpointError(f"{path}: tensor {name!r} does not fit the file (truncated?)")
    return begin, stop


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The diffplug metadata of a checkpoint (kind, plugin, name, config...), validated."""
    _, meta = read_header(path)
    if meta.get("diffplug.format") != FORMAT:
        raise CheckpointError(
            f"{path}: a safetensors file but not a diffplug checkpoint (no diffplug metadata)"
        )
    try:
        out = {
            "kind": meta["diffplug.kind"],
            "plugin": meta["diffplug.plugin"],
            "name": meta["diffplug.name"],
            "config": json.loads(meta["diffplug.config"]),
            "extra": json.loads(meta.get("diffplug.extra", "{}")),
        }
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: incomplete diffplug metadata ({exc})") from None
    for key in ("config", "extra"):  # the loaders index both as objects
        if not isinstance(out[key], dict):
            raise CheckpointError(
                f"{path}: malformed diffplug metadata ({key} is a JSON {type(out[key]).__name__}, "
                "not an object)"
            )
    return out


def identify(component: Any, kind: str, registry: Registry | None = None) -> tuple[str, str]:
    """(plugin, name) under which ``component``'s class is registered."""
    registry = registry or default_registry()
    cls = type(component)
    target = f"{cls.__module__}:{cls.__qualname__}"
    for entry in registry.entries(kind):
        if entry.target == target:
            return entry.dist, entry.name
    raise UserError(f"{cls.__qualname__} is not a registered {kind}; register it to save it")


def save_component(
    component: Any,
    path: str | os.PathLike[str],
    *,
    kind: str,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    registry: Registry | None = None,
) -> None:
    """Write ``component`` (its state dict, or ``tensors``) and its identity, atomically."""
    import dataclasses

    plugin, name = identify(component, kind, registry)
    state = tensors if tensors is not None else component.state_dict()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    bundled = (extra or {}).get("autoencoder")
    if kind == "denoiser" and isinstance(bundled, dict) and bundled.get("weights"):
        # the fingerprint sampling checks the autoencoder against, of the weights saved here
        extra = {**(extra or {}), "autoencoder": {**bundled, "sha256": _bundle_digest(state)}}
    metadata = {
        "diffplug.format": FORMAT,
        "diffplug.kind": kind,
        "diffplug.plugin": plugin,
        "diffplug.name": name,
        "diffplug.config": json.dumps(dataclasses.asdict(component.config), sort_keys=True),
        "diffplug.extra": json.dumps(extra or {}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(state, os.fspath(tmp), metadata=metadata)


def _meta_state(entry: Any, cls: Any, config: Any) -> dict[str, torch.Tensor] | None:
    """The state dict ``config`` builds, as meta tensors (shapes and dtypes, no storage), or
    None for a component that cannot be built on the meta device (it is then checked after
    building, as before)."""
    try:
        with torch.device("meta"):
            return dict(entry.construct(config, cls=cls).state_dict())
    except Exception:  # a constructor that computes with its tensors: checked after the build
        return None


_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}


def _check_against_config(
    path: str | os.PathLike[str],
    expected: dict[str, torch.Tensor],
    skip_prefix: str | tuple[str, ...] | None = None,
) -> None:
    """Names, shapes and kinds of dtype in the header must be what the config builds, before
    any tensor is read (int8 or bool weights under a float layer would load and give NaN)."""
    header, _ = read_header(path)
    got = {k: tuple(v["shape"]) for k, v in header.items()
           if not (skip_prefix and k.startswith(skip_prefix))}  # fmt: skip
    want = {k: tuple(v.shape) for k, v in expected.items()}
    kinds = [f"{k}: {header[k]['dtype']} for a {str(v.dtype).removeprefix('torch.')} tensor"
             for k, v in expected.items() if k in header
             and v.dtype.is_floating_point != (header[k]["dtype"] in _FLOATS)][:3]  # fmt: skip
    if kinds:
        raise CheckpointError(f"{path}: tensors of the wrong kind of dtype ({', '.join(kinds)})")
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [f"{k}: {got[k]} != {want[k]}" for k in sorted(set(got) & set(want))
                  if got[k] != want[k]][:3]  # fmt: skip
        raise CheckpointError(
            f"{path}: weights do not match the config (missing {missing}, unexpected {extra}, "
            f"shapes {shapes})"
        )


def load_tensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a validated safetensors file."""
    read_header(path)
    out = {}
    with safe_open(os.fspath(path), framework="pt", device=device) as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            out[key] = fh.get_tensor(key)
    return out


def load_component(
    path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """Rebuild a component from a checkpoint: class from the registry, config from metadata."""
    registry = registry or default_registry()
    meta = read_metadata(path)
    if kind == "autoencoder" and _bundled_autoencoder(meta) is not None:
        return _load_bundled_autoencoder(path, meta, registry, device)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path}: a {meta['kind']} checkpoint, but a {kind} is needed here")
    try:
        entry = registry.get(meta["kind"], f"{meta['plugin']}:{meta['name']}")
    except UnknownComponentError:
        raise CheckpointError(
            f"{path}: needs {meta['kind']} {meta['name']!r} from {meta['plugin']}, which is not "
            f"installed: pip install {meta['plugin']}"
        ) from None
    from diffplug.options import build_config

    cls = entry.load()
    config = build_config(cls.Config, meta["config"], owner=f"{meta['kind']} {meta['name']!r}")
    # a denoiser trained with a conditioner that learns (a text encoder) carries its weights
    joint = meta["kind"] == "denoiser" and bool(
        (meta["extra"].get("conditioner") or {}).get("weights")
    )
    bundled = _bundled_autoencoder(meta) is not None
    skip = tuple(p for p, on in ((CONDITIONER_PREFIX, joint), (AUTOENCODER_PREFIX, bundled))
                 if on) or None  # fmt: skip
    # the config's shapes and dtypes, from a build on the meta device (no memory): a config
    # that would build 3 GB of weights for a 3 MB file is refused before anything is allocated
    probe = _meta_state(entry, cls, config)
    if probe is not None:
        _check_against_config(path, probe, skip_prefix=skip)
    component = entry.construct(config, cls=cls)
    _check_against_config(path, component.state_dict(), skip_prefix=skip)
    state = load_tensors(path)
    own = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    try:
        component.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from None
    component.checkpoint_extra = meta["extra"]
    if bundled:  # its autoencoder is loaded back from this very file, wherever it now is
        record = component.checkpoint_extra["autoencoder"]
        component.checkpoint_extra["autoencoder"] = {**record, "source": os.fspath(path)}
    if joint:
        n = len(CONDITIONER_PREFIX)
        component.conditioner_state = {
            k[n:]: v for k, v in state.items() if k.startswith(CONDITIONER_PREFIX)
        }
    return component.to(device).eval()


def _bundle_digest(state: dict[str, torch.Tensor]) -> str:
    """``diffplug.latent.fingerprint`` of the autoencoder whose tensors ``state`` bundles."""
    from diffplug.latent import fingerprint

    n = len(AUTOENCODER_PREFIX)
    own = {k[n:]: v for k, v in state.items() if k.startswith(AUTOENCODER_PREFIX)}

    class _Weights:  # fingerprint reads only state_dict()
        def state_dict(self) -> dict[str, torch.Tensor]:
            return own

    return fingerprint(_Weights())  # type: ignore[arg-type]


def _bundled_autoencoder(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A denoiser file's record of an autoencoder whose weights it holds itself."""
    record = meta["extra"].get("autoencoder") if meta["kind"] == "denoiser" else None
    return record if isinstance(record, dict) and record.get("weights") else None


def _load_bundled_autoencoder(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    registry: Registry,
    device: str | torch.device,
) -> Any:
    """The autoencoder a denoiser file holds under ``AUTOENCODER_PREFIX``, built from the
    plugin, name and config its record keeps (checked like any component's file)."""
    record = _bundled_autoencoder(meta)
    assert record is not None
    try:
        entry = registry.get("autoencoder", f"{record['plugin']}:{record['name']}")
    except (KeyError, UnknownComponentError):
        raise CheckpointError(
            f"{path}: needs autoencoder {record.get('name')!r} from {record.get('plugin')}, "
            f"which is not installed: pip install {record.get('plugin')}"
        ) from None
    from diffplug.options import build_config

    cls = entry.load()
    config = build_config(cls.Config, record.get("config", {}), owner=f"autoencoder {entry.name!r}")
    component = entry.construct(config, cls=cls)
    n = len(AUTOENCODER_PREFIX)
    header, _ = read_header(path)
    want = {AUTOENCODER_PREFIX + k: v for k, v in component.state_dict().items()}
    got = {k for k in header if k.startswith(AUTOENCODER_PREFIX)}
    shapes = {k: tuple(v.shape) for k, v in want.items()}
    if got != set(want) or any(tuple(header[k]["shape"]) != v for k, v in shapes.items()):
        raise CheckpointError(f"{path}: the autoencoder's weights do not match its config")
    state = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
        for key in sorted(got):
            state[key[n:]] = fh.get_tensor(key)
    component.load_state_dict(state, strict=True)
    return component.to(device).eval()
