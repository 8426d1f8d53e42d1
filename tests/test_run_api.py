"""``diffplug.load`` -> ``Run`` -> ``Samples``: one run resolved once, from Python and the CLI.

The counters patch the functions that do each piece of once-per-run work and count their
calls during one ``load`` + ``sample``: if a caller re-resolved anything, the count would be
more than one.
"""

from __future__ import annotations

import collections
import json
import shutil

import numpy
import pytest
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image

import diffplug
from diffplug import checkpoint, latent, registry, sampling
from diffplug.checkpoint import load_tensors
from diffplug.output import read_recipe
from diffplug.samples import Samples


@pytest.fixture(scope="module")
def ddpm_path():
    return registry.default_registry().get("pretrained", "ddpm-digits").load()


def test_the_five_line_script_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=20)
    out = run.sample(8, seed=0)
    out.save("grid.png")
    assert out.tensor.shape == torch.Size([8, 1, 8, 8])
    assert out.tensor.dtype == torch.float32 and 0 <= out.tensor.min() <= out.tensor.max() <= 1
    with Image.open(tmp_path / "grid.png") as im:
        assert json.loads(im.text["diffplug.recipe"])["seeds"] == list(range(8))
    # the same samples as the CLI writes for the same settings
    cli = tmp_path / "cli.safetensors"
    result = run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", "--steps", "20",
                     "--num-samples", "8", "-q", "-o", str(cli))  # fmt: skip
    assert result.code == 0, result.err
    assert torch.equal(load_tensors(cli)["samples"], out.tensor)


def test_samples_images_and_every_output_form(tmp_path):
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=5)
    out = run.sample(3, seed=4, progress=False)
    assert isinstance(out, Samples) and len(out) == 3 and out.seeds == [4, 5, 6]
    images = out.images
    assert [im.size for im in images] == [(8, 8)] * 3 and images[0].mode == "L"
    back = torch.from_numpy(numpy.array(images[1])).float() / 255
    assert float((back - out.tensor[1, 0]).abs().max()) <= 0.5 / 255 + 1e-6
    out.save(tmp_path / "x.safetensors")
    assert torch.equal(load_tensors(tmp_path / "x.safetensors")["samples"], out.tensor)
    folder = out.save(tmp_path / "each/")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert [read_recipe(folder / f)["seeds"] for f in files] == [[4], [5], [6]]
    with pytest.raises(diffplug.UserError, match="not empty; pass --overwrite"):
        out.save(f"{tmp_path}/each/")
    assert out.save(tmp_path / "each", overwrite=True) == folder
    with pytest.raises(diffplug.UserError, match="exists; pass --overwrite"):
        out.save(tmp_path / "x.safetensors")
    with pytest.raises(diffplug.UserError, match="unknown extension '.jpg'"):
        out.save(tmp_path / "x.jpg")


def test_the_recipe_describes_the_run_before_any_sample(ddpm_path):
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=4, eta=0.5)
    recipe = run.recipe
    assert recipe["sampler"] == {
        "name": "ddim",
        "plugin": "diffplug-ddim",
        "version": "0.1.0",
        "options": {
            "eta": 0.5,
            "spacing": "leading",
            "steps_offset": 0,
            "clip_sample": False,
            "final_alpha": "one",
        },  # fmt: skip
    }
    assert recipe["model"]["sha256"] == checkpoint._digest_file(ddpm_path)
    assert recipe["model"]["plugin"] == "diffplug-ddpm" and recipe["model"]["component"] == "unet"
    assert recipe["steps"] == 4 and recipe["evaluations"] == 4
    assert recipe["timesteps"] == [750, 500, 250, 0]
    assert "seeds" not in recipe


@pytest.mark.parametrize(
    "options, message",
    [
        ({"etaa": 0.5}, "sampler 'ddim' has no option --etaa; its options: --spacing"),
        ({"eta": "lots"}, "--eta"),
        ({"eta": 2.0}, "--eta must be <= 1"),
        ({"spacing": "cubic"}, "--spacing must be one of leading, trailing"),
    ],
)
def test_python_options_are_validated_with_the_clis_messages(tmp_path, options, message):
    with pytest.raises(diffplug.OptionError, match=message):
        diffplug.load(sampler="ddim", model="ddpm-digits", **options)
    flags = [arg for k, v in options.items() for arg in (f"--{k}", str(v))]
    result = run_cli("run", "--sampler", "ddim", *flags, "-o", str(tmp_path / "x.png"))
    assert_clean_error(result, message)


def test_bad_python_input_is_a_user_error():
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=2)
    for kwargs, message in (
        ({"n": 0}, "positive integer"),
        ({"seeds": [2**64]}, "outside 0 .. 2\\^64-1"),
        ({"seeds": [-1]}, "outside"),
        ({"prompt": "seven"}, "not text-conditional"),
    ):
        with pytest.raises(diffplug.UserError, match=message):
            run.sample(progress=False, **kwargs)
    with pytest.raises(diffplug.UserError, match="unknown device 'tpu'"):
        diffplug.load(sampler="ddim", model="ddpm-digits", device="tpu")
    with pytest.raises(diffplug.UserError, match="nothing to guide"):
        diffplug.load(sampler="ddim", model="ddpm-digits", guidance=3.0)


class _Counts:
    """Counts calls of the once-per-run pieces while active."""

    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        self.headers = collections.Counter()
        self.digests = collections.Counter()
        self.loaded = collections.Counter()
        counts = self

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                counts.calls[name] += 1
                return fn(*args, **kwargs)

            return wrapper

        real_header, real_digest = checkpoint._read_header, checkpoint._digest_file
        monkeypatch.setattr(checkpoint, "_HEADERS", {})
        monkeypatch.setattr(checkpoint, "_DIGESTS", {})

        def header(path):
            counts.headers[str(path)] += 1
            return real_header(path)

        def digest(path):
            counts.digests[str(path)] += 1
            return real_digest(path)

        monkeypatch.setattr(checkpoint, "_read_header", header)
        monkeypatch.setattr(checkpoint, "_digest_file", digest)
        real_load = registry.Entry.load

        def load(entry):
            counts.loaded[(entry.kind, entry.name)] += 1
            return real_load(entry)

        monkeypatch.setattr(registry.Entry, "load", load)
        for module, name in ((sampling, "planning_process"), (sampling, "check_conditioning"),
                             (sampling, "check_autoencoder"), (latent, "fingerprint")):  # fmt: skip
            monkeypatch.setattr(module, name, counting(name, getattr(module, name)))

        def wrap_plan(cls):
            original = cls.plan

            def plan(self, process, steps):
                counts.calls["plan"] += 1
                return original(self, process, steps)

            monkeypatch.setattr(cls, "plan", plan)

        self.wrap_plan = wrap_plan


@pytest.mark.parametrize(
    "model, sampler",
    [("ddpm-digits", "ddim"), ("adm-latent-digits", "adm"), (None, "ddim")],
    ids=["pixel", "latent", "default-model"],
)
def test_one_run_resolves_everything_once(monkeypatch, tmp_path, model, sampler):
    counts = _Counts(monkeypatch)
    reg = registry.default_registry()
    counts.wrap_plan(reg.load("scheduler", sampler))
    counts.loaded.clear()
    run = diffplug.load(model=model, sampler=sampler, steps=3)
    samples = run.sample(2, progress=False)
    samples.recipe  # noqa: B018 - the recipe is part of the run's work
    run.recipe  # noqa: B018
    assert counts.calls["plan"] == 1
    assert counts.calls["planning_process"] == 1
    assert counts.calls["check_conditioning"] == 1
    assert counts.calls["check_autoencoder"] == 1
    assert set(counts.loaded.values()) == {1}, counts.loaded
    assert counts.loaded[("scheduler", sampler)] == 1
    weights = [samples.recipe["model"]] + [samples.recipe.get("autoencoder") or {}]
    files = [w for w in weights if w]
    assert set(counts.digests.values()) == {1} and len(counts.digests) == len(files)
    read = {k: v for k, v in counts.headers.items() if k in {str(p) for p in counts.digests}}
    assert set(read.values()) == {1}, counts.headers
    if model == "adm-latent-digits":
        assert counts.calls["fingerprint"] == 1  # the autoencoder's state, hashed once
    else:
        assert counts.calls["fingerprint"] == 0


@pytest.mark.parametrize("chunk, rows", [(0, 6), (16, 16)])
def test_the_guided_call_builds_its_fixed_parts_once_per_batch(chunk, rows):
    """Times, conditions and the input buffer (x twice, padded to the chunk) are made once
    per batch: every step's call sees the same condition tensors and the same buffer."""
    run = diffplug.load(sampler="ddim", model="imagen-digits-base", steps=4, guidance=3.0,
                        chunk=chunk)  # fmt: skip
    seen = []
    real = run.denoiser.forward

    def spy(x, t, cond=None):
        seen.append((x.data_ptr(), {k: v.data_ptr() for k, v in cond.items()}, x.shape[0]))
        return real(x, t, cond)

    run.denoiser.forward = spy
    run.sample(seeds=[0, 1, 2], prompt="seven", batch_size=3, progress=False)
    steps = [s for s in seen if s[2] == rows]  # the preflight call has one row
    assert len(steps) == 4
    assert len({s[0] for s in steps}) == 1  # one buffer for x twice
    assert len({json.dumps(s[1]) for s in steps}) == 1  # one concatenated condition


def test_a_run_samples_many_times_from_one_preparation(monkeypatch):
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=3)
    first = run.sample(seeds=[5, 6], progress=False)
    monkeypatch.setattr(sampling, "prepare", None)  # nothing may prepare again
    again = run.sample(seeds=[5, 6], progress=False)
    assert torch.equal(again.tensor, first.tensor)


# -- replay --------------------------------------------------------------------------------
def _replay_cli(tmp_path, *args):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    result = run_cli("run", *args, "-q", "-o", str(first))
    assert result.code == 0, result.err
    result = run_cli("run", "--recipe", str(first), "-q", "-o", str(again))
    assert result.code == 0, result.err
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
        assert a.size == b.size
    return read_recipe(first), read_recipe(again)


def test_replay_ddim_on_ddpm_digits_writes_the_same_pixels(tmp_path):
    first, again = _replay_cli(tmp_path, "--sampler", "ddim", "--steps", "6", "--eta", "0.5",
                               "--seed", "3", "--num-samples", "5")  # fmt: skip
    assert again == first and first["seeds"] == [3, 4, 5, 6, 7]


def test_replay_adm_on_adm_digits(tmp_path):
    first, again = _replay_cli(tmp_path, "--sampler", "adm", "--model", "adm-digits",
                               "--steps", "4", "--num-samples", "4")  # fmt: skip
    assert first["model"]["name"] == "adm-digits" and again == first


@pytest.mark.slow
def test_replay_the_imagen_pipeline(tmp_path):
    first, again = _replay_cli(tmp_path, "--pipeline", "imagen", "--prompt", "a handwritten seven",
                               "--prompt", "3", "--steps", "3", "--sr-steps", "3",
                               "--num-samples", "2")  # fmt: skip
    assert again == first and first["prompts"] == ["a handwritten seven", "3"]


def test_replay_of_a_model_given_by_path_and_refusal_when_its_weights_change(tmp_path, ddpm_path):
    model = tmp_path / "mine.safetensors"
    shutil.copy(ddpm_path, model)
    first, _ = _replay_cli(tmp_path, "--sampler", "ddim", "--model", str(model), "--steps", "3",
                           "--num-samples", "2")  # fmt: skip
    assert first["model"]["source"] == str(model)
    # the same file name, other weights: refused, naming the file and both fingerprints
    from safetensors.torch import save_file

    _, meta = checkpoint.read_header(model)
    tensors = load_tensors(model)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(model), metadata=meta)
    again = tmp_path / "changed.png"
    result = run_cli("run", "--recipe", str(tmp_path / "first.png"), "-o", str(again))
    assert_clean_error(result, str(model), "weights fingerprint", "--allow-different")
    assert not again.exists()
    result = run_cli("run", "--recipe", str(tmp_path / "first.png"), "--allow-different", "-q",
                     "-o", str(again))  # fmt: skip
    assert result.code == 0 and "warning" in result.err and again.exists()


def test_replay_refuses_another_plugin_version_and_extra_options(tmp_path):
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=2)
    recipe = run.sample(1, progress=False).recipe
    recipe["sampler"]["version"] = "0.0.1"
    with pytest.raises(diffplug.UserError, match="plugin diffplug-ddim is 0.1.0, the recipe has"):
        diffplug.load(recipe=recipe)
    replayed = diffplug.load(recipe=recipe, allow_different=True)
    assert replayed.defaults["seeds"] == [0]
    with pytest.raises(diffplug.UserError, match="do not also give steps"):
        diffplug.load(recipe=recipe, steps=3)
    out = tmp_path / "r.png"
    run.sample(1, progress=False).save(out)
    result = run_cli("run", "--recipe", str(out), "--steps", "3", "-o", str(tmp_path / "y.png"))
    assert_clean_error(result, "--recipe fixes the whole run", "--steps")
    result = run_cli("run", "--recipe", str(tmp_path / "none.png"), "-o", str(tmp_path / "z.png"))
    assert_clean_error(result, "no such file")
    result = run_cli("run", "--allow-different", "--sampler", "ddim", "-o", str(tmp_path / "w.png"))
    assert_clean_error(result, "--allow-different goes with --recipe")


def test_python_replay_from_a_saved_file_is_bitwise(tmp_path):
    run = diffplug.load(sampler="ddpm", model="ddpm-digits", steps=8)
    out = run.sample(seeds=[11, 12, 13], progress=False)
    out.save(tmp_path / "s.safetensors")
    again = diffplug.load(recipe=tmp_path / "s.safetensors").sample(progress=False)
    assert torch.equal(again.tensor, out.tensor) and again.seeds == [11, 12, 13]
