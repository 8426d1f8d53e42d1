"""The vae method through the core's training loop and ``diffplug train``: the loss formula,
randomness from the trainer's generator only, learning, exact resume, the CLI and its errors."""

import pytest
import torch
from cliutil import assert_clean_error, run_cli

from diffplug import (
    TrainConfig,
    Trainer,
    digits,
    load_component,
    load_tensors,
    read_metadata,
    to_digits,
    train,
)
from diffplug.testing import torch_threads
from diffplug_vae import calibrate
from diffplug_vae.method import VAEMethod, VAEMethodConfig, digits_view
from diffplug_vae.model import KLVAE, KLVAEConfig


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return KLVAE(KLVAEConfig(block_out_channels=[8, 16], norm_num_groups=4, **kw))


def test_loss_is_reconstruction_plus_weighted_kl_with_the_generators_noise():
    vae, method = tiny(), VAEMethod(VAEMethodConfig(kl_weight=0.01))
    x = digits("train", 16).images[:4]
    state = torch.get_rng_state()
    terms = method.terms(vae, x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # nothing from the global stream
    mean, logvar = vae.encode_distribution(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    recon = vae.decode_unscaled(mean + torch.exp(0.5 * logvar) * noise)
    rec = (recon - x).pow(2).mean()
    kl = (0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)).sum() / len(x)
    torch.testing.assert_close(terms["reconstruction"], rec)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], rec + 0.01 * kl)
    again = method.loss(vae, x, None, torch.Generator().manual_seed(3))
    assert torch.equal(again, terms["loss"])
    other = method.loss(vae, x, None, torch.Generator().manual_seed(4))
    assert not torch.equal(other, terms["loss"])
    l1 = VAEMethod(VAEMethodConfig(reconstruction="l1", kl_weight=0.0))
    l1_terms = l1.terms(vae, x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(l1_terms["loss"], (recon - x).abs().mean())


def test_perceptual_term_uses_the_frozen_digits_classifier():
    x = digits("train", 16).images[:4]
    torch.testing.assert_close(digits_view(x), to_digits(x))  # the evaluator's view, with grad
    vae = tiny()
    off = VAEMethod().terms(vae, x, torch.Generator().manual_seed(0))
    assert off["perceptual"].item() == 0
    method = VAEMethod(VAEMethodConfig(perceptual_weight=1.0))
    terms = method.terms(vae, x, torch.Generator().manual_seed(0))
    assert terms["perceptual"].item() > 0
    torch.testing.assert_close(
        terms["loss"], off["loss"] + terms["perceptual"], rtol=1e-6, atol=1e-7
    )
    terms["perceptual"].backward()
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    classifier = method._classifier(x.device)
    assert not any(p.requires_grad for p in classifier.parameters())


def test_forty_steps_reduce_the_reconstruction_loss():
    config = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, ema_decay=0.9)
    trainer = Trainer(tiny(), VAEMethod(), digits("train", 16), config)
    losses = [trainer.train_step().item() for _ in range(40)]
    last = sum(losses[-5:]) / 5
    assert last < 0.3 * losses[0], (losses[0], last)
    heldout = digits("heldout", 16).images[:64]
    fresh = VAEMethod().terms(tiny(), heldout, torch.Generator().manual_seed(0))
    trained = VAEMethod().terms(trainer.model, heldout, torch.Generator().manual_seed(0))
    assert trained["reconstruction"] < 0.3 * fresh["reconstruction"]


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=6, batch_size=8, warmup=2, checkpoint_every=3)
    data = digits("train", 8)
    train(tiny(), VAEMethod(), data, config, tmp_path / "one", progress=False)
    train(tiny(), VAEMethod(), data, config, tmp_path / "two", progress=False, stop_after=3)
    train(tiny(seed=5), VAEMethod(), data, config, tmp_path / "two", progress=False, resume=True)
    a = load_tensors(tmp_path / "one" / "model.safetensors")
    b = load_tensors(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_writes_an_autoencoder_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ("train", "--method", "vae", "--data", "digits", "--size", "32",
            "--block-out-channels", "8,16", "--latent-channels", "4", "--steps", "3",
            "--batch-size", "8", "--out", str(out))  # fmt: skip
    result = run_cli(*args)
    assert result.code == 0, result.err
    assert "training kl-vae" in result.err
    meta = read_metadata(out / "model.safetensors")
    assert (meta["kind"], meta["plugin"], meta["name"]) == ("autoencoder", "diffplug-vae", "kl-vae")
    assert meta["extra"]["method"]["name"] == "vae" and meta["extra"]["step"] == 3
    vae = load_component(out / "model.safetensors", kind="autoencoder")
    assert isinstance(vae, KLVAE) and vae.config.block_out_channels == [8, 16]
    assert vae.latent_shape((1, 32, 32)) == (4, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(vae.decode(vae.encode(digits("heldout", 32).images[:2]))).all()
    assert run_cli(*[a if a != "3" else "4" for a in args], "--resume", "-q").code == 0
    assert read_metadata(out / "model.safetensors")["extra"]["step"] == 4
    # the recipe's last step: store the scaling factor that makes the latents unit-variance
    before = load_tensors(out / "model.safetensors")
    calibrate.main([str(out / "model.safetensors"), "--size", "32"])
    vae = load_component(out / "model.safetensors", kind="autoencoder")
    assert vae.config.scaling_factor != 1.0
    assert read_metadata(out / "model.safetensors")["extra"]["step"] == 4
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert vae.encode(digits("train", 32).images).std().item() == pytest.approx(1, rel=1e-3)


def test_train_cli_errors(tmp_path):
    base = ("train", "--method", "vae", "--size", "16", "--steps", "1", "--batch-size", "2", "-q")
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "a"), "--lrr", "1"),
        "no method, autoencoder or loop option --lrr",
        "--kl-weight",
        "--block-out-channels",
    )
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "b"), "--conditioner", "lowres"),
        "--conditioner is for denoisers; method vae trains an autoencoder",
    )
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "c"), "--norm-num-groups", "3"),
        "--norm-num-groups 3 must divide",
    )
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "d"), "--in-channels", "3", "--out-channels", "3"),
        "the data has 1 channel(s)",
    )
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "e"), "--size", "18", "--block-out-channels", "8,8,8",
                "--norm-num-groups", "4"),
        "multiples of 4",
    )  # fmt: skip
    assert_clean_error(
        run_cli(*base, "--out", str(tmp_path / "f"), "--denoiser", "unet"),
        "unknown autoencoder 'unet'",
    )
