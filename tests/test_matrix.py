"""Every installed sampler x every shipped digits model x {unconditional, conditional}: each cell
samples within its stated digits-FD bound, or is refused before the first step with a reason
(docs/benchmarks.md has the table).

Conditional cells are conditioned as their model was trained (``diffplug.testing.matrix``):
text prompts naming each digit, or real low-resolution digits for super-resolution stages; an
unconditional model is given an image condition. Unconditional cells give no conditioner.
"""

import pytest

from diffplug.level_sampler import LevelSampler
from diffplug.registry import default_registry
from diffplug.testing.matrix import cells, run_cell
from diffplug.testing.threads import torch_threads

N, STEPS = 100, 20
#: the level samplers (diffplug-ksamplers' 11, diffplug-multistep's 8) share one base class
#: and the bridge: their cells run on a pixel and a latent, text-guided model here (each
#: sampler's correctness is proven on the exact oracle in its plugin's tests);
#: benchmarks/matrix.py runs every cell
FAMILY_MODELS = {"ddpm-digits", "imagen-latent-digits"}


def _cells():
    registry = default_registry()
    keep = []
    for sampler, model, mode in cells(registry):
        family = issubclass(registry.load("scheduler", sampler), LevelSampler)
        if family and model not in FAMILY_MODELS:
            continue
        keep.append((sampler, model, mode))
    return keep


#: FD / floor bound per model at N samples and STEPS steps; the oracle is a Gaussian mixture
#: at the class means, not digits, so its bound only says that sampling found the mixture.
BOUND = {"gmm-digits": 6.0}  # measured 2.7-3.0 at 100 samples
DEFAULT_BOUND = 3.0
#: text-conditional cells must also draw the prompted digit
MIN_ACCURACY = 0.8
#: models above 8x8: no more full-resolution detail than real digits have, give or take half
#: (digits FD is computed at 8x8 and cannot see noise left at 32x32)
MAX_DETAIL = 1.5


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("sampler, model, mode", _cells())
def test_cell_samples_within_its_bound_or_is_refused_with_a_reason(sampler, model, mode):
    cell = run_cell(sampler, model, mode, n=N, steps=STEPS)
    as_trained = (mode == "conditional") == (cell.conditioning != "none")
    if not as_trained:  # a text or image condition for an unconditional model, or none for a
        # conditional one: core refuses it before any step, naming both sides
        assert cell.refused is not None and "conditioning" in cell.refused, cell
        return
    if cell.refused is not None:
        assert len(cell.refused) > 20 and "Traceback" not in cell.refused
        return
    assert cell.fd_ratio is not None and cell.fd_ratio <= BOUND.get(model, DEFAULT_BOUND), cell
    assert cell.detail_ratio is None or cell.detail_ratio <= MAX_DETAIL, cell
    if cell.conditioning == "text":
        assert cell.accuracy is not None and cell.accuracy >= MIN_ACCURACY, cell


def test_the_matrix_covers_every_conditioning_in_pixel_and_latent_space():
    """The shipped models span {none, text, image} in pixel space and {none, text} in latent
    space (a latent super-resolution stage would need a second, larger autoencoder)."""
    from diffplug.checkpoint import read_metadata

    registry = default_registry()
    kinds = set()
    for _, model, _ in cells(registry):
        meta = read_metadata(registry.get("pretrained", model).load())
        space = "latent" if meta.get("extra", {}).get("autoencoder") else "pixel"
        kinds.add((meta["config"].get("conditioning") or "none", space))
    assert {("none", "pixel"), ("text", "pixel"), ("image", "pixel")} <= kinds
    assert {("none", "latent"), ("text", "latent")} <= kinds
    assert len(registry.names("scheduler")) >= 5  # ddpm, ddim, adm, dpmpp-2m, diffusers
