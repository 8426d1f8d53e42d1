"""`--size` / ``size=``: images of another size than the model's own, where its network
takes it. The model's own size changes nothing (bitwise); another is in the recipe and
replays; a size the network or the autoencoder cannot take is one line before any work
(diffusers parity at another height and width: tests/test_sd_pipeline.py)."""

import pytest
import torch
from cliutil import run_cli

import diffplug
from diffplug.errors import UserError


def _ddim(**kw):
    return diffplug.load(model="ddpm-digits", sampler="ddim", steps=4, **kw)


def test_the_models_own_size_changes_nothing():
    plain = _ddim().sample(4, progress=False).tensor
    same = _ddim(size=8)
    assert same.recipe["size"] == [8, 8]
    assert torch.equal(same.sample(4, progress=False).tensor, plain)
    assert "size" not in _ddim().recipe  # not asked: not recorded, as before


def test_another_size_samples_it_records_it_and_replays(tmp_path):
    run = _ddim(size=(16, 24))
    samples = run.sample(3, progress=False)
    assert samples.tensor.shape == (3, 1, 16, 24)
    assert bool(torch.isfinite(samples.tensor).all())
    out = tmp_path / "s.safetensors"
    samples.save(out)
    again = diffplug.load(recipe=out).sample(progress=False).tensor
    assert torch.equal(again, samples.tensor)


def test_a_latent_model_takes_the_image_size_and_samples_its_latents():
    run = diffplug.load(model="imagen-latent-digits", sampler="ddim", steps=2, size=48)
    assert run.loop.sample_shape == (4, 12, 12)  # vae-digits downsamples 4x
    assert run.sample(2, prompt="seven", progress=False).tensor.shape == (2, 1, 48, 48)
    with pytest.raises(UserError, match="multiples of 4"):
        diffplug.load(model="imagen-latent-digits", sampler="ddim", steps=2, size=50)


def test_a_size_the_network_cannot_take_is_refused_with_the_reason():
    with pytest.raises(UserError, match=r"cannot sample at 12x12 \(its own size is 8x8\)"):
        diffplug.load(model="adm-digits", sampler="adm", steps=2, size=12)  # 3 halvings
    # named width x height, as --size takes it: 16 wide, 12 high
    with pytest.raises(UserError, match=r"cannot sample at 16x12 \("):
        diffplug.load(model="adm-digits", sampler="adm", steps=2, size=(12, 16))
    # a latent model's refusal names latents (vae-digits: 4x; its U-Net halves 8 -> 4 -> 2)
    with pytest.raises(
        UserError,
        match=r"cannot sample at 12x8 latents \(its own size is "
        r"8x8 latents\)",
    ):
        diffplug.load(model="adm-latent-digits", sampler="adm", steps=2, size=(32, 48))


def test_an_image_conditioned_model_refuses_a_size():
    with pytest.raises(UserError, match="conditioned on an image"):
        diffplug.load(model="imagen-digits-sr", sampler="ddpm", steps=2, size=64)


@pytest.mark.parametrize(
    "args, words",
    [
        (("--sampler", "ddim", "--size", "0"), "WIDTHxHEIGHT"),
        (("--sampler", "ddim", "--size", "16x"), "WIDTHxHEIGHT"),
        (("--sampler", "ddim", "--size", "big"), "WIDTHxHEIGHT"),
        (("--sampler", "ddim", "--size", "99999"), "from 1 to 8192"),
        (("--sampler", "adm", "--size", "12"), "cannot sample at 12x12"),
        (("--pipeline", "imagen", "--prompt", "7", "--size", "16"), "size goes with"),
    ],
)
def test_bad_sizes_are_one_line_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "x.png"
    result = run_cli("run", *args, "--steps", "2", "-o", str(out))
    assert result.code == 2, result.err
    assert "Traceback" not in result.err and words in result.err, result.err
    assert not out.exists()


def test_a_recipe_fixes_the_size(tmp_path):
    first = tmp_path / "a.png"
    assert run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "2",
                   "--size", "12x16", "-q", "-o", str(first)).code == 0  # fmt: skip
    result = run_cli("run", "--recipe", str(first), "--size", "8", "-o", str(tmp_path / "b.png"))
    assert result.code == 2 and "size" in result.err, result.err
