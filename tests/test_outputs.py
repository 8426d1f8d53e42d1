"""Nothing lost: an output that is one of the run's inputs is refused even with --overwrite,
and a symlinked output is written through (the link stays a link, its target is replaced).
What a killed write left behind is removed by the next write of that target, and nothing
else; import-diffusers and new-plugin check where they write before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image

from diffplug.atomic import TEMP_NAME
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


# -- what a killed write leaves behind ----------------------------------------------------

KILL_IN_ATOMIC = """import os, signal, sys
from diffplug.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_mid_write(target):
    """A real SIGKILL inside an atomic write of ``target``: the name of the temp it leaves."""
    before = set(os.listdir(os.path.dirname(target)))
    proc = subprocess.run([sys.executable, "-c", KILL_IN_ATOMIC, str(target)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    [left] = set(os.listdir(os.path.dirname(target))) - before
    match = TEMP_NAME.match(left)
    assert match is not None, left
    return left, match


def test_the_next_write_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    out = tmp_path / "x.png"
    left, match = _kill_mid_write(out)
    host, dead = match["host"], match["pid"]
    assert not out.exists()
    keep = {  # a user's file, an older naming, another target's, a live writer's, another host's
        ".x.png.notes.tmp": b"mine",
        ".x.png.abcdefgh.tmp": b"old",
        f".y.png.diffplug-{host}-{dead}-abcdefgh.tmp": b"y",
        f".x.png.diffplug-{host}-{os.getpid()}-abcdefgh.tmp": b"live",
        f".x.png.diffplug-00000000-{dead}-abcdefgh.tmp": b"elsewhere",
    }
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    result = run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "2", "-q",
                     "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    [line] = [line for line in result.err.splitlines() if "stale temporary" in line]
    assert line == (f"diffplug: removed 1 stale temporary file(s) of an interrupted write in "
                    f"{tmp_path}: {left}")  # fmt: skip
    assert not (tmp_path / left).exists() and out.is_file()
    assert {n: (tmp_path / n).read_bytes() for n in keep} == keep


def test_a_folder_output_holding_only_a_killed_writes_temp_counts_as_empty(tmp_path):
    folder = tmp_path / "each"
    folder.mkdir()
    left, _ = _kill_mid_write(folder / "00000.png")
    result = run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "2", "-q",
                     "-o", f"{folder}/")  # fmt: skip
    assert result.code == 0, result.err
    assert left in result.err
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png"]


# -- import-diffusers and new-plugin check where they write before any work ---------------


def _one_line(result, *needles):
    assert_clean_error(result, *needles)
    assert len(result.err.strip().splitlines()) == 1, result.err


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): os.access says ``folder`` cannot be written (tests run as root,
    for whom a mode of 0o555 changes nothing)."""

    def make(folder):
        real = os.access
        folder = os.path.realpath(folder)
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if os.path.realpath(p) == folder and mode & os.W_OK else real(p, mode, *a, **k)
        ))  # fmt: skip

    return make


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors)."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                          block_out_channels=(8, 16), norm_num_groups=4,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(folder)  # fmt: skip
    return folder


def _digest_tree(folder):
    return {p.name: file_sha256(p) for p in folder.iterdir()}


def test_import_diffusers_refuses_an_output_that_is_one_of_its_inputs(tmp_path, diffusers_folder):
    weights = diffusers_folder / "diffusion_pytorch_model.safetensors"
    before = _digest_tree(diffusers_folder)
    link = tmp_path / "alias.safetensors"
    link.symlink_to(weights)
    for target in (weights, link):
        for extra in ((), ("--overwrite",)):
            result = run_cli("import-diffusers", str(diffusers_folder), "-o", str(target), *extra)
            _one_line(result, "is one of this import's inputs", "write elsewhere")
    os.utime(weights)  # the digest cache keys on mtime: read the bytes again
    assert _digest_tree(diffusers_folder) == before


def test_import_diffusers_checks_its_output_before_reading_the_folder(tmp_path, read_only):
    missing = tmp_path / "no-such-folder"  # never read: each refusal comes first
    existing = tmp_path / "m.safetensors"
    existing.write_bytes(b"keep")
    _one_line(run_cli("import-diffusers", str(missing), "-o", str(existing)), "exists")
    _one_line(run_cli("import-diffusers", str(missing), "-o", str(tmp_path / "a" / "m.safetensors")),
              "does not exist")  # fmt: skip
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    _one_line(run_cli("import-diffusers", str(missing), "-o", str(locked / "m.safetensors")),
              "is not writable")  # fmt: skip
    assert existing.read_bytes() == b"keep" and list(locked.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "m.safetensors"]


def test_new_plugin_checks_its_folder_before_writing_and_leaves_nothing_on_failure(
    tmp_path, read_only, monkeypatch
):
    taken = tmp_path / "diffplug-taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    _one_line(run_cli("new-plugin", "taken", "--dir", str(tmp_path)), "exists")
    assert sorted(p.name for p in taken.iterdir()) == ["mine.txt"]
    (tmp_path / "diffplug-file").write_text("keep")
    _one_line(run_cli("new-plugin", "file", "--dir", str(tmp_path)), "exists")
    _one_line(run_cli("new-plugin", "x", "--dir", str(tmp_path / "nope")), "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    _one_line(run_cli("new-plugin", "x", "--dir", str(locked)), "is not writable")
    assert list(locked.iterdir()) == []
    # a disk that fills up half-way: no package, no temporary folder
    import errno
    from pathlib import Path

    real, calls = Path.write_text, []

    def write_text(self, *args, **kw):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    work = tmp_path / "work"
    work.mkdir()
    _one_line(run_cli("new-plugin", "x", "--dir", str(work)), "no space left on device",
              "nothing written")  # fmt: skip
    assert list(work.iterdir()) == []
    monkeypatch.undo()
    assert run_cli("new-plugin", "x", "--dir", str(work)).code == 0
    assert sorted(p.name for p in work.iterdir()) == ["diffplug-x"]
    assert oct((work / "diffplug-x").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- one PNG per sample, each with its recipe and A1111's ``parameters`` ------------------
#: A1111's own parser of the ``parameters`` line (``infotext_utils.re_param``)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _a1111(text):
    """(prompt, negative prompt, {key: value}) as A1111's ``parse_generation_parameters``."""
    *lines, last = text.strip().split("\n")
    prompt, negative, done = "", "", False
    for line in lines:
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    fields = {k: (json.loads(v) if v.startswith('"') else v) for k, v in A1111_PARAM.findall(last)}
    return prompt, negative, fields


def test_a_folder_gets_one_png_per_sample_with_its_own_recipe_and_parameters(tmp_path):
    out = tmp_path / "each"
    result = run_cli("run", "--model", "imagen-digits-base", "--sampler", "dpmpp-2m",
                     "--schedule", "karras", "--steps", "3", "--guidance", "3", "--seed", "40",
                     "--prompt", "a 3, neatly", "--prompt", "seven", "--negative-prompt", "8",
                     "--num-samples", "3", "-q", "-o", f"{out}/")  # fmt: skip
    assert result.code == 0, result.err
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png"]
    digest = file_sha256(default_registry().get("pretrained", "imagen-digits-base").load())
    for k, prompt in enumerate(["a 3, neatly", "seven", "a 3, neatly"]):
        with Image.open(out / f"{k:05d}.png") as im:
            recipe, text = json.loads(im.text["diffplug.recipe"]), im.text["parameters"]
        assert recipe["seeds"] == [40 + k] and recipe["prompts"] == [prompt]
        got_prompt, negative, fields = _a1111(text)
        assert (got_prompt, negative) == (prompt, "8")
        assert fields == {"Steps": "3", "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                          "CFG scale": "3", "Seed": str(40 + k), "Size": "8x8",
                          "Model hash": digest[:10], "Model": "imagen-digits-base",
                          "Version": fields["Version"]}  # fmt: skip


def test_a_grid_carries_its_first_samples_parameters_and_img2img_its_strength(tmp_path):
    init = tmp_path / "init.png"
    Image.new("L", (8, 8), 90).save(init)
    out = tmp_path / "grid.png"
    result = run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", "--steps", "4",
                     "--num-samples", "2", "--seed", "7", "--init-image", str(init),
                     "--strength", "0.5", "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    with Image.open(out) as im:
        prompt, negative, fields = _a1111(im.text["parameters"])
    assert (prompt, negative) == ("", "")
    assert fields["Seed"] == "7" and fields["Sampler"] == "DDIM" and fields["Size"] == "8x8"
    assert fields["Denoising strength"] == "0.5" and fields["Schedule type"] == "Automatic"


def test_a_folder_output_is_checked_before_any_work(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("mine")
    result = run_cli("run", "--sampler", "ddim", "--model", "no-such-model", "-o", f"{full}/")
    assert_clean_error(result, "is not empty; pass --overwrite")
