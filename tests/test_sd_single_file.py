"""Single-file SD checkpoints in the original layout: written here from a tiny pipeline's
weights with ``keymap`` run forwards (the inverse of the loader's map), they import to a
checkpoint whose tensors are bitwise the folder import's; the map's anchors are checked
against the published layout by name; unknown layouts, missing variants and pickles are
refused with one line."""

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from safetensors.torch import save_file
from tiny_sd import make_pipeline

import diffplug
from diffplug.testing import torch_threads

pytest.importorskip("diffusers")
keymap = pytest.importorskip("diffplug_diffusers.keymap")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def original(pipe, kind):
    """The pipeline's weights in the original single-file layout."""
    out = {}
    cfg = pipe.unet.config
    layers = cfg.layers_per_block
    up = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    for k, v in pipe.unet.state_dict().items():
        out[keymap.unet_key(k, layers, up)] = v
    levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name = keymap.vae_key(k, levels)
        out[name] = v[:, :, None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    texts = {"sd15": [(pipe.text_encoder, keymap.SD_CLIP, "clip")],
             "sd2": [(pipe.text_encoder, keymap.SD2_CLIP, "openclip")],
             "sdxl": [(pipe.text_encoder, keymap.XL_CLIP, "clip"),
                      (getattr(pipe, "text_encoder_2", None), keymap.XL_BIGG, "openclip")]}  # fmt: skip
    for encoder, prefix, layout in texts[kind]:
        fused = {}
        for k, v in encoder.state_dict().items():
            if layout == "clip":
                out[keymap.clip_key(k, prefix)] = v
                continue
            name, third = keymap.openclip_key(k, prefix)
            if third is not None:
                fused.setdefault(name, [None] * 3)[third] = v
            else:
                out[name] = v.T.contiguous() if name.endswith("text_projection") else v
        out.update({n: torch.cat(parts) for n, parts in fused.items()})
        if kind == "sd2":  # OpenCLIP's last layer, which SD 2 never reads: random here
            n = encoder.config.num_hidden_layers
            for k in [k for k in list(out) if f".resblocks.{n - 1}." in k]:
                out[k.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.")] = torch.randn_like(
                    out[k]
                )
    out["alphas_cumprod"] = torch.zeros(1000)  # schedule buffers are ignored
    return {k: v.contiguous() for k, v in out.items()}


def test_map_anchors_follow_the_published_layout():
    assert keymap.unet_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                           2, [False, True, True, True]) == (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")  # fmt: skip
    assert keymap.unet_key("down_blocks.1.resnets.1.time_emb_proj.bias", 2, []) == (
        "model.diffusion_model.input_blocks.5.0.emb_layers.1.bias"
    )
    assert keymap.unet_key("up_blocks.1.upsamplers.0.conv.weight", 2, [False, True]) == (
        "model.diffusion_model.output_blocks.5.2.conv.weight"
    )
    assert keymap.unet_key("mid_block.resnets.1.conv2.weight", 2, []) == (
        "model.diffusion_model.middle_block.2.out_layers.3.weight"
    )
    assert keymap.vae_key("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 4) == (
        "first_stage_model.decoder.up.3.block.2.nin_shortcut.weight"
    )
    assert keymap.vae_key("encoder.mid_block.attentions.0.to_out.0.bias", 4) == (
        "first_stage_model.encoder.mid.attn_1.proj_out.bias"
    )
    assert keymap.openclip_key("text_model.encoder.layers.3.self_attn.v_proj.weight", "m.") == (
        "m.transformer.resblocks.3.attn.in_proj_weight",
        2,
    )


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_a_single_file_imports_bitwise_equal_to_the_folder(kind, tmp_path):
    pipe = make_pipeline(seed=2, sd2=kind == "sd2", sdxl=kind == "sdxl")
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder, safe_serialization=True)
    single = tmp_path / f"{kind}.safetensors"
    save_file(original(pipe, kind), str(single))
    variant = ["--variant", "sd2"] if kind == "sd2" else []
    outs = {}
    for name, args in {"folder": [str(folder)],
                       "file": [str(single), "--tokenizer", str(folder), *variant]}.items():  # fmt: skip
        outs[name] = tmp_path / f"{name}.safetensors"
        result = run_cli("import-diffusers", *args, "-o", str(outs[name]))
        assert result.code == 0, result.err
    a, b = (diffplug.load_tensors(outs[n]) for n in ("folder", "file"))
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_an_sd2_file_needs_its_variant_and_an_unknown_layout_is_refused(tmp_path):
    pipe = make_pipeline(seed=2, sd2=True)
    single = tmp_path / "sd2.safetensors"
    save_file(original(pipe, "sd2"), str(single))
    out = str(tmp_path / "x.safetensors")
    assert_clean_error(run_cli("import-diffusers", str(single), "-o", out), "--variant sd2")
    assert_clean_error(run_cli("import-diffusers", str(single), "--variant", "sdxl", "-o", out),
                       "an sd2 checkpoint")  # fmt: skip
    odd = tmp_path / "odd.safetensors"
    save_file({"net.layer.weight": torch.zeros(2), "head.bias": torch.zeros(1)}, str(odd))
    assert_clean_error(run_cli("import-diffusers", str(odd), "-o", out),
                       "not a Stable Diffusion checkpoint", "head.bias", "net.layer.*")  # fmt: skip
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04not really")
    assert_clean_error(run_cli("import-diffusers", str(pickled), "-o", out), "pickle")
