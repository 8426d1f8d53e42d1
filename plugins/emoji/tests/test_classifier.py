"""The shipped emoji subcategory classifier: what its metadata records is what it measures,
it is far above chance on held-out emoji, it is a registered feature space, and its
training is deterministic."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from cliutil import run_cli

from diffplug import FeatureSpace, default_registry, feature_space, read_header
from diffplug_emoji import classifier
from diffplug_emoji.dataset import Emoji
from diffplug_emoji.features import EmojiFeatures

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = Path(str(classifier.WEIGHTS))


@pytest.fixture(scope="module")
def heldout():
    return Emoji().images("heldout").float() / 255, classifier.labels("heldout")


def test_the_shipped_file_is_small_and_says_what_it_is():
    assert WEIGHTS.stat().st_size < 2_000_000
    _, meta = read_header(WEIGHTS)
    assert meta["diffplug.format"] == classifier.FORMAT
    assert tuple(json.loads(meta["classes"])) == classifier.subcategories()
    assert len(classifier.subcategories()) == 99
    assert int(meta["train_images"]) == 3428  # the training split, all of it, and only it


def test_recorded_heldout_accuracy_is_what_it_measures_and_far_above_chance(heldout):
    images, labels = heldout
    predicted, probabilities = classifier.classify(images)
    accuracy = float((predicted == labels).float().mean())
    meta = classifier.metadata()
    assert accuracy == pytest.approx(float(meta["heldout_accuracy"]), abs=0.5 / len(labels))
    commonest = torch.bincount(classifier.labels("train")).argmax()  # always guess it
    majority = float((labels == commonest).float().mean())
    assert majority == pytest.approx(float(meta["heldout_majority_baseline"]), abs=1e-4)
    assert accuracy > 0.6 and accuracy > 2.5 * majority and accuracy > 50 / 99
    assert probabilities.shape == (len(labels), 99)
    assert torch.allclose(probabilities.sum(1), torch.ones(len(labels)))
    assert torch.equal(probabilities.argmax(1), predicted)


def test_classify_takes_any_size_and_grey(heldout):
    images, labels = heldout
    small = torch.nn.functional.interpolate(
        images[:64], size=32, mode="bilinear", align_corners=False, antialias=True
    )  # what prepare does to 64 px images itself
    same, _ = classifier.classify(small)
    full, _ = classifier.classify(images[:64])
    assert torch.equal(same, full)
    assert classifier.classify(small[:, :, ::2, ::2])[0].shape == (64,)  # 16 px: upscaled
    grey, _ = classifier.classify(images[:8].mean(1, keepdim=True))
    assert grey.shape == (8,)


def test_emoji_is_a_registered_feature_space(heldout):
    entry = default_registry().get("feature", "emoji")
    assert entry.dist == "diffplug-emoji"
    space = feature_space("emoji")
    assert isinstance(space, EmojiFeatures) and isinstance(space, FeatureSpace)
    assert "emoji subcategory classifier" in space.label and "held-out accuracy" in space.label
    assert space(heldout[0][:5]).shape == (5, classifier.FEATURES)


def test_eval_with_emoji_features_names_them_and_sees_noise(tmp_path, heldout):
    """Two halves of the held-out emoji are near each other; noise is far from them."""
    from safetensors.torch import save_file

    def write_samples(images, path, _recipe):  # the layout `diffplug run -o X.safetensors` writes
        save_file({"samples": ((images + 1) / 2).clamp(0, 1).contiguous()}, str(path))

    images = heldout[0] * 2 - 1
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("a", "b", "noise")}
    write_samples(images[::2], paths["a"], {})
    write_samples(images[1::2], paths["b"], {})
    write_samples(
        torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        paths["noise"],
        {},
    )
    args = ("--reference", str(paths["b"]), "--features", "emoji", "--json", "--kid-subsets", "20")
    real = run_cli("eval", str(paths["a"]), *args)
    assert real.code == 0, real.err
    data = json.loads(real.out)
    assert (data["samples"]["n"], data["reference"]["n"]) == (179, 179)
    assert data["features"]["name"] == "emoji" and data["features"]["dim"] == 128
    assert "emoji subcategory classifier" in data["features"]["label"]
    fake = json.loads(run_cli("eval", str(paths["noise"]), *args).out)
    assert fake["fd"]["value"] > 3 * data["fd"]["value"]
    assert fake["kid"]["mean"] > data["kid"]["mean"] + 5 * fake["kid"]["std"]


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    spec = importlib.util.spec_from_file_location(
        "train_emoji_classifier", ROOT / "scripts" / "train_emoji_classifier.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    state = torch.random.get_rng_state()
    first, info = script.train(seed=3, epochs=1, limit=128, width=8)
    second, _ = script.train(seed=3, epochs=1, limit=128, width=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert info["train_images"] == 128
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
