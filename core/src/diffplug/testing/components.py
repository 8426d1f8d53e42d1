"""``check_conditioner`` and ``check_autoencoder``: the contracts of the two components that
turn user inputs and images into what a denoiser sees, as plain asserts.

Each check raises ``AssertionError`` with a one-line reason naming the component and what to
fix, like ``check_scheduler`` and ``check_sampler``. Both run the component in eval mode
under ``torch.no_grad()`` and restore its mode afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffplug.components import Autoencoder, Cond, Conditioner

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


# -- conditioners -------------------------------------------------------------------------


def check_conditioner(
    conditioner: Conditioner,
    inputs: Sequence[Any],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    seeds: Sequence[int] | None = None,
    atol: float = 1e-5,
) -> Spec:
    """Check ``conditioner`` on ``inputs``: at least two different inputs (prompts, labels,
    images), none of them None.

    - every output is a tensor whose first dimension is the batch, for one input and for
      all of them; with ``shapes`` (key -> per-sample shape) and ``dtypes`` (key -> dtype),
      the keys, shapes and dtypes are those declared; floating outputs are finite;
    - an image condition keeps core's contract: ``image`` (B, C, h, w) in [-1, 1], and
      ``aug_level`` (B,) in [0, 1] when present;
    - ``null(n)``, the unconditional half of guidance and training's dropped condition,
      exists and has the same keys, per-sample shapes and dtypes, for n = 1 and n = len;
    - the same inputs give bitwise the same outputs twice (``forward``, ``null`` and
      ``condition(inputs, seeds)``);
    - a sample's output does not depend on the rest of its batch: alone or in the batch
      reversed it is the same within ``atol`` (``forward`` and ``condition``);
    - different inputs give different outputs.

    An unconditional conditioner (``kind`` None) must return None from ``forward`` and
    ``null``. Returns every key's per-sample shape and dtype as measured ({} for None).
    """
    label = f"conditioner {conditioner.name or type(conditioner).__name__}"
    inputs = list(inputs)
    n = len(inputs)
    assert n >= 2, f"{label}: check_conditioner needs at least two different inputs, got {n}"
    assert all(item is not None for item in inputs), (
        f"{label}: give real inputs (None is the null condition, which is checked by itself)"
    )
    seeds = list(seeds) if seeds is not None else [1000 + 7 * k for k in range(n)]
    assert len(seeds) == n, f"{label}: {len(seeds)} seeds for {n} inputs"
    with _evaluating(conditioner):
        out = conditioner(inputs)
        if conditioner.kind is None:
            null = conditioner.null(n)
            for what, got in (("forward", out), ("null", null)):
                assert got is None, (
                    f"{label}: kind None (unconditional) but {what} returned a "
                    f"{type(got).__name__}, not None"
                )
            return {}
        spec = _spec(label, "forward(inputs)", out, n)
        if shapes is not None or dtypes is not None:
            _declared(label, spec, shapes, dtypes)
        if conditioner.kind == "image":
            _image_contract(label, out)
        _equal(label, "forward(inputs)", out, conditioner(inputs))  # deterministic
        # the null condition: guidance's unconditional half, training's dropped condition
        for batch in sorted({1, n}):
            null = conditioner.null(batch)
            assert null is not None, (
                f"{label}: null({batch}) returned None; guidance and condition dropout need "
                "a null condition with the keys and shapes forward gives"
            )
            _same_spec(label, f"null({batch})", _spec(label, f"null({batch})", null, batch), spec)
        _equal(label, "null(n)", conditioner.null(n), conditioner.null(n))
        what = "condition(inputs, seeds)"
        cond = conditioner.condition(inputs, seeds)
        _same_spec(label, what, _spec(label, what, cond, n), spec)
        _equal(label, what, cond, conditioner.condition(inputs, seeds))
        # a sample does not depend on its batch: alone, or with the batch reversed
        alone = [conditioner([item]) for item in inputs]
        _batch_independent(label, "forward", out, alone, conditioner(inputs[::-1]), atol)
        pairs = zip(inputs, seeds, strict=True)
        alone = [conditioner.condition([item], [seed]) for item, seed in pairs]
        reverse = conditioner.condition(inputs[::-1], seeds[::-1])
        _batch_independent(label, "condition", cond, alone, reverse, atol)
        # the input matters
        for k in range(n):
            for m in range(k + 1, n):
                assert not all(torch.equal(v[k], out[key][m]) for key, v in out.items()), (
                    f"{label}: inputs {k} and {m} ({_show(inputs[k])}, {_show(inputs[m])}) "
                    "gave the same condition: does it read its inputs?"
                )
    return spec


def _spec(label: str, what: str, cond: Cond, batch: int) -> Spec:
    """Every key's per-sample (shape, dtype), after checking that it is a batch of ``batch``."""
    assert isinstance(cond, dict) and cond, (
        f"{label}: {what} must return a non-empty dict of tensors, got {type(cond).__name__}"
    )
    spec = {}
    for key, value in cond.items():
        assert isinstance(value, torch.Tensor), (
            f"{label}: {what}[{key!r}] is a {type(value).__name__}, not a tensor"
        )
        assert value.ndim >= 1 and value.shape[0] == batch, (
            f"{label}: {what}[{key!r}] has shape {tuple(value.shape)}: a batch of {batch} "
            f"must give {batch} rows"
        )
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), f"{label}: {what}[{key!r}] is not finite"
        spec[key] = (tuple(value.shape[1:]), value.dtype)
    return spec


def _declared(
    label: str,
    spec: Spec,
    shapes: Mapping[str, tuple[int, ...]] | None,
    dtypes: Mapping[str, torch.dtype] | None,
) -> None:
    for declared in (shapes, dtypes):
        if declared is not None:
            assert set(spec) == set(declared), (
                f"{label}: forward gives keys {sorted(spec)}, declared {sorted(declared)}"
            )
    for key, (shape, dtype) in spec.items():
        if shapes is not None:
            assert shape == tuple(shapes[key]), (
                f"{label}: forward(inputs)[{key!r}] is {shape} per sample, declared "
                f"{tuple(shapes[key])}"
            )
        if dtypes is not None:
            assert dtype == dtypes[key], (
                f"{label}: forward(inputs)[{key!r}] is {dtype}, declared {dtypes[key]}"
            )


def _image_contract(label: str, cond: dict[str, torch.Tensor]) -> None:
    """Core's image-conditioning contract (``diffplug.conditioners``)."""
    image = cond.get("image")
    assert image is not None, f"{label}: kind 'image' but no 'image' key (has {sorted(cond)})"
    assert image.ndim == 4 and image.is_floating_point(), (
        f"{label}: ['image'] must be a float (B, C, h, w) tensor, got {tuple(image.shape)} "
        f"{image.dtype}"
    )
    assert float(image.min()) >= -1 - 1e-6 and float(image.max()) <= 1 + 1e-6, (
        f"{label}: ['image'] spans [{float(image.min()):.3g}, {float(image.max()):.3g}], "
        "outside [-1, 1]"
    )
    level = cond.get("aug_level")
    if level is not None:
        assert level.ndim == 1 and float(level.min()) >= 0 and float(level.max()) <= 1, (
            f"{label}: ['aug_level'] must be (B,) in [0, 1], got shape {tuple(level.shape)}"
        )


def _same_spec(label: str, what: str, got: Spec, want: Spec) -> None:
    assert set(got) == set(want), (
        f"{label}: {what} gives keys {sorted(got)}, forward {sorted(want)}"
    )
    for key, (shape, dtype) in got.items():
        assert (shape, dtype) == want[key], (
            f"{label}: {what}[{key!r}] is {shape} {dtype} per sample, but forward gives "
            f"{want[key][0]} {want[key][1]}"
        )


def _equal(label: str, what: str, a: Cond, b: Cond) -> None:
    assert a is not None and b is not None
    for key, value in a.items():
        if not torch.equal(value, b[key]):
            diff = _max_diff(value, b[key])
            raise AssertionError(
                f"{label}: {what} is not deterministic: the same call twice gave [{key!r}] "
                f"differing by {diff:.3g} (draw any noise from the seeds, in condition())"
            )


def _batch_independent(
    label: str, what: str, batch: Cond, alone: list[Cond], reverse: Cond, atol: float
) -> None:
    """Sample k of ``batch`` against ``alone[k]`` (its batch of one) and row n - 1 - k of
    ``reverse`` (the batch reversed)."""
    assert batch is not None and reverse is not None
    n = len(alone)
    for k, single in enumerate(alone):
        assert single is not None
        for key, value in batch.items():
            others = {"alone": single[key][0], "in the batch reversed": reverse[key][n - 1 - k]}
            for where, other in others.items():
                diff = _max_diff(value[k], other)
                assert diff <= atol, (
                    f"{label}: {what}: sample {k}'s [{key!r}] changes by {diff:.3g} {where} "
                    f"(atol {atol:g}): a sample's condition must not depend on its batch"
                )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _show(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a {tuple(item.shape)} tensor"
    text = repr(item)
    return text if len(text) <= 30 else text[:27] + "..."


# -- autoencoders -------------------------------------------------------------------------


@dataclass
class AutoencoderReport:
    """What ``check_autoencoder`` measured."""

    latent_shape: tuple[int, ...]
    #: RMS of decode(encode(x)) - x on the smooth test images, images in [-1, 1]
    round_trip_rms: float
    #: std of the latents of the typical data (None: pixel space, not measured)
    latent_std: float | None

    def __str__(self) -> str:
        std = "pixel space" if self.latent_std is None else f"latent std {self.latent_std:.3g}"
        return f"latents {self.latent_shape}; round-trip RMS error {self.round_trip_rms:.3g}; {std}"


def smooth_images(image_shape: tuple[int, int, int], n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` smooth test images (n, C, H, W) in [-1, 1]: three soft blobs per channel on a
    dark ground, the same for a seed on every machine."""
    c, h, w = image_shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, h, dtype=torch.float64),
        torch.linspace(0, 1, w, dtype=torch.float64),
        indexing="ij",
    )
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for k in range(n):
        for ch in range(c):
            v = torch.zeros(h, w, dtype=torch.float64)
            for _ in range(3):
                cx, cy = (0.25 + 0.5 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
                s = 0.08 + 0.1 * float(torch.rand(1, generator=g, dtype=torch.float64))
                v = v + torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
            out[k, ch] = 2 * v.clamp(0, 1) - 1
    return out.float()


def check_autoencoder(
    autoencoder: Autoencoder,
    image_shape: tuple[int, int, int],
    *,
    data: torch.Tensor | None = None,
    tolerance: float = 0.15,
    unit_std: tuple[float, float] = (0.5, 2.0),
    atol: float = 1e-4,
) -> AutoencoderReport:
    """Check ``autoencoder`` on images of ``image_shape`` (C, H, W):

    - ``image_shape(latent_shape(s))`` is ``s``; ``encode`` gives latents of the declared
      ``latent_shape`` (so its channels and downsampling factor are what it says) and
      ``decode`` gives images of ``image_shape`` back, finite;
    - ``decode(encode(x))`` is ``x`` within an RMS error of ``tolerance`` (images in
      [-1, 1]) on smooth test images (``smooth_images``; a VAE trained on the digits: 0.107);
    - the latent scale makes the latents of typical ``data`` (N, C, H, W) in [-1, 1]
      (default: the smooth test images) roughly unit-variance: their std within
      ``unit_std`` (not measured in pixel space, an autoencoder with ``is_identity``);
    - ``encode`` and ``decode`` are deterministic (bitwise, twice) and a sample's latents and
      decoding do not depend on its batch (within ``atol``).

    Returns the measurements.
    """
    label = f"autoencoder {autoencoder.name or type(autoencoder).__name__}"
    image_shape = tuple(image_shape)  # type: ignore[assignment]
    latent = tuple(autoencoder.latent_shape(image_shape))
    back = tuple(autoencoder.image_shape(latent))  # type: ignore[arg-type]
    assert back == image_shape, (
        f"{label}: latent_shape{image_shape} is {latent}, whose image_shape is {back}, not "
        f"{image_shape}"
    )
    param = next(autoencoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = smooth_images(image_shape).to(device, dtype)
    with _evaluating(autoencoder):
        z = autoencoder.encode(x)
        assert tuple(z.shape) == (len(x), *latent), (
            f"{label}: encode gave latents of shape {tuple(z.shape)[1:]} for images of "
            f"{image_shape}, but latent_shape declares {latent}"
        )
        assert bool(torch.isfinite(z).all()), f"{label}: encode gave non-finite latents"
        y = autoencoder.decode(z)
        assert tuple(y.shape) == tuple(x.shape), (
            f"{label}: decode gave images of shape {tuple(y.shape)[1:]} for latents of "
            f"{latent}, but image_shape declares {image_shape}"
        )
        assert bool(torch.isfinite(y).all()), f"{label}: decode gave non-finite images"
        twice = {"encode": (z, autoencoder.encode(x)), "decode": (y, autoencoder.decode(z))}
        for what, (first, again) in twice.items():
            assert torch.equal(first, again), (
                f"{label}: {what} is not deterministic: the same input twice differs by "
                f"{_max_diff(first, again):.3g} (a posterior sample? encode the mean, or draw "
                "from a generator the caller passes)"
            )
        alone = {"encode": (autoencoder.encode(x[:1]), z), "decode": (autoencoder.decode(z[:1]), y)}
        for what, (single, batch) in alone.items():
            diff = _max_diff(single[0], batch[0])
            assert diff <= atol, (
                f"{label}: {what} of a sample alone differs from it in a batch by {diff:.3g} "
                f"(atol {atol:g}): a sample must not depend on its batch"
            )
        rms = float((y.double() - x.double()).pow(2).mean().sqrt())
        assert rms <= tolerance, (
            f"{label}: decode(encode(x)) is not x: RMS error {rms:.3g} on smooth test images "
            f"in [-1, 1] (tolerance {tolerance:g}): decode must undo encode, scale included"
        )
        std = None
        if not getattr(autoencoder, "is_identity", False):
            typical = x if data is None else data.to(device, dtype)
            std = float(
                torch.cat([autoencoder.encode(b) for b in typical.split(64)]).double().std()
            )
            lo, hi = unit_std
            assert lo <= std <= hi, (
                f"{label}: the latents of typical data have std {std:.3g}, not about 1 "
                f"(allowed [{lo:g}, {hi:g}]): multiply the latent scale (a VAE's "
                f"scaling_factor) by {1 / std if std else math.inf:.4g}"
            )
    return AutoencoderReport(latent, rms, std)


# -- shared -------------------------------------------------------------------------------


class _evaluating:
    """Eval mode and no autograd for the duration; the module's own mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode


__all__ = ["AutoencoderReport", "check_autoencoder", "check_conditioner", "smooth_images"]
