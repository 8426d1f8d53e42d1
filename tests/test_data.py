"""Datasets: the bundled digits with their fixed split, and folders of user images."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffplug.data import digits, image_folder, load_data
from diffplug.errors import UserError


def test_digits_split_sizes_ranges_and_labels():
    train, held = digits("train"), digits("heldout")
    assert train.images.shape == (1497, 1, 8, 8) and held.images.shape == (300, 1, 8, 8)
    assert train.images.min() == -1 and train.images.max() == 1
    assert set(train.labels.tolist()) == set(range(10)) == set(held.labels.tolist())
    everything = digits("all")
    assert len(everything) == 1797
    # disjoint and exhaustive: held-out is every sixth image
    torch.testing.assert_close(everything.images[::6], held.images)


def test_digits_are_load_digits_bitwise_without_importing_scikit_learn():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from diffplug.datasets import _digits

    images, labels = _digits()
    bunch = load_digits()
    assert torch.equal(images, torch.from_numpy(bunch.images).to(torch.uint8).unsqueeze(1))
    assert torch.equal(labels, torch.from_numpy(bunch.target).long())
    code = ("import sys; from diffplug.data import digits; digits('train'); "
            "print('sklearn' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_resize_keeps_range_and_shape():
    big = digits("heldout", size=16)
    assert big.images.shape == (300, 1, 16, 16)
    assert -1 <= big.images.min() and big.images.max() <= 1
    # the 16 px image averages back to a slightly blurred 8 px one
    small = torch.nn.functional.avg_pool2d(big.images, 2)
    assert (small - digits("heldout").images).abs().mean() < 0.2


def _png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def test_image_folder_recurses_crops_resizes_and_skips_unreadable(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _png(tmp_path / "a.png", rng.integers(0, 255, (20, 30)))
    _png(tmp_path / "sub" / "b.png", np.full((12, 12, 3), 255), mode="RGB")
    (tmp_path / "sub" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    grey = image_folder(tmp_path, size=8)
    assert grey.images.shape == (2, 1, 8, 8) and grey.labels is None
    assert -1 <= grey.images.min() and grey.images.max() <= 1
    assert "skipped 1 unreadable" in capsys.readouterr().err
    rgb = image_folder(tmp_path, size=4, channels=3)
    assert rgb.images.shape == (2, 3, 4, 4)
    torch.testing.assert_close(rgb.images[1], torch.ones(3, 4, 4))  # the white image


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_folder(tmp_path / "missing", 8)
    with pytest.raises(UserError, match="no readable images"):
        image_folder(tmp_path, 8)
    with pytest.raises(UserError, match="greyscale"):
        load_data("digits", 8, channels=3)
    with pytest.raises(UserError, match="unknown split"):
        digits("test")
