"""The KL autoencoder against diffusers' AutoencoderKL: same weight names (strict loading of
its state dict and of its save_pretrained folder), same posterior, latents and decodings to
1e-5 in float32; shapes, posterior sampling, the loading errors, diffplug checkpoints."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from diffplug import (
    CheckpointError,
    UnknownComponentError,
    UserError,
    default_registry,
    load_component,
    read_metadata,
    save_component,
)
from diffplug.testing import fresh_registry, torch_threads
from diffplug_vae.model import KLVAE, KLVAEConfig, config_from_diffusers, fit_scaling_factor

TOL = 1e-5
SMALL = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
DEEP = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    latent_channels=3,
    norm_num_groups=4,
    sample_size=16,
    mid_block_add_attention=False,
    use_quant_conv=False,
    scaling_factor=0.5,
    shift_factor=0.25,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def reference(config, seed=0):
    """A seeded diffusers AutoencoderKL; weights perturbed so no layer is at its init (zero
    biases, unit norms) and every term of every formula shows."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(config, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, config.get("in_channels", 3), 16, 16, generator=g) * 2 - 1


def diffusers_config(model):
    return {k: v for k, v in dict(model.config).items()}


def assert_parity(ref, ours, config):
    x = images(config)
    scale = config.get("scaling_factor", 0.18215)
    shift = config.get("shift_factor") or 0.0
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode_distribution(x)
        diffs = {
            "mean": (dist.mean - mean).abs().max().item(),
            "logvar": (dist.logvar - logvar).abs().max().item(),
            "encode": (ours.encode(x) - (dist.mean - shift) * scale).abs().max().item(),
        }
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
        expected = ref.decode(z).sample
        diffs["decode"] = (ours.decode((z - shift) * scale) - expected).abs().max().item()
        diffs["roundtrip"] = (ours.decode(ours.encode(x)) - ref(x).sample).abs().max().item()
    assert all(v <= TOL for v in diffs.values()), diffs
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    return diffs


@pytest.mark.parametrize("config", [SMALL, DEEP], ids=["small", "deep-no-attn-no-quant"])
def test_state_dict_parity(config, tmp_path):
    ref = reference(config)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = KLVAE.from_diffusers(path, diffusers_config(ref))
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert_parity(ref, ours, config)


@pytest.mark.parametrize("config", [SMALL, DEEP], ids=["small", "deep-no-attn-no-quant"])
def test_save_pretrained_folder_parity(config, tmp_path):
    ref = reference(config, seed=3)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = KLVAE.from_diffusers(tmp_path / "vae")
    assert not ours.training
    assert ours.config.block_out_channels == list(config["block_out_channels"])
    assert_parity(ref, ours, config)
    # a pipeline folder's vae/ is found, and a bare file finds the config.json beside it
    assert_parity(ref, KLVAE.from_diffusers(tmp_path), config)
    bare = KLVAE.from_diffusers(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert_parity(ref, bare, config)


def test_half_precision_files_load_into_float32(tmp_path):
    ref = reference(SMALL)
    path = tmp_path / "vae.fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = KLVAE.from_diffusers(path, diffusers_config(ref))
    for key, value in ours.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, ref.state_dict()[key].half().float()), key


def test_strict_state_dict_keys_match_diffusers():
    """The layout itself: every diffusers key, shape for shape, nothing more."""
    for config in (SMALL, DEEP):
        ref = AutoencoderKL(**config)
        ours = KLVAE(config_from_diffusers(diffusers_config(ref)))
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in want
    assert "decoder.up_blocks.2.resnets.0.conv_shortcut.weight" in want
    assert "decoder.up_blocks.0.resnets.2.conv1.weight" in want
    assert not any("attentions" in k or "quant_conv.weight" == k for k in want)


def test_posterior_sample_is_mean_plus_std_times_the_generators_noise():
    ref = reference(SMALL)
    ours = KLVAE(config_from_diffusers(diffusers_config(ref)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = images(SMALL, n=3)
    with torch.no_grad():
        mean, logvar = ours.encode_distribution(x)
        scale = ours.config.scaling_factor
        assert torch.equal(ours.encode(x), mean * scale)  # the mean by default
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        want = (mean + torch.exp(0.5 * logvar) * noise) * scale
        got = ours.encode(x, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not torch.allclose(got, mean * scale)
        # the same draw as diffusers' latent_dist.sample with the same generator
        ref_sample = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        assert (got - ref_sample * scale).abs().max() <= TOL
        # sample_posterior makes it the default; the same seed gives the same latents
        sampling = KLVAE(KLVAEConfig(**{**vars(ours.config), "sample_posterior": True}))
        sampling.load_state_dict(ours.state_dict())
        torch.manual_seed(11)
        a = sampling.encode(x)
        torch.manual_seed(11)
        assert torch.equal(a, sampling.encode(x)) and not torch.equal(a, mean * scale)
        assert torch.equal(sampling.encode(x, sample=False), mean * scale)


def test_latent_and_image_shapes():
    vae = KLVAE(KLVAEConfig(block_out_channels=[8, 16, 16], latent_channels=4, norm_num_groups=4))
    assert vae.downsampling == 4
    assert vae.latent_shape((1, 32, 32)) == (4, 8, 8)
    assert vae.image_shape((4, 8, 8)) == (1, 32, 32)
    assert vae.latent_shape((1, 16, 24)) == (4, 4, 6)
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 1, 32, 32))
        assert tuple(z.shape[1:]) == vae.latent_shape((1, 32, 32))
        assert tuple(vae.decode(z).shape[1:]) == (1, 32, 32)
    with pytest.raises(UserError, match="multiples of 4"):
        vae.latent_shape((1, 30, 32))
    with pytest.raises(UserError, match="1-channel images, not 3"):
        vae.latent_shape((3, 32, 32))
    with pytest.raises(UserError, match="4-channel latents, not 3"):
        vae.image_shape((3, 8, 8))
    assert KLVAE(KLVAEConfig(block_out_channels=[8], norm_num_groups=4)).latent_shape(
        (1, 5, 5)
    ) == (4, 5, 5)


def test_diffplug_checkpoint_round_trip(tmp_path):
    ref = reference(DEEP)
    vae = KLVAE(config_from_diffusers(diffusers_config(ref), sample_posterior=True))
    vae.load_state_dict(ref.state_dict())
    path = tmp_path / "vae.safetensors"
    save_component(vae, path, kind="autoencoder")
    meta = read_metadata(path)
    assert (meta["kind"], meta["plugin"], meta["name"]) == ("autoencoder", "diffplug-vae", "kl-vae")
    back = load_component(path, kind="autoencoder")
    assert type(back) is KLVAE and back.config == vae.config
    for key, value in vae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = images(DEEP)
    with torch.no_grad():
        assert torch.equal(back.encode(x, sample=False), vae.encode(x, sample=False))
    with pytest.raises(CheckpointError, match="autoencoder checkpoint, but a denoiser"):
        load_component(path, kind="denoiser")


def test_registered_under_its_names():
    registry = default_registry()
    assert registry.load("autoencoder", "kl-vae") is KLVAE
    assert registry.load("method", "vae").trains == "autoencoder"
    # without the plugin, both names are unknown and the message says where to look
    bare = fresh_registry()
    for kind, name in (("autoencoder", "kl-vae"), ("method", "vae")):
        with pytest.raises(UnknownComponentError, match="No installed plugin registers it"):
            bare.get(kind, name)


def test_scaling_factor_fit_gives_unit_variance_latents():
    vae = KLVAE(KLVAEConfig(block_out_channels=[8, 8], norm_num_groups=4))
    x = images({"in_channels": 1}, n=16)
    factor = fit_scaling_factor(vae, x, batch_size=5)
    vae.config.scaling_factor = factor
    with torch.no_grad():
        assert vae.encode(x).std().item() == pytest.approx(1.0, rel=1e-4)


# -- errors ----------------------------------------------------------------------------------
def saved(tmp_path, config=SMALL, edit=None):
    ref = reference(config)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if edit:
        edit(state)
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    return path, diffusers_config(ref)


def test_mismatched_keys_are_named(tmp_path):
    def edit(state):
        del state["decoder.conv_out.bias"]
        state["decoder.extra.weight"] = torch.zeros(1)

    path, config = saved(tmp_path, edit=edit)
    with pytest.raises(CheckpointError) as err:
        KLVAE.from_diffusers(path, config)
    assert "missing 1 (decoder.conv_out.bias)" in str(err.value)
    assert "unexpected 1 (decoder.extra.weight)" in str(err.value)


def test_wrong_shapes_are_named(tmp_path):
    path, config = saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"decoder.conv_in.weight: file \(16, 4, 3, 3\)"):
        KLVAE.from_diffusers(path, {**config, "latent_channels": 3})


def test_legacy_attention_names_load(tmp_path):
    names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

    def edit(state):
        for key in [k for k in state if "attentions.0." in k]:
            new = key
            for a, b in names.items():
                new = new.replace("attentions.0." + a, "attentions.0." + b)
            state[new] = state.pop(key)

    path, config = saved(tmp_path, edit=edit)
    assert "encoder.mid_block.attentions.0.query.weight" in load_file(str(path))
    ours = KLVAE.from_diffusers(path, config)
    assert_parity(reference(SMALL), ours, SMALL)


def test_pickles_and_missing_files_are_refused(tmp_path):
    pickle = tmp_path / "vae.ckpt"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="pickle"):
        KLVAE.from_diffusers(pickle, {})
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        KLVAE.from_diffusers(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        KLVAE.from_diffusers(folder)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        KLVAE.from_diffusers(tmp_path / "nope.safetensors", {})
    path, _ = saved(tmp_path)
    with pytest.raises(UserError, match="needs its config"):
        KLVAE.from_diffusers(path)
    with pytest.raises(UserError, match="no such config file"):
        KLVAE.from_diffusers(path, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a JSON config"):
        KLVAE.from_diffusers(path, tmp_path / "bad.json")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        KLVAE.from_diffusers(truncated, {})


def test_ldm_checkpoints_are_recognised(tmp_path):
    path = tmp_path / "sd.safetensors"
    save_file({"first_stage_model.encoder.down.0.block.0.norm1.weight": torch.ones(8)}, str(path))
    with pytest.raises(CheckpointError, match="CompVis/LDM"):
        KLVAE.from_diffusers(path, {**SMALL, "norm_num_groups": 4})


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"_class_name": "VQModel"}, "diffusers VQModel"),
        ({"act_fn": "gelu"}, "act_fn 'gelu'"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "down_block_types",
        ),
        ({"new_knob": 1}, "config keys: new_knob"),
        ({"norm_num_groups": 3}, "--norm-num-groups 3 must divide"),
        ({"layers_per_block": 0}, "--layers-per-block must be >= 1"),
    ],
)
def test_unsupported_configs_are_refused(change, needle):
    base = diffusers_config(AutoencoderKL(**SMALL))
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        config = config_from_diffusers({**base, **change})
        KLVAE(config)


def test_diffusers_defaults_fill_missing_keys():
    config = config_from_diffusers({"_class_name": "AutoencoderKL"})
    assert config.in_channels == 3 and config.block_out_channels == [64]
    assert config.norm_num_groups == 32 and config.scaling_factor == 0.18215
    assert config.shift_factor is None and config.use_quant_conv
