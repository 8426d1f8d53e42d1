"""Data sets as plugins: the ``register_datasets`` hook, the ``ImageDataset`` contract, the
digits through it (unchanged), ``--data NAME``, ``diffplug list datasets`` and broken data-set
plugins."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from cliutil import assert_clean_error, modules_after, run_cli
from coreonly import PLUGINS
from PIL import Image

from diffplug import DatasetInfo, ImageDataset, Registry, UserError
from diffplug.checkpoint import read_metadata
from diffplug.data import digits, load_data, resize
from diffplug.datasets import Digits
from diffplug.registry import KINDS
from diffplug.testing import registered

#: a data-set plugin (3 RGB 6x4 images, labels, captions), one whose import fails, and one
#: whose data set fails in info() and gives the wrong dtype
MODULES = {
    "fixture_squares": """
        import torch
        from diffplug import DatasetInfo, ImageDataset, hookimpl

        class Squares(ImageDataset):
            def info(self):
                return DatasetInfo(splits={"train": 3, "heldout": 1}, resolution=(6, 4),
                                   channels=3, license="CC0-1.0", captions=True, labels=True)

            def images(self, split):
                n = 3 if split == "train" else 1
                x = torch.arange(n * 3 * 6 * 4) % 256
                return x.to(torch.uint8).view(n, 3, 6, 4)

            def labels(self, split):
                return torch.arange(3 if split == "train" else 1)

            def captions(self, split):
                n = 3 if split == "train" else 1
                return [[f"square {i}", f"a square, number {i}"] for i in range(n)]

        @hookimpl
        def register_datasets(register):
            register("squares", "fixture_squares:Squares", "three squares")
    """,
    "fixture_broken_dataset": """
        raise ImportError("No module named 'a_missing_image_library'")
    """,
    "fixture_bad_dataset": """
        import torch
        from diffplug import DatasetInfo, ImageDataset, hookimpl

        class Unreadable(ImageDataset):
            def info(self):
                raise OSError("metadata file missing")

            def images(self, split):
                return torch.zeros(2, 1, 4, 4)

        class Floats(ImageDataset):
            def info(self):
                return DatasetInfo(splits={"train": 2, "heldout": 0}, resolution=(4, 4),
                                   channels=1, license="none")

            def images(self, split):
                return torch.zeros(2, 1, 4, 4)  # float32, not uint8

        @hookimpl
        def register_datasets(register):
            register("unreadable", "fixture_bad_dataset:Unreadable", "info() raises")
            register("floats", "fixture_bad_dataset:Floats", "float images")
    """,
}


@pytest.fixture(scope="module", autouse=True)
def _fixture_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset_plugins")
    for name, code in MODULES.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in MODULES:
        sys.modules.pop(name, None)


def env(*modules):
    """Core, the fixture training plugin and ``modules``; no installed plugin."""
    return {
        "DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DIFFPLUG_PLUGINS": ",".join([*PLUGINS, *modules]),
    }


def old_digits(split):
    """The digits as ``diffplug.data`` built them before data sets were plugins."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    index = torch.arange(len(images))
    keep = {"train": index % 6 != 0, "heldout": index % 6 == 0, "all": index >= 0}[split]
    return images[keep], torch.tensor(bunch.target)[keep]


def test_the_hook_the_kind_and_core_registering_digits():
    assert KINDS["dataset"] == "register_datasets"
    registry = Registry(autoload=False)
    entry = registry.get("dataset", "digits")
    assert entry.dist == "diffplug" and entry.target == "diffplug.datasets:Digits"
    assert issubclass(entry.load(), ImageDataset)
    info = Digits().info()
    assert info.splits == {"train": 1497, "heldout": 300} and info.size == 1797
    assert (info.resolution, info.channels, info.labels, info.captions) == ((8, 8), 1, True, False)


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_digits_through_the_contract_are_bitwise_what_they_were(split):
    images, labels = old_digits(split)
    new = digits(split)
    assert torch.equal(new.images, images) and torch.equal(new.labels, labels)
    assert torch.equal(digits(split, 16).images, resize(images, 16))
    raw = Digits().images(split)
    assert raw.dtype == torch.uint8 and raw.shape[1:] == (1, 8, 8) and int(raw.max()) == 16


def test_load_data_names_a_data_set_or_a_folder(tmp_path, monkeypatch):
    with registered(*PLUGINS, "fixture_squares", autoload=False):
        data = load_data("squares", split="train")  # its own size and channels by default
        assert data.images.shape == (3, 3, 4, 4)  # 6x4 centre-cropped to a square
        assert data.images.min() >= -1 and data.images.max() <= 1
        assert data.labels.tolist() == [0, 1, 2]
        assert data.captions[1] == ["square 1", "a square, number 1"]
        assert data.source["dataset"] == "squares" and data.source["license"] == "CC0-1.0"
        assert load_data("squares", 8, "heldout", 3).images.shape == (1, 3, 8, 8)
        assert torch.equal(load_data("digits", 8).images, digits().images)
        with pytest.raises(UserError, match="greyscale"):
            load_data("digits", 8, channels=3)
        with pytest.raises(UserError, match="RGB: use --channels 3"):
            load_data("squares", channels=1)
        # a folder: by path, or a bare word that names no data set but a folder here
        Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "a.png")
        assert load_data(str(tmp_path)).images.shape == (1, 1, 8, 8)
        monkeypatch.chdir(tmp_path.parent)
        assert load_data(tmp_path.name, 4).images.shape == (1, 1, 4, 4)
        with pytest.raises(UserError) as err:
            load_data("nope")
        message = str(err.value)
        assert "unknown data set 'nope'" in message and "digits, squares" in message
        assert "\n" not in message
        with pytest.raises(UserError, match="does not exist"):
            load_data(str(tmp_path / "missing"))


def test_list_datasets_shows_size_split_resolution_channels_and_license():
    result = run_cli("list", "datasets", env=env("fixture_squares"))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "datasets:" and "train/held-out" in lines[1] and "license" in lines[1]
    digits_row = next(line for line in lines if line.strip().startswith("digits"))
    assert "1797" in digits_row and "1497/300" in digits_row and "8x8" in digits_row
    assert "CC BY 4.0" in digits_row and "[diffplug]" in digits_row
    squares = next(line for line in lines if line.strip().startswith("squares"))
    assert "4 " in squares and "3/1" in squares and "6x4" in squares and "3 (RGB)" in squares
    assert "CC0-1.0" in squares
    listed = run_cli("list", "datasets", "--json", env=env("fixture_squares"))
    rows = {r["name"]: r for r in json.loads(listed.out)["dataset"]}
    assert rows["squares"] == {
        "name": "squares", "plugin": "fixture-squares", "summary": "three squares",
        "images": 4, "splits": {"train": 3, "heldout": 1}, "resolution": [6, 4], "channels": 3,
        "captions": True, "labels": True, "license": "CC0-1.0", "error": None,
    }  # fmt: skip
    assert rows["digits"]["labels"] is True and rows["digits"]["captions"] is False
    # every kind at once: the registry alone, data sets among them
    everything = run_cli("list", env=env("fixture_squares"))
    assert "datasets:" in everything.out and "three squares" in everything.out


def test_a_broken_data_set_plugin_is_reported_and_the_others_still_list():
    modules = ("fixture_squares", "fixture_broken_dataset", "fixture_bad_dataset")
    result = run_cli("list", "datasets", "--json", env=env(*modules))
    assert result.code == 0, result.err
    assert "fixture-broken-dataset failed to load" in result.err
    assert "a_missing_image_library" in result.err
    rows = {r["name"]: r for r in json.loads(result.out)["dataset"]}
    assert set(rows) == {"digits", "squares", "unreadable", "floats"}
    assert rows["squares"]["error"] is None and rows["digits"]["error"] is None
    assert "OSError: metadata file missing" in rows["unreadable"]["error"]
    assert rows["unreadable"]["images"] is None
    text = run_cli("list", "datasets", env=env("fixture_bad_dataset")).out
    assert "(cannot load: OSError: metadata file missing)" in text and "digits" in text
    # using them: one line, exit 2, the plugin named
    train = ("train", "--method", "uniform-vp", "--steps", "1", "--data")
    bad = run_cli(*train, "floats", env=env("fixture_bad_dataset"))
    assert_clean_error(bad, "data set 'floats'", "expected a non-empty uint8")
    bad = run_cli(*train, "unreadable", env=env("fixture_bad_dataset"))
    assert_clean_error(bad, "plugin fixture-bad-dataset", "metadata file missing")


def test_listing_datasets_imports_no_torch():
    out, torch_loaded = modules_after(["list", "datasets"], ["list", "datasets", "--json"])
    assert "digits" in out  # every installed data-set plugin is listed too
    assert torch_loaded == "False"


def test_train_records_the_data_set_and_unknown_names_exit_2(tmp_path):
    common = ("--method", "uniform-vp", "--widths", "8", "--steps", "2", "--batch-size", "4", "-q")
    out = str(tmp_path / "sq")
    result = run_cli(
        "train", *common, "--data", "squares", "--out", out, env=env("fixture_squares")
    )
    assert result.code == 0, result.err
    meta = read_metadata(tmp_path / "sq" / "model.safetensors")
    assert meta["config"]["channels"] == 3 and meta["config"]["size"] == 4  # the data's own
    assert meta["extra"]["data"] == {
        "spec": "squares", "size": 4, "channels": 3, "images": 3, "dataset": "squares",
        "plugin": "fixture-squares", "version": "local", "split": "train", "license": "CC0-1.0",
    }  # fmt: skip
    # digits, as before: 8 px, one channel, 1497 images (and now its record)
    result = run_cli("train", *common, "--out", str(tmp_path / "d"), env=env())
    assert result.code == 0, result.err
    meta = read_metadata(tmp_path / "d" / "model.safetensors")
    assert meta["config"]["channels"] == 1 and meta["config"]["size"] == 8
    data = meta["extra"]["data"]
    assert (data["spec"], data["size"], data["images"]) == ("digits", 8, 1497)
    assert data["dataset"] == "digits" and data["plugin"] == "diffplug"
    bad = run_cli("train", *common, "--data", "nope", "--out", str(tmp_path / "n"), env=env())
    assert_clean_error(bad, "unknown data set 'nope'", "digits")
    assert len(bad.err.strip().splitlines()) == 1, bad.err
    assert not (tmp_path / "n").exists()


def test_the_contract_defaults_chunk_what_images_give():
    class Tiny(ImageDataset):
        def info(self):
            return DatasetInfo(
                splits={"train": 5, "heldout": 0}, resolution=(2, 2), channels=1, license="x"
            )

        def images(self, split):
            return torch.arange(20, dtype=torch.uint8).view(5, 1, 2, 2)

    tiny = Tiny()
    assert tiny.labels("train") is None and tiny.captions("train") is None
    chunks = list(tiny.chunks("train", 2))
    assert [len(c["images"]) for c in chunks] == [2, 2, 1] and chunks[0]["labels"] is None
    assert torch.equal(torch.cat([c["images"] for c in chunks]), tiny.images("train"))
    with pytest.raises(UserError, match="unknown split"):
        Digits().images("test")
