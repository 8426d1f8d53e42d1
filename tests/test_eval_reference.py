"""``diffplug eval SAMPLES --reference REF``: the metrics against independent references
(closed forms, pytorch-fid, prdc, a pair-by-pair loop), FID's Inception against
pytorch-fid's on the same random weights, the conversion script, and the command on
folders, data sets and samples files, with its errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import prdc
import pytest
import scipy.linalg
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from safetensors.torch import save_file

from diffplug import metrics
from diffplug.compare import compare
from diffplug.data import digits, resize
from diffplug.features import FeatureSpace, feature_space, names
from diffplug.features.fid_inception import FIDInceptionV3
from diffplug.features.inception import InceptionFeatures, load_inception
from diffplug.features.pixels import PixelFeatures
from diffplug.image_sets import ImageSet
from diffplug.output import write_samples

ROOT = Path(__file__).resolve().parents[1]


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, d)) * scale + shift


# --- Frechet distance ------------------------------------------------------------------


def exact(mean, cov, n=64, seed=0):
    """n points whose sample mean is ``mean`` and (ddof=1) covariance exactly ``cov``."""
    z = gaussian(n, len(mean), seed)
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened
    return np.asarray(mean) + z @ np.linalg.cholesky(cov).T


def test_fd_of_identical_sets_is_zero():
    a = gaussian(300, 12, 0)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_gaussian_feature_sets_is_the_closed_form():
    """Full (non-commuting) covariances: ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2),
    the matrix roots taken by scipy's sqrtm, a different algorithm from ours."""
    g = np.random.default_rng(1)
    m1, m2 = g.standard_normal(5), g.standard_normal(5)
    w1, w2 = g.standard_normal((5, 5)), g.standard_normal((5, 5))
    s1, s2 = w1 @ w1.T + 0.1 * np.eye(5), w2 @ w2.T + 0.1 * np.eye(5)
    a, b = exact(m1, s1, seed=2), exact(m2, s2, seed=3)
    assert np.allclose(np.cov(a, rowvar=False), s1) and np.allclose(b.mean(0), m2)
    root1 = scipy.linalg.sqrtm(s1).real
    closed = ((m1 - m2) ** 2).sum() + np.trace(
        s1 + s2 - 2 * scipy.linalg.sqrtm(root1 @ s2 @ root1).real
    )
    assert metrics.frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)


def test_fd_matches_pytorch_fid():
    a, b = gaussian(400, 32, 4), gaussian(300, 32, 5, shift=0.3, scale=1.2)
    theirs = calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert metrics.frechet_distance(a, b) == pytest.approx(theirs, rel=1e-7)


# --- KID -------------------------------------------------------------------------------


def test_mmd2_unbiased_is_the_pairwise_formula():
    a, b = gaussian(7, 3, 6), gaussian(7, 3, 7, shift=0.5)

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    m = 7
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2 * across / m**2
    assert metrics.mmd2_unbiased(a, b) == pytest.approx(expected, rel=1e-12)


def test_kid_is_unbiased_for_two_draws_of_one_distribution_and_positive_when_shifted():
    """The mean over 300 pairs of small sets is within 3 standard errors of 0; the biased
    estimate (diagonals kept) on the same pairs is not, so the check has power."""
    same, biased, shifted = [], [], []
    for s in range(300):
        a, b = gaussian(20, 4, 2 * s), gaussian(20, 4, 2 * s + 1)
        same.append(metrics.mmd2_unbiased(a, b))
        k = lambda x, y: (x @ y.T / 4 + 1) ** 3  # noqa: E731
        biased.append(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
        shifted.append(metrics.mmd2_unbiased(a, b + 0.5))
    for values, zero in ((same, True), (biased, False), (shifted, False)):
        mean, err = np.mean(values), np.std(values) / np.sqrt(len(values))
        assert (abs(mean) < 3 * err) == zero, (mean, err)
    assert np.mean(shifted) > 10 * np.std(shifted) / np.sqrt(300)


def test_kid_subsets():
    a, b = gaussian(50, 6, 8), gaussian(40, 6, 9, shift=0.2)
    whole = metrics.kid(a[:40], b, subsets=5, subset_size=1000)
    assert whole["subset"] == 40 and whole["std"] == pytest.approx(0.0, abs=1e-12)
    assert whole["mean"] == pytest.approx(metrics.mmd2_unbiased(a[:40], b), rel=1e-10)
    some = metrics.kid(a, b, subsets=20, subset_size=10, seed=3)
    assert some["subset"] == 10 and some["std"] > 0
    assert some == metrics.kid(a, b, subsets=20, subset_size=10, seed=3)
    # the whole-kernel path and the per-subset path draw the same subsets
    saved = metrics._WHOLE_KERNEL
    try:
        metrics._WHOLE_KERNEL = 0
        per_subset = metrics.kid(a, b, subsets=20, subset_size=10, seed=3)
    finally:
        metrics._WHOLE_KERNEL = saved
    assert per_subset["mean"] == pytest.approx(some["mean"], rel=1e-9)


# --- precision and recall --------------------------------------------------------------


def test_precision_recall_match_prdc(monkeypatch):
    real, fake = gaussian(200, 10, 10), gaussian(150, 10, 11, shift=0.4, scale=0.8)
    theirs = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    assert 0.2 < theirs["precision"] < 0.95 and 0.2 < theirs["recall"] < 0.95  # not trivial
    for rows in (1024, 7):  # whole matrices, and distances a few rows at a time
        monkeypatch.setattr(metrics, "_ROWS", rows)
        ours = metrics.precision_recall(fake, real, k=3)
        assert ours["precision"] == pytest.approx(theirs["precision"])
        assert ours["recall"] == pytest.approx(theirs["recall"])


def test_precision_recall_on_constructed_cases():
    real = np.concatenate([gaussian(100, 2, 12), gaussian(100, 2, 13, shift=50.0)])
    assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0, "k": 3}
    one_mode = metrics.precision_recall(gaussian(100, 2, 14), real)  # mode dropped
    assert one_mode["precision"] > 0.9 and 0.4 <= one_mode["recall"] <= 0.5
    off = metrics.precision_recall(gaussian(100, 2, 15, shift=-50.0), real)  # nowhere real
    assert off["precision"] == 0.0 and off["recall"] == 0.0


# --- FID's Inception -------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception():
    """Random weights of sensible scale (so features neither vanish nor explode)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
        elif k.endswith(("bn.weight", "running_var")):
            v.uniform_(0.5, 1.5, generator=g)
        elif k.endswith(("bn.bias", "running_mean")):
            v.uniform_(-0.1, 0.1, generator=g)
    model.load_state_dict(state)
    return model.eval(), state


def pytorch_fid_model(state, monkeypatch):
    """pytorch-fid's InceptionV3([3]) (resize, scaling, FID blocks) on ``state``: its
    download is replaced by the state dict, with the classifier it expects."""
    import pytorch_fid.inception as pf

    full = {**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: full)
    return pf.InceptionV3([3]).eval()


@pytest.mark.slow
def test_fid_inception_equals_pytorch_fids_on_the_same_weights(random_inception, monkeypatch):
    ours, state = random_inception
    theirs = pytorch_fid_model(state, monkeypatch)
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, ref = ours(x), theirs(x)[0].flatten(1)
        assert mine.shape == (2, 2048) and mine.std() > 0.1
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-5)
        ours.Mixed_7c.pool = "avg"  # torchvision's block, not FID's: the check sees it
        try:
            assert not torch.allclose(ours(x), ref, rtol=1e-3, atol=1e-3)
        finally:
            ours.Mixed_7c.pool = "max"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_convert_script_turns_pytorch_fid_weights_into_the_features_file(
    random_inception, tmp_path, capsys
):
    ours, state = random_inception
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, pth)
    target = tmp_path / "fid-inception.safetensors"
    _script("convert_fid_inception").main([str(pth), str(target)])
    assert "not the published file" in capsys.readouterr().err  # random weights
    space = feature_space(str(target))
    assert isinstance(space, InceptionFeatures) and space.fd_name == "FID"
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(space(x).float(), ours(x.expand(-1, 3, -1, -1)), atol=1e-6)
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(SystemExit, match="not pytorch-fid's FID Inception weights"):
        _script("convert_fid_inception").main([str(bad), str(tmp_path / "x.safetensors")])
    # the CLI end to end, the space named by the file: FID of a set with itself is 0
    folder = _folder(tmp_path / "few", [(8, "RGB")] * 2)
    result = run_cli("eval", str(folder), "--reference", str(folder), "--features", str(target))
    assert result.code == 0, result.err
    fid_line = next(line for line in result.out.splitlines() if line.startswith("FID"))
    assert float(fid_line.split()[1]) == pytest.approx(0.0, abs=1e-3)
    assert "Inception-v3 pool3" in fid_line and "samples n=2, reference n=2" in fid_line
    assert not any(line.startswith("precision") for line in result.out.splitlines())
    assert "no precision and recall: they need more than k=3 images a set" in result.out
    load_inception.cache_clear()


def test_inception_weights_of_the_wrong_layout_are_refused(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"Mixed_7c.branch1x1.conv.weight": torch.zeros(320, 2048, 3, 3)}, str(wrong))
    result = run_cli(
        "eval", "digits", "--reference", "digits:train",
        "--features", "inception", "--features-weights", str(wrong),
    )  # fmt: skip
    assert_clean_error(result, "does not hold FID Inception-v3 weights")
    assert "missing" in result.err and "of wrong shape" in result.err
    named_by_file = run_cli(
        "eval", "digits", "--reference", "digits:train", "--features", str(wrong)
    )
    assert_clean_error(
        named_by_file, "not the weights of a feature space", "inception (diffplug-fid-inception/1)"
    )


def test_inception_without_weights_says_how_to_get_them():
    result = run_cli("eval", "digits", "--reference", "digits:train", "--features", "inception")
    assert_clean_error(result, "convert_fid_inception.py")
    assert "nothing is downloaded" in result.err


# --- the command -----------------------------------------------------------------------


def _folder(path, specs, seed=0):
    """A folder of random images, one per (side, mode) in ``specs``."""
    path.mkdir()
    g = np.random.default_rng(seed)
    for k, (side, mode) in enumerate(specs):
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = g.integers(0, 256, (side, side, bands), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode).save(
            path / f"{k:03}.png"
        )
    return path


def metric_lines(out):
    return [
        line for line in out.splitlines() if not line.startswith(("samples ", "reference ", "note"))
    ]


def test_eval_compares_a_folder_with_the_samples_file_of_the_same_images(tmp_path):
    images = resize(digits("heldout").images[:40], 16)
    write_samples(images, tmp_path / "s.safetensors", {"sampler": "real"})
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k, image in enumerate(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)):
        Image.fromarray(image[0].numpy(), "L").save(folder / f"{k:03}.png")
    result = run_cli("eval", str(folder), "--reference", str(tmp_path / "s.safetensors"))
    assert result.code == 0, result.err
    lines = metric_lines(result.out)
    assert [line.split()[0] for line in lines] == ["FD", "KID", "precision", "recall"]
    for line in lines:  # every line: the metric, the feature space, both counts
        assert "pixel statistics" in line and "not FID" in line
        assert "samples n=40, reference n=40" in line
    same = float(lines[0].split()[1])  # the same pixels up to 8-bit rounding
    other = tmp_path / "other.safetensors"
    write_samples(resize(digits("heldout").images[40:80], 16), other, {"sampler": "real"})
    others = json.loads(run_cli("eval", str(folder), "--reference", str(other), "--json").out)
    assert same < 1e-2 and same < others["fd"]["value"] / 1000
    assert f"folder {folder} (40 images, 16x16 grey)" in result.out
    data = json.loads(
        run_cli("eval", str(folder), "--reference", str(tmp_path / "s.safetensors"), "--json").out
    )
    assert data["features"]["name"] == "pixels" and "not FID" in data["features"]["label"]
    assert data["samples"]["n"] == data["reference"]["n"] == 40
    assert data["precision_recall"]["precision"] == 1.0 and data["fd"]["name"] == "FD"


def test_eval_on_data_set_names_and_their_splits():
    result = run_cli(
        "eval", "digits:train", "--reference", "digits", "--features", "digits", "--json"
    )
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert (data["samples"]["n"], data["reference"]["n"]) == (1497, 300)
    assert "data set digits:train" in data["samples"]["source"]
    assert "data set digits:heldout" in data["reference"]["source"]
    assert (
        "digits classifier features" in data["features"]["label"] and data["features"]["dim"] == 64
    )
    assert abs(data["kid"]["mean"]) < 3 * data["kid"]["std"] + 0.05  # one distribution


def test_real_digits_are_nearer_the_reference_than_noise_in_every_space():
    held = (digits("heldout").images + 1) / 2
    noise = torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference, real, fake = (
        ImageSet(held[:150], "a"),
        ImageSet(held[150:], "b"),
        ImageSet(noise, "c"),
    )
    for name in ("pixels", "digits"):
        space = feature_space(name)
        ok, bad = (
            compare(real, reference, space, kid_subsets=20),
            compare(fake, reference, space, kid_subsets=20),
        )
        assert bad["fd"]["value"] > 3 * ok["fd"]["value"], name  # FD at n=150: biased
        assert bad["kid"]["mean"] > ok["kid"]["mean"] + 10 * bad["kid"]["std"], name
        assert bad["precision_recall"]["precision"] < ok["precision_recall"]["precision"], name
        assert ok["features"]["label"] == space.label and ok["samples"]["n"] == 150


def test_images_of_different_sizes_and_modes_are_resized_and_said_so(tmp_path):
    folder = _folder(tmp_path / "mixed", [(24, "RGB")] * 5 + [(40, "L"), (12, "RGBA")])
    (folder / "broken.png").write_bytes(b"not a png")
    other = _folder(tmp_path / "other", [(24, "RGB")] * 6, seed=1)
    result = run_cli("eval", str(folder), "--reference", str(other))
    assert result.code == 0, result.err
    assert "resized 2 of 7 images to 24x24 (sizes found: 12x12, 24x24, 40x40)" in result.out
    assert "composited on white" in result.out and "skipped 1 unreadable" in result.out
    assert "(7 images, 24x24 RGB)" in result.out


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    ok = str(_folder(tmp_path / "ok", [(8, "L")] * 4))
    cases = [
        (
            ("eval", str(tmp_path / "missing"), "--reference", ok),
            "no such file, folder or data set",
        ),
        (("eval", ok, "--reference", str(tmp_path / "nope.safetensors")), "no such file"),
        (("eval", ok, "--reference", str(tmp_path / "empty")), "no readable images"),
        (
            ("eval", ok, "--reference", ok, "--features", "nonsense"),
            "unknown feature space 'nonsense'",
        ),
        (
            ("eval", ok, "--reference", ok, "--features", "pixels", "--features-weights", ok),
            "takes no weights",
        ),
        (("eval", ok, "--features", "pixels"), "give --reference"),
        (("eval", ok), "is not a file"),
        (
            ("eval", ok, "--reference", ok, "--features", str(tmp_path / "w.safetensors")),
            "no such weights file",
        ),
    ]
    for args, message in cases:
        assert_clean_error(run_cli(*args), message)


def test_feature_spaces_are_listed_and_plugins_register_theirs():
    assert names()[:3] == ["pixels", "inception", "digits"]
    assert isinstance(feature_space(), PixelFeatures)
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert feature_space("pixels")(x).shape == (5, 512)
    assert feature_space("digits")(x).shape == (5, 64)
    assert issubclass(type(feature_space("pixels")), FeatureSpace)
