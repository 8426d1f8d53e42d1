"""Bad input ends in exit 2 and one line, before any work: out-of-range seeds, a non-UTF-8 or
too-long prompt, a header nested to blow the JSON parser's stack, a billion samples, an
oversized image among training images, a training --out that is a file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image

from diffplug.data import image_folder


def _out(tmp_path):
    return str(tmp_path / "x.png")


@pytest.mark.parametrize("seed", [str(2**64), "-1", str(2**64 - 2)])
def test_seeds_outside_0_to_2_64_are_refused(tmp_path, seed):
    result = run_cli("run", "--sampler", "ddim", "--seed", seed, "--num-samples", "4",
                     "-o", _out(tmp_path))  # fmt: skip
    assert_clean_error(result, "must lie in 0 .. 2^64-1")


def test_a_billion_samples_is_refused_at_once(tmp_path):
    result = run_cli("run", "--sampler", "ddim", "--num-samples", "1000000000",
                     "-o", _out(tmp_path))  # fmt: skip
    assert_clean_error(result, "at most 1000000 per run")


def test_a_prompt_that_is_not_utf8_is_refused(tmp_path):
    bad = b"seven \xff".decode("utf-8", errors="surrogateescape")  # what the shell hands over
    result = run_cli("run", "--sampler", "ddim", "--model", "imagen-digits-base", "--prompt",
                     bad, "--steps", "2", "-o", _out(tmp_path))  # fmt: skip
    assert_clean_error(result, "is not valid UTF-8 text")


def test_a_prompt_longer_than_the_encoder_reads_is_refused_not_cut(tmp_path):
    long = "a handwritten seven, drawn slowly with a thick pen"
    result = run_cli("run", "--sampler", "ddim", "--model", "imagen-digits-base", "--prompt",
                     long, "--steps", "2", "-o", _out(tmp_path))  # fmt: skip
    assert_clean_error(result, "is 50 bytes", "reads at most 24")
    assert not (tmp_path / "x.png").exists()


def test_a_header_nested_to_blow_the_parser_is_a_clean_refusal(tmp_path):
    header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    result = run_cli("run", "--sampler", "ddim", "--model", str(path), "-o", _out(tmp_path))
    assert_clean_error(result, "unreadable header")
    meta = {"diffplug.format": "diffplug/1", "diffplug.kind": "denoiser", "diffplug.plugin": "x",
            "diffplug.name": "y", "diffplug.config": "[" * 100_000 + "]" * 100_000}  # fmt: skip
    header = json.dumps({"__metadata__": meta}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert_clean_error(run_cli("info", str(path)), "incomplete diffplug metadata")


def test_one_oversized_image_is_skipped_with_a_count(tmp_path, monkeypatch, capsys):
    for k in range(3):
        Image.new("L", (8, 8), color=40 * k).save(tmp_path / f"small{k}.png")
    Image.new("L", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2x: PIL's bomb error
    data = image_folder(tmp_path, 8)
    assert data.images.shape == (3, 1, 8, 8)
    assert "skipped 1 unreadable image file(s)" in capsys.readouterr().err
    assert torch.isfinite(data.images).all()


def test_train_refuses_a_huge_size_and_an_out_that_is_a_file_before_any_step(tmp_path):
    assert_clean_error(run_cli("train", "--method", "ddpm", "--size", "100000",
                               "--out", str(tmp_path / "r")), "--size")  # fmt: skip
    target = tmp_path / "file"
    target.write_text("keep me")
    result = run_cli("train", "--method", "ddpm", "--steps", "2", "--out", str(target))
    assert_clean_error(result, "exists and is not a directory")
    assert target.read_text() == "keep me"
