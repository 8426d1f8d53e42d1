"""Nothing lost: an output that is one of the run's inputs is refused even with --overwrite,
and a symlinked output is written through (the link stays a link, its target is replaced)."""

from __future__ import annotations

import os
import shutil

from cliutil import assert_clean_error, run_cli
from PIL import Image

from diffplug.checkpoint import file_sha256
from diffplug.registry import default_registry


def test_an_output_that_is_the_model_is_refused_and_the_model_survives(tmp_path):
    model = tmp_path / "m.safetensors"
    shutil.copy(default_registry().get("pretrained", "ddpm-digits").load(), model)
    before = file_sha256(model)
    result = run_cli("run", "--sampler", "ddim", "--model", str(model), "--steps", "2",
                     "-o", str(model), "--overwrite")  # fmt: skip
    assert_clean_error(result, "is one of this run's inputs")
    link = tmp_path / "alias.safetensors"
    link.symlink_to(model)
    result = run_cli("run", "--sampler", "ddim", "--model", str(model), "--steps", "2",
                     "-o", str(link), "--overwrite")  # fmt: skip
    assert_clean_error(result, "is one of this run's inputs")
    os.utime(model)  # the digest cache keys on mtime: make sure we read the bytes again
    from diffplug.checkpoint import _digest_file

    assert _digest_file(model) == before


def test_a_recipe_cannot_be_replayed_over_itself(tmp_path):
    out = tmp_path / "r.png"
    assert run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "2", "-q",
                   "-o", str(out)).code == 0  # fmt: skip
    result = run_cli("run", "--recipe", str(out), "-o", str(out), "--overwrite")
    assert_clean_error(result, "is one of this run's inputs")
    with Image.open(out) as im:
        assert "diffplug.recipe" in im.text


def test_a_symlinked_output_is_written_through(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    result = run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "2", "-q",
                     "-o", str(link), "--overwrite")  # fmt: skip
    assert result.code == 0, result.err
    assert link.is_symlink() and os.readlink(link) == str(real)
    with Image.open(real) as im:
        assert im.format == "PNG"
