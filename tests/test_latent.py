"""Latent diffusion: training in an autoencoder's latents, the record of that autoencoder,
decoding at sampling, and the refusals of mismatched spaces before the first step."""

import pytest
import torch
from cliutil import assert_clean_error, run_cli

from diffplug.checkpoint import load_component, read_metadata, save_component
from diffplug.components import IdentityAutoencoder
from diffplug.errors import IncompatibleError
from diffplug.latent import check_autoencoder, fingerprint, recorded_autoencoder
from diffplug.output import read_recipe
from diffplug.registry import default_registry
from diffplug.resolve import load_model
from diffplug.sampling import sample
from diffplug.transforms import StaticThreshold
from diffplug_ddim.scheduler import DDIM
from diffplug_vae.model import KLVAE, KLVAEConfig


def tiny_vae(seed):
    torch.manual_seed(seed)
    return KLVAE(KLVAEConfig(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4))


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    save_component(tiny_vae(0), root / "vae.safetensors", kind="autoencoder")
    save_component(tiny_vae(1), root / "other.safetensors", kind="autoencoder")
    result = run_cli("train", "--method", "ddpm", "--data", "digits", "--size", "16",
                     "--autoencoder", str(root / "vae.safetensors"), "--width", "16",
                     "--steps", "2", "--batch-size", "4", "--out", str(root / "run"), "-q")  # fmt: skip
    assert result.code == 0, result.err
    return root


def test_training_in_latents_records_the_autoencoder_and_sizes_the_model(latent_model):
    meta = read_metadata(latent_model / "run" / "model.safetensors")
    assert meta["config"]["channels"] == 4 and meta["config"]["size"] == 8  # 16 px / 2
    record = meta["extra"]["autoencoder"]
    vae = load_component(latent_model / "vae.safetensors", kind="autoencoder")
    assert record["source"].endswith("vae.safetensors") and record["name"] == "kl-vae"
    assert record["sha256"] == fingerprint(vae)
    assert fingerprint(vae) != fingerprint(tiny_vae(1))


def test_run_decodes_latent_samples_to_images(latent_model, tmp_path):
    out = tmp_path / "s.safetensors"
    result = run_cli("run", "--model", str(latent_model / "run" / "model.safetensors"),
                     "--sampler", "ddim", "--steps", "2", "--num-samples", "3", "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    from diffplug.checkpoint import load_tensors

    assert load_tensors(out)["samples"].shape == (3, 1, 16, 16)
    assert read_recipe(out)["autoencoder"]["source"].endswith("vae.safetensors")


def test_mismatched_spaces_are_refused_before_the_first_step(latent_model):
    registry = default_registry()
    model, _ = load_model(registry, str(latent_model / "run" / "model.safetensors"))
    own = recorded_autoencoder(model, registry)
    check_autoencoder(model, own)  # its own: fine
    other = load_component(latent_model / "other.safetensors", kind="autoencoder")
    with pytest.raises(IncompatibleError, match="fingerprint differs"):
        sample(model, DDIM(), steps=2, seeds=[0], autoencoder=other)
    with pytest.raises(IncompatibleError, match="latent space of autoencoder"):
        sample(model, DDIM(), steps=2, seeds=[0])
    with pytest.raises(IncompatibleError, match="latent space of autoencoder"):
        sample(model, DDIM(), steps=2, seeds=[0], autoencoder=IdentityAutoencoder())
    pixel, _ = load_model(registry, "ddpm-digits")
    with pytest.raises(IncompatibleError, match="works in pixel space"):
        sample(pixel, DDIM(), steps=2, seeds=[0], autoencoder=own)
    # clipping x0_hat to [-1, 1] is a pixel-space idea: latents have no such range
    steps = []
    for kw in ({"transforms": [StaticThreshold()]}, {}):
        sampler = DDIM.from_options(clip_sample=not kw)
        with pytest.raises(IncompatibleError, match="latent of its autoencoder"):
            sample(model, sampler, steps=2, seeds=[0], autoencoder=own, callback=steps.append,
                   **kw)  # fmt: skip
    assert steps == []


def test_a_latent_model_whose_autoencoder_is_gone_fails_cleanly(latent_model, tmp_path):
    import shutil

    moved = tmp_path / "copy"
    shutil.copytree(latent_model / "run", moved)
    (latent_model / "vae.safetensors").rename(tmp_path / "vae.safetensors")
    try:
        result = run_cli("run", "--model", str(moved / "model.safetensors"), "--sampler", "ddim",
                         "-q", "-o", str(tmp_path / "x.png"))  # fmt: skip
        assert_clean_error(result, "latents of autoencoder")
    finally:
        (tmp_path / "vae.safetensors").rename(latent_model / "vae.safetensors")
