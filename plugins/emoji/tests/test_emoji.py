"""diffplug-emoji: the shipped counts, captions, split, pixels and license files; the data
set through ``diffplug list datasets`` and ``diffplug train --data emoji``."""

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
from cliutil import run_cli

from diffplug import ImageDataset, default_registry, load_data, read_metadata
from diffplug_emoji.dataset import LICENSE, Emoji

PLUGIN = Path(__file__).resolve().parents[1]
FLAGS = {"country-flag", "subdivision-flag"}
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


@pytest.fixture(scope="module")
def emoji():
    return Emoji()


def records(emoji):
    return [r for split in ("train", "heldout") for r in emoji.records(split)]


def words(text):
    return set(re.findall(r"[\w'*#-]+", text.lower()))


def test_the_shipped_counts(emoji):
    info = emoji.info()
    assert info.size == 3786 and dict(info.splits) == {"train": 3428, "heldout": 358}
    assert (info.resolution, info.channels) == ((64, 64), 3)
    assert info.captions and not info.labels
    assert info.license == LICENSE and "Apache-2.0" in LICENSE and "MIT" in LICENSE
    rows = records(emoji)
    assert len(rows) == 3786 and len({r["unified"] for r in rows}) == 3786
    assert len({r["base"] for r in rows}) == 1911  # base emoji; the rest are skin tones
    assert sum(r["skin_tone"] is not None for r in rows) == 1875
    for split in ("train", "heldout"):
        images = emoji.images(split)
        assert images.dtype == torch.uint8 and images.shape == (info.splits[split], 3, 64, 64)
        assert len(emoji.captions(split)) == info.splits[split]


def test_every_record_has_its_code_points_names_and_category(emoji):
    for r in records(emoji):
        assert r["emoji"] == "".join(chr(int(cp, 16)) for cp in r["unified"].split("-"))
        tones = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"} & set(r["unified"].split("-"))
        assert bool(tones) == (r["skin_tone"] is not None) or r["category"] == "Component", r
        assert r["name"] and r["short_names"] and r["category"] and r["subcategory"]


def test_every_caption_holds_the_name_and_the_tone(emoji):
    for r in records(emoji):
        assert len(r["captions"]) >= 3, r
        name = words(re.sub(r"\s*flag$", "", r["name"], flags=re.I))
        for caption in r["captions"]:
            assert caption.strip() and name <= words(caption), (r["name"], caption)
            if r["skin_tone"]:
                assert r["skin_tone"] in caption, (r["skin_tone"], caption)
    thumbs = next(r for r in records(emoji) if r["unified"] == "1F44D-1F3FD")
    assert thumbs["skin_tone"] == "medium skin tone"
    assert thumbs["captions"][1] == "thumbs up sign, medium skin tone"
    apple = next(r for r in records(emoji) if r["unified"] == "1F34E")
    assert apple["captions"][:3] == [
        "an emoji of a red apple", "red apple", "a food-fruit emoji: red apple"
    ]  # fmt: skip


def test_flags_read_as_flags(emoji):
    flags = [r for r in records(emoji) if r["subcategory"] in FLAGS]
    assert len(flags) == 262
    for r in flags:
        place = re.sub(r"\s*Flag$", "", r["name"])
        assert all(f"the flag of {place}" in c for c in r["captions"]), r["captions"]
    japan = next(r for r in flags if r["unified"] == "1F1EF-1F1F5")
    assert japan["captions"][0] == "an emoji of the flag of Japan"
    assert next(r for r in flags if r["short_names"] == ["flag-england"])["captions"][1] == (
        "the flag of England"
    )


def test_the_split_keeps_skin_tones_together_and_is_the_fixed_hash_rule(emoji):
    bases = {s: {r["base"] for r in emoji.records(s)} for s in ("train", "heldout")}
    assert not bases["train"] & bases["heldout"]
    assert (len(bases["train"]), len(bases["heldout"])) == (1738, 173)
    for split, held in (("train", False), ("heldout", True)):
        for base in bases[split]:
            digest = hashlib.sha256(base.encode("ascii")).hexdigest()
            assert (int(digest[:8], 16) % 10 == 0) is held, base
    # the held-out set has whole families of tones, not stray variants of training emoji
    held = [r for r in emoji.records("heldout") if r["skin_tone"]]
    assert held and all(r["base"] in bases["heldout"] for r in held)


def test_images_are_rgb_on_white(emoji):
    for split in ("train", "heldout"):
        images = emoji.images(split)
        corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 255).all()
        drawn = (images < 250).flatten(1).any(1)
        assert drawn.all()  # no blank image
    # the atlas's recorded checksum is the shipped file's
    data = resources.files("diffplug_emoji").joinpath("data")
    meta = json.loads(data.joinpath("emoji.json").read_text("utf-8"))
    for split in ("train", "heldout"):
        raw = data.joinpath(meta["splits"][split]["atlas"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == meta["splits"][split]["sha256"]


def test_the_license_and_notice_ship_with_the_package():
    data = resources.files("diffplug_emoji").joinpath("data")
    notice = data.joinpath("NOTICE").read_text()
    assert notice == (PLUGIN / "NOTICE").read_text()
    assert "Noto Emoji" in notice and "Apache License, Version 2.0" in notice
    assert "Copyright (c) 2013 Cal Henderson" in notice and "MIT License" in notice
    apache = data.joinpath("LICENSE-Apache-2.0.txt").read_text()
    assert "Apache License" in apache and "Version 2.0, January 2004" in apache
    assert "END OF TERMS AND CONDITIONS" in apache
    mit = data.joinpath("LICENSE-emoji-datasource.txt").read_text()
    assert mit.startswith("The MIT License (MIT)") and "Cal Henderson" in mit
    permission = mit.split("\n\n")[2]  # the MIT notice, indented in NOTICE
    assert permission.startswith("Permission is hereby granted")
    assert permission in notice.replace("\n   ", "\n")


def test_registered_as_a_data_set():
    entry = default_registry().get("dataset", "emoji")
    assert entry.dist == "diffplug-emoji" and issubclass(entry.load(), ImageDataset)


def test_list_datasets_shows_emoji_with_its_license():
    result = run_cli("list", "datasets")
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if line.strip().startswith("emoji"))
    assert "3786" in row and "3428/358" in row and "64x64" in row and "3 (RGB)" in row
    assert LICENSE in row and "[diffplug-emoji]" in row
    rows = {r["name"]: r for r in json.loads(run_cli("list", "datasets", "--json").out)["dataset"]}
    assert rows["emoji"]["license"] == LICENSE and rows["emoji"]["captions"] is True
    assert rows["emoji"]["splits"] == {"train": 3428, "heldout": 358}


def test_load_data_gives_the_split_in_minus_one_to_one_with_captions():
    data = load_data("emoji", split="heldout")  # its own 64 px
    assert data.images.shape == (358, 3, 64, 64) and data.labels is None
    assert data.images.min() == -1 and data.images.max() == 1
    assert (data.images[:, :, 0, 0] == 1).all()  # white is exactly 1
    assert load_data("emoji", 16, "heldout").images.shape == (358, 3, 16, 16)
    assert len(data.captions) == 358 and data.source["dataset"] == "emoji"


def test_train_on_emoji_records_the_data_set(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train", "--method", "uniform-vp", "--data", "emoji", "--size", "8", "--widths", "8",
        "--steps", "2", "--batch-size", "4", "-q", "--out", str(out),
        env={"DIFFPLUG_PLUGINS": "fixture_tiny_model"},
    )  # fmt: skip
    assert result.code == 0, result.err
    meta = read_metadata(out / "model.safetensors")
    assert meta["config"]["channels"] == 3 and meta["config"]["size"] == 8
    data = meta["extra"]["data"]
    assert data["dataset"] == "emoji" and data["plugin"] == "diffplug-emoji"
    assert data["images"] == 3428 and data["split"] == "train" and data["license"] == LICENSE
