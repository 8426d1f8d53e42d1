"""diffusers UNets as diffplug denoisers: folders, checkpoints, the CLI importer, DDIM parity
with diffusers' own loop, text conditioning with masks, and every refusal."""

import json

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from diffusers import DDIMScheduler

from diffplug import (
    CheckpointError,
    IncompatibleError,
    UnknownComponentError,
    UserError,
    default_registry,
    load_component,
    read_metadata,
    sample,
)
from diffplug.testing import check_denoiser
from diffplug_diffusers.unet import DiffusersUNet, from_folder

TIMES = [999.0, 500.0, 37.0, 0.0, 123.25]  # the last one fractional (a bridged sampler's)
BATCH = 4


def inputs(shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((len(TIMES), *shape), generator=g), torch.tensor(TIMES)


def reference(unet, x, t, **kw):
    with torch.no_grad():
        return unet(x, t, **kw).sample


def ours(model, x, t, cond=None):
    with torch.no_grad():
        return model(x, t, cond)


def pipeline_folder(tmp_path, unet, scheduler=None):
    """A diffusers pipeline folder: model_index.json, unet/, scheduler/."""
    root = tmp_path / "pipe"
    unet.save_pretrained(root / "unet", safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return root


# ------------------------------------------------------------------ loading, checkpoints


def test_unet_folder_loads_with_identical_outputs_and_warns_about_defaults(
    tmp_path, make_unet, diff
):
    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    with pytest.warns(UserWarning, match="no scheduler config"):
        model = from_folder(tmp_path / "unet")
    assert model.prediction == "eps" and model.conditioning is None
    assert model.config.process == {
        "name": "vp",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "rescale_zero_terminal_snr": False,
    }
    assert model.sample_shape == (1, 8, 8)
    x, t = inputs()
    assert diff(ours(model, x, t), reference(unet, x, t)) <= 1e-6
    check_denoiser(model)


def test_pipeline_folder_maps_the_scheduler_config_onto_the_vp_process(tmp_path, make_unet, diff):
    unet = make_unet(seed=1)
    sched = DDIMScheduler(
        num_train_timesteps=500,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
    model = DiffusersUNet.from_folder(pipeline_folder(tmp_path, unet, sched))
    assert model.prediction == "v"
    assert model.config.process == {
        "name": "vp",
        "num_train_timesteps": 500,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_zero_terminal_snr": True,
    }
    # the same betas as the scheduler's, bit for bit
    assert torch.equal(model.process.alphas_cumprod, sched.alphas_cumprod)
    x, t = inputs(seed=1)
    t = t.clamp(max=499)
    assert diff(ours(model, x, t), reference(unet, x, t)) <= 1e-6
    # explicit values win over the folder's
    model = DiffusersUNet.from_folder(
        pipeline_folder(tmp_path / "2", unet, sched), prediction="eps", process={"beta_end": 0.02}
    )
    assert model.prediction == "eps" and model.config.process["beta_end"] == 0.02


def test_import_command_then_load_component_then_run(tmp_path, make_unet, diff):
    unet = make_unet(seed=2)
    sched = DDIMScheduler(prediction_type="sample")
    folder = pipeline_folder(tmp_path, unet, sched)
    out = tmp_path / "model.safetensors"
    result = run_cli("import-diffusers", str(folder), "-o", str(out))
    assert result.code == 0, result.err
    assert "UNet2DModel 1x8x8, x0 prediction" in result.err
    meta = read_metadata(out)
    assert (meta["plugin"], meta["name"]) == ("diffplug-diffusers", "diffusers-unet")
    assert meta["config"]["unet_class"] == "UNet2DModel"
    assert meta["extra"]["diffusers"]["scheduler_config"]["_class_name"] == "DDIMScheduler"
    # rebuilt from the file alone: from_config + safetensors weights
    model = load_component(out, kind="denoiser")
    assert isinstance(model, DiffusersUNet) and model.prediction == "x0"
    x, t = inputs(seed=2)
    assert diff(ours(model, x, t), reference(unet, x, t)) <= 1e-6
    # no silent overwrite; --overwrite replaces; a checkpoint is a .safetensors file
    assert_clean_error(run_cli("import-diffusers", str(folder), "-o", str(out)), "exists")
    assert_clean_error(run_cli("import-diffusers", str(folder), "-o", str(tmp_path / "m.pt")),
                       "use .safetensors (a checkpoint)")  # fmt: skip
    again = run_cli(
        "import-diffusers",
        str(folder),
        "-o",
        str(out),
        "--overwrite",
        "--prediction",
        "v",
        "--beta-schedule",
        "scaled_linear",
    )
    assert again.code == 0, again.err
    assert read_metadata(out)["config"]["prediction"] == "v"
    assert read_metadata(out)["config"]["process"]["beta_schedule"] == "scaled_linear"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: nothing left beside it
    png = tmp_path / "s.png"
    ran = run_cli(
        "run",
        "--model",
        str(out),
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--num-samples",
        "2",
        "-q",
        "-o",
        str(png),
    )
    assert ran.code == 0, ran.err
    assert png.read_bytes().startswith(b"\x89PNG")


def test_class_conditional_unet_takes_cond_labels(make_unet, diff):
    unet = make_unet(seed=3, num_class_embeds=10)
    model = DiffusersUNet.from_unet(unet)
    assert model.conditioning == "class"
    x, t = inputs(seed=3)
    labels = torch.tensor([1, 7, 3, 0, 9])
    got = ours(model, x, t, {"labels": labels})
    assert diff(got, reference(unet, x, t, class_labels=labels)) <= 1e-6
    with pytest.raises(IncompatibleError, match="labels"):
        ours(model, x, t)


def test_learned_variance_half_is_dropped(make_unet, diff):
    unet = make_unet(seed=4, out_channels=2)
    model = DiffusersUNet.from_unet(unet)
    x, t = inputs(seed=4)
    assert diff(ours(model, x, t), reference(unet, x, t)[:, :1]) <= 1e-6


# ---------------------------------------------------------------- DDIM against diffusers


KINDS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_ddim(unet, prediction, clip, eta, steps, x, zs, dtype):
    """diffusers' DDIM loop as DDIMPipeline runs it (a 0-dim integer timestep per call)."""
    sched = DDIMScheduler(clip_sample=clip, prediction_type=KINDS[prediction])
    if dtype == torch.float64:  # the same float32 table, exact arithmetic
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.step(unet(x, t).sample, t, x, eta=eta, variance_noise=zs[i]).prev_sample
    return x


# float64 pins the arithmetic (measured <= 1.8e-14). float32: an untrained UNet read as an
# eps-predictor needs diffusers' default clip_sample (diffplug: --clip-sample) to stay in range
# (unclipped its x0_hat is ~150 at t = 999), and its eps -> x0 conversion multiplies float32
# rounding by 1/alpha (57 at t = 900): measured 2.4e-5 at 10 steps, so eps gets 1e-4; v and x0
# (measured <= 2.3e-6) get 1e-5.
@pytest.mark.parametrize(
    "prediction, clip, eta, steps",
    [
        ("eps", True, 0.0, 10),
        ("eps", True, 1.0, 25),
        ("v", False, 0.0, 25),
        ("v", False, 0.5, 10),
        ("x0", False, 0.0, 10),
    ],
)
def test_diffplug_ddim_on_the_unet_equals_diffusers_ddim_loop(
    make_unet, diff, noise, prediction, clip, eta, steps
):
    g = torch.Generator().manual_seed(6)
    x_T = torch.randn((BATCH, 1, 8, 8), generator=g)
    zs = torch.randn((steps, BATCH, 1, 8, 8), generator=g)
    ddim = default_registry().load("scheduler", "ddim").from_options(eta=eta, clip_sample=clip)
    for dtype, tol in [
        (torch.float64, 1e-10),
        (torch.float32, 1e-4 if prediction == "eps" else 1e-5),
    ]:
        unet = make_unet(seed=5).to(dtype)
        want = diffusers_ddim(
            unet, prediction, clip, eta, steps, x_T.to(dtype), zs.to(dtype), dtype
        )
        replay = noise.replay(x_T.to(dtype), zs.to(dtype))
        model = DiffusersUNet.from_unet(unet, prediction=prediction)
        got = sample(model, ddim, steps=steps, seeds=range(BATCH), noise=replay, dtype=dtype)
        assert replay.drawn == (steps - 1 if eta > 0 else 0)
        assert got.dtype == dtype and want.abs().max() < 10
        assert diff(got, want) <= tol, dtype


# ------------------------------------------------------------------ text conditioning


def text_conditioner(width):
    """diffplug's own text conditioner (diffplug-imagen) when installed, else its format."""
    try:
        cls = default_registry().load("conditioner", "text")
    except UnknownComponentError:
        return None
    torch.manual_seed(0)
    cond = cls.from_options(dim=width, heads=4, layers=1, max_tokens=8).eval()
    cond.name = "text"
    return cond


def text_cond(width, prompts=("a seven", "1", "", "nine")):
    conditioner = text_conditioner(width)
    if conditioner is not None:
        with torch.no_grad():
            return conditioner(list(prompts))
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros((len(prompts), 9), dtype=torch.bool)
    for k, p in enumerate(prompts):
        mask[k, : 1 + len(p)] = True
    text = torch.randn((len(prompts), 9, width), generator=g)
    return {"text": text, "text_mask": mask, "text_pooled": text[:, 0]}


def test_text_unet_passes_the_text_and_its_mask(make_text_unet, diff):
    unet = make_text_unet(seed=7, width=16)
    model = DiffusersUNet.from_unet(unet)
    assert model.conditioning == "text" and model.text_width == 16
    cond = text_cond(16)
    mask = cond["text_mask"]
    assert mask.dtype == torch.bool and not mask.all() and mask.any(1).all()
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0, 400.0, 10.0, 250.5])
    got = ours(model, x, t, cond)
    want = reference(unet, x, t, encoder_hidden_states=cond["text"], encoder_attention_mask=mask)
    assert diff(got, want) <= 1e-6
    # masked tokens are invisible: new values there change nothing...
    scrambled = dict(cond, text=torch.where(mask[..., None], cond["text"], 100.0))
    assert diff(ours(model, x, t, scrambled), got) <= 1e-6
    # ...while the mask is what hides them, and unmasked tokens do count
    assert diff(ours(model, x, t, dict(scrambled, text_mask=torch.ones_like(mask))), got) > 1e-3
    visible = dict(cond, text=torch.where(mask[..., None], cond["text"] + 1.0, cond["text"]))
    assert diff(ours(model, x, t, visible), got) > 1e-3


def test_text_unet_samples_with_guidance_under_ddim(make_text_unet):
    conditioner = text_conditioner(16)
    if conditioner is None:
        pytest.skip("no diffplug text conditioner installed (diffplug-imagen)")
    model = DiffusersUNet.from_unet(make_text_unet(seed=8, width=16))
    ddim = default_registry().load("scheduler", "ddim")()
    out = sample(
        model,
        ddim,
        steps=4,
        seeds=[0, 1],
        conditioner=conditioner,
        conditions=["3", "a four"],
        guidance=3.0,
    )
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_run_puts_another_plugins_conditioner_under_an_imported_text_unet(make_text_unet, tmp_path):
    """An imported text UNet records no text encoder; `run --conditioner` supplies one (here
    diffplug-imagen's, at the UNet's width), a wrong width is refused before any step, and a
    conditioner on an unconditional model is refused by kind."""
    from diffplug import read_recipe, save_component

    if text_conditioner(16) is None:
        pytest.skip("no diffplug text conditioner installed (diffplug-imagen)")
    model = tmp_path / "text-unet.safetensors"
    save_component(DiffusersUNet.from_unet(make_text_unet(seed=3, width=16)), model,
                   kind="denoiser")  # fmt: skip
    common = ["run", "--model", str(model), "--sampler", "ddim", "--steps", "3", "-q",
              "--num-samples", "2", "--conditioner", "text", "--heads", "4", "--layers", "1",
              "--prompt", "a seven", "--guidance", "2"]  # fmt: skip
    out = tmp_path / "s.safetensors"
    result = run_cli(*common, "--dim", "16", "-o", str(out))
    assert result.code == 0, result.err
    recipe = read_recipe(out)
    assert recipe["conditioner"]["name"] == "text" and recipe["conditioner"]["options"]["dim"] == 16
    assert recipe["guidance"] == 2.0
    bare = run_cli("run", "--model", str(model), "--sampler", "ddim", "--prompt", "7", "-o",
                   str(tmp_path / "bare.png"))  # fmt: skip
    assert_clean_error(bare, "takes text conditioning but none is given", "--conditioner NAME")
    wrong = run_cli(*common, "--dim", "12", "-o", str(tmp_path / "w.safetensors"))
    assert_clean_error(wrong, "cannot read what conditioner 'text'")
    assert not (tmp_path / "w.safetensors").exists()
    plain = run_cli("run", "--model", "ddpm-digits", "--sampler", "ddim", "--conditioner",
                    "text", "--prompt", "7", "-o", str(tmp_path / "p.png"))  # fmt: skip
    assert_clean_error(
        plain, "model ddpm-digits: the denoiser is unconditional but conditioner 'text' gives text"
    )


def test_text_width_mismatch_is_refused(make_text_unet):
    model = DiffusersUNet.from_unet(make_text_unet(seed=9, width=16))
    cond = text_cond(12)
    x = torch.randn((4, 1, 8, 8))
    with pytest.raises(IncompatibleError, match="width 16 .cross_attention_dim"):
        ours(model, x, torch.full((4,), 10.0), cond)
    with pytest.raises(IncompatibleError, match="cond\\['text'\\]"):
        ours(model, x, torch.full((4,), 10.0), None)


# ------------------------------------------------------------------------------ refusals


def test_pickle_only_folder_is_refused(tmp_path, make_unet):
    folder = tmp_path / "old"
    make_unet().save_pretrained(folder, safe_serialization=True)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="pickle"):
        from_folder(folder)
    out = tmp_path / "o.safetensors"
    assert_clean_error(
        run_cli("import-diffusers", str(folder), "-o", str(out)),
        "diffusion_pytorch_model.bin",
        "pickle",
    )
    assert not out.exists()


def test_missing_and_wrong_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers UNet or pipeline folder"):
        from_folder(tmp_path / "empty")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(IncompatibleError, match="AutoencoderKL"):
        from_folder(tmp_path / "vae")
    assert_clean_error(
        run_cli("import-diffusers", str(tmp_path / "nope"), "-o", str(tmp_path / "x.safetensors")),
        "no such folder",
    )


@pytest.mark.parametrize(
    "scheduler_config, match",
    [
        (
            {
                "_class_name": "DDPMScheduler",
                "beta_schedule": "linear",
                "trained_betas": [0.1] * 10,
            },
            "trained_betas",
        ),
        ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "sigmoid"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "not a DDPM-family"),
        (
            {
                "_class_name": "DDPMScheduler",
                "beta_schedule": "linear",
                "prediction_type": "flow_prediction",
            },
            "flow_prediction",
        ),
    ],
)
def test_unsupported_scheduler_configs_are_refused(tmp_path, make_unet, scheduler_config, match):
    folder = tmp_path / "unet"
    make_unet().save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    with pytest.raises(IncompatibleError, match=match):
        from_folder(folder)


def test_unsupported_unets_are_refused(make_unet, make_text_unet):
    with pytest.raises(IncompatibleError, match="Fourier"):
        DiffusersUNet.from_unet(
            make_unet(time_embedding_type="fourier", block_out_channels=(16, 16))
        )
    with pytest.raises(IncompatibleError, match="text_time"):
        DiffusersUNet.from_unet(
            make_text_unet(
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=64,
            )
        )
    with pytest.raises(UserError, match="import-diffusers"):
        DiffusersUNet()
