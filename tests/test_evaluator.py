"""The digits evaluator: FD maths, the shipped classifier, the floor, memorisation, ``eval``."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cliutil import assert_clean_error, run_cli
from safetensors.torch import save_file

from diffplug import evaluate as ev
from diffplug.checkpoint import read_header
from diffplug.data import digits, resize
from diffplug.errors import UserError
from diffplug.output import write_samples


@pytest.fixture(scope="module")
def heldout():
    return digits("heldout")


@pytest.fixture(scope="module")
def heldout_result(heldout):
    return ev.evaluate(heldout.images)


def test_frechet_distance_of_identical_sets_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert ev.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def _exact(mean: list[float], std: list[float]) -> np.ndarray:
    """Points whose sample mean is ``mean`` and (ddof=1) covariance exactly diag(std^2):
    columns of a Hadamard matrix are centred and orthogonal."""
    h2 = np.array([[1.0, 1.0], [1.0, -1.0]])
    z = np.kron(np.kron(h2, h2), h2)[:, 1 : 1 + len(mean)] * np.sqrt(7 / 8)
    return np.array(mean) + np.array(std) * z


def test_frechet_distance_matches_the_closed_form_1d():
    # (m1 - m2)^2 + (s1 - s2)^2 for 1-D Gaussians
    assert ev.frechet_distance(_exact([1.0], [2.0]), _exact([4.0], [0.5])) == pytest.approx(
        9.0 + 2.25, rel=1e-9
    )


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    m1, s1 = [0.0, 1.0, -2.0], [1.0, 3.0, 0.5]
    m2, s2 = [1.0, 1.0, 0.0], [2.0, 1.0, 0.5]
    a, b = _exact(m1, s1), _exact(m2, s2)
    assert np.allclose(np.cov(a, rowvar=False), np.diag(np.square(s1)))
    expected = sum((x - y) ** 2 for x, y in zip(m1 + s1, m2 + s2, strict=True))
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(torch.tensor(a), b) == pytest.approx(expected, rel=1e-9)


def test_shipped_classifier_is_accurate_on_heldout_digits(heldout):
    model = ev.load_classifier()
    assert ev.accuracy(model, heldout.images, heldout.labels) >= 0.95
    assert model.features(heldout.images[:4]).shape == (4, ev.FEATURES)
    assert ev.WEIGHTS.stat().st_size < 500_000
    _, meta = read_header(ev.WEIGHTS)
    assert meta["diffplug.format"] == ev.FORMAT


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, _ = ev.train_classifier(seed=3, epochs=1)
    second, _ = ev.train_classifier(seed=3, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_real_sets_are_disjoint_and_have_n_images():
    for n in (300, 1000):
        (a, b), *_ = ev.real_pairs(n, seed=0, repeats=1)
        assert len(a) == len(b) == n
        assert not set(a.tolist()) & set(b.tolist())
    assert torch.equal(ev.real_pairs(50, seed=1)[0][0], ev.real_pairs(50, seed=1)[0][0])


def test_heldout_digits_score_near_the_floor(heldout, heldout_result):
    r = heldout_result
    assert r["n"] == 300
    assert r["digits_fd"] <= 2 * r["floor"]
    assert r["checks"]["fd_within_3x_floor"]
    # the reference draws from every digit, held-out ones too; check against disjoint sets
    feats = ev._reference()["features"]
    train_rows = torch.nonzero(torch.arange(len(feats)) % 6 != 0).squeeze(1)
    perm = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0))]
    fd_heldout = np.mean([ev.frechet_distance(feats[::6], feats[perm[k::5][:300]]) for k in (0, 1)])
    floor = np.mean(
        [ev.frechet_distance(feats[perm[k::5][:300]], feats[perm[4::5][:300]]) for k in (0, 1)]
    )
    assert fd_heldout <= 2 * floor


def test_floor_is_far_below_the_fd_of_broken_samples(heldout, heldout_result):
    floor = heldout_result["floor"]
    g = torch.Generator().manual_seed(0)
    x = heldout.images
    broken = {
        "noise": torch.rand(x.shape, generator=g) * 2 - 1,
        "constant": torch.full_like(x, -0.5),
        "blurred": F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
        "shifted": torch.roll(x, 2, dims=3),
    }
    for name, images in broken.items():
        assert ev.evaluate(images)["digits_fd"] > 5 * floor, name


def test_heldout_class_histogram_is_balanced(heldout_result):
    hist = heldout_result["class_histogram"]
    assert len(hist) == 10 and sum(hist) == pytest.approx(1.0)
    assert all(0.05 <= h <= 0.15 for h in hist)
    assert heldout_result["confidence"] > 0.9


def test_memorisation_share_of_training_and_heldout_images(heldout_result):
    assert heldout_result["memorised_share"] == pytest.approx(0.10, abs=0.01)
    assert heldout_result["heldout_share"] == pytest.approx(0.10, abs=0.01)
    copies = ev.evaluate(digits("train").images[:500])
    assert copies["memorised_share"] >= 0.99
    assert copies["median_nearest_train"] == pytest.approx(0.0, abs=1e-6)
    assert not copies["checks"]["memorised_within_2x_heldout"]


def test_rgb_and_larger_samples_are_made_8x8_grey(heldout):
    """Held-out digits as a 16x16 RGB model would draw them score near the floor: the
    reference goes through the same 8 -> 16 -> 8 resizes, so their blur is not charged."""
    big = resize(heldout.images, 16).repeat(1, 3, 1, 1)
    r = ev.evaluate(big)
    assert r["n"] == 300 and r["size"] == 16
    assert all(0.05 <= h <= 0.15 for h in r["class_histogram"])
    assert r["digits_fd"] <= 2 * r["floor"]
    assert r["memorised_share"] == pytest.approx(0.10, abs=0.01)
    with pytest.raises(UserError, match="S, S"):
        ev.evaluate(torch.zeros(4, 1, 8, 16))


def test_eval_cli_prints_a_table_and_json(tmp_path, heldout):
    path = tmp_path / "samples.safetensors"
    write_samples(heldout.images, path, {"sampler": "real"})
    table = run_cli("eval", str(path))
    assert table.code == 0, table.err
    assert "digits FD" in table.out and "floor" in table.out and "memorised" in table.out
    result = run_cli("eval", str(path), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["n"] == 300 and len(data["class_histogram"]) == 10
    assert data["digits_fd"] <= 2 * data["floor"]


def test_eval_cli_refuses_bad_inputs_cleanly(tmp_path):
    assert_clean_error(run_cli("eval", str(tmp_path / "missing.safetensors")), "no such file")
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file at all")
    assert_clean_error(run_cli("eval", str(text)), "not a safetensors file")
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(4, 1, 8, 8)}, str(other))
    assert_clean_error(run_cli("eval", str(other)), "no 'samples' tensor")
    flat = tmp_path / "flat.safetensors"
    save_file({"samples": torch.zeros(4, 64)}, str(flat))
    assert_clean_error(run_cli("eval", str(flat)), "shape")
    wide = tmp_path / "wide.safetensors"
    save_file({"samples": torch.zeros(4, 1, 8, 16)}, str(wide))
    assert_clean_error(run_cli("eval", str(wide)), "S, S")
    loud = tmp_path / "loud.safetensors"
    save_file({"samples": torch.full((4, 1, 8, 8), 2.0)}, str(loud))
    assert_clean_error(run_cli("eval", str(loud)), "[0, 1]")
    assert_clean_error(run_cli("eval", str(tmp_path / "grid.png")), "PNG")
    assert_clean_error(run_cli("eval", str(tmp_path)), "not a file")


def test_detail_ratio_sees_full_resolution_noise_that_the_8x8_fd_cannot():
    """Digits at 32x32 score detail 1 (they are the reference); the same digits with pixel noise
    keep nearly their 8x8 FD (the round trip averages the noise away) but fail the detail
    check. 8x8 samples have no detail to measure."""
    from diffplug.data import digits, resize

    real = resize(digits("heldout").images, 32)
    clean = ev.evaluate(real)
    noisy_images = real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    noisy = ev.evaluate(noisy_images)
    assert 0.9 <= clean["detail_ratio"] <= 1.1 and clean["checks"]["detail_within_1.5x_real"]
    assert noisy["detail_ratio"] > 1.5 and not noisy["checks"]["detail_within_1.5x_real"]
    assert noisy["digits_fd"] <= 2 * clean["digits_fd"] + 1  # the 8x8 view barely moves
    expected = noisy_images.clamp(-1, 1) - resize(resize(noisy_images.clamp(-1, 1), 8), 32)
    assert ev.detail(noisy_images) == pytest.approx(float(expected.pow(2).mean().sqrt()))
    assert ev.evaluate(digits("heldout").images)["detail_ratio"] is None
