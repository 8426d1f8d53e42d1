"""``inception``: FID's feature space, Inception-v3's pool3 (2048-d) with the weights of the
TF FID graph, read from a local safetensors file (``scripts/convert_fid_inception.py`` makes
it from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``). Nothing is downloaded:
without a weights file this space is refused with how to make one."""

from __future__ import annotations

import functools
import os

import torch

from diffplug.checkpoint import load_tensors, read_header
from diffplug.errors import UserError
from diffplug.features import FeatureSpace
from diffplug.features.fid_inception import FIDInceptionV3

FORMAT = "diffplug-fid-inception/1"
#: keys a pytorch-fid state dict has that pool3 does not use
IGNORED = ("fc.weight", "fc.bias")
HOW = (
    "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
    "`uv run python scripts/convert_fid_inception.py FILE.pth OUT.safetensors` and pass "
    "--features OUT.safetensors (nothing is downloaded)"
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor FID's Inception needs, by torchvision's names (no batch counters)."""
    with torch.device("meta"):
        state = FIDInceptionV3().state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def layout_problem(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with a file's tensors (by name and shape) as FID Inception weights."""
    want = expected_shapes()
    extra = [k for k in shapes if k not in want and k not in IGNORED]
    extra = [k for k in extra if not k.endswith("num_batches_tracked")]
    missing = [k for k in want if k not in shapes]
    wrong = [k for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    parts = [
        f"{len(found)} {what} (first: {found[0]})"
        for what, found in (("missing", missing), ("unexpected", extra), ("of wrong shape", wrong))
        if found
    ]
    return "; ".join(parts) or None


@functools.cache
def load_inception(path: str) -> FIDInceptionV3:
    """FID's Inception with the weights of ``path`` (checked tensor by tensor), eval mode."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such weights file; {HOW}")
    header, _ = read_header(path)  # not safetensors: a CheckpointError (exit 2)
    problem = layout_problem({k: tuple(v["shape"]) for k, v in header.items()})
    if problem:
        raise UserError(f"{path} does not hold FID Inception-v3 weights: {problem}")
    want = expected_shapes()
    state = {k: v.float() for k, v in load_tensors(path).items() if k in want}
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=False)  # the batch counters are not weights
    return model.eval()


class InceptionFeatures(FeatureSpace):
    """Inception-v3 pool3 as FID computes it (pytorch-fid's ``InceptionV3([3])``)."""

    name = "inception"
    weights_format = FORMAT
    fd_name = "FID"
    batch_size = 32

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        if weights is None:
            raise UserError(f"--features inception needs a local weights file: {HOW}")
        super().__init__(weights)
        self.model = load_inception(os.fspath(weights))  # a bad file fails before any image

    @property
    def label(self) -> str:
        return f"Inception-v3 pool3 (FID's, 2048-d, {os.path.basename(self.weights or '')})"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.expand(-1, 3, -1, -1))
