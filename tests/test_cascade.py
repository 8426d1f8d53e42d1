"""Cascades across plugins: noise augmentation under any sampler and denoiser, the Imagen
pipeline through the CLI (stages from different plugins), and the run command's text and
conditioner options."""

import pytest
import torch
from cliutil import assert_clean_error, run_cli

from diffplug.data import digits, resize
from diffplug.output import read_recipe
from diffplug.registry import default_registry
from diffplug.sampling import sample
from diffplug.training import TrainConfig, Trainer, train
from diffplug_adm.dual_unet import DualUNet, DualUNetConfig
from diffplug_adm.method import ADMMethod
from diffplug_ddpm.method import DDPMMethod
from diffplug_imagen.text import TextConditioner, TextConfig
from diffplug_imagen.unet import EfficientUNet, EfficientUNetConfig
from diffplug_noise_aug.conditioner import NoiseAugConditioner, NoiseAugConfig

pytest.importorskip("timm")


def aug(**kw):
    cond = NoiseAugConditioner(NoiseAugConfig(**{"low_size": 4, **kw}))
    cond.name = "noise-aug"
    return cond


def test_level_one_is_exactly_noise_under_the_decoupled_process():
    image, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    exact = aug(process={"name": "decoupled"})  # ADM's process reaches alpha = 0 exactly
    got = exact.augment(image, torch.ones(3, dtype=torch.float64), noise)["image"]
    assert torch.equal(got, noise)


class Echo(torch.nn.Module):
    """A 'denoiser' whose x0 is a flat image of value level - 0.7: under a sweep, each sample
    should keep the level whose grey is nearest (in mean square) to its own condition."""

    def __init__(self):
        super().__init__()
        from diffplug.components import DenoiserConfig
        from diffplug.process import build_process

        self.config = DenoiserConfig(size=8, prediction="x0", conditioning="image")
        self.process = build_process({"name": "vp"})
        self.prediction, self.sample_shape, self.conditioning = "x0", (1, 8, 8), "image"

    def forward(self, x, t, cond):
        return torch.ones_like(x) * (cond["aug_level"] - 0.7).view(-1, 1, 1, 1)


@pytest.fixture
def low_res():
    return [resize(digits("heldout", 8).images[k : k + 1], 4)[0] for k in range(6)]


def test_sweep_keeps_each_samples_best_by_the_score_and_is_batch_independent(low_res):
    scheduler = default_registry().load("scheduler", "ddim")()
    seeds = list(range(6))
    kw = dict(steps=3, seeds=seeds, conditions=low_res)
    levels = [0.0, 0.2, 0.4]
    each = [sample(Echo(), scheduler, conditioner=aug(level=u), **kw) for u in levels]
    swept = sample(Echo(), scheduler, conditioner=aug(sweep=levels), **kw)
    scores = torch.stack([aug().score(x, low_res) for x in each])  # (levels, N)
    best = scores.argmin(0)
    for k in range(6):
        torch.testing.assert_close(swept[k], each[best[k]][k], rtol=0, atol=0)
    assert len(set(best.tolist())) > 1  # samples chose differently
    one_by_one = sample(Echo(), scheduler, conditioner=aug(sweep=levels), batch_size=1, **kw)
    torch.testing.assert_close(one_by_one, swept, rtol=0, atol=0)


def test_an_imagen_super_resolution_stage_trains_with_per_sample_levels():
    torch.manual_seed(0)
    model = EfficientUNet(EfficientUNetConfig(size=8, width=16, low_size=4, cross_attention=[]))
    trainer = Trainer(model, DDPMMethod(), digits("train", 8),
                      TrainConfig(batch_size=8, cond_dropout=0.0), conditioner=aug())  # fmt: skip
    _, cond = trainer.batch()
    assert cond["aug_level"].unique().numel() == 8
    assert torch.isfinite(trainer.train_step())


# -- the pipeline through the CLI --------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A text base (8x8, imagen), an SR stage 8->16 (imagen, noise-aug) and an SR stage
    16->32 from another plugin (ADM's dual UNet, noise-aug): two steps of training each."""
    root = tmp_path_factory.mktemp("cascade")
    data8, data16, data32 = (digits("train", s) for s in (8, 16, 32))
    quick = TrainConfig(batch_size=4, steps=2, warmup=1)
    torch.manual_seed(0)
    text = TextConditioner(TextConfig(dim=32, max_tokens=24))  # reads the prompts whole
    text.name = "text"
    train(EfficientUNet(EfficientUNetConfig(size=8, width=16, text_dim=32)), DDPMMethod(),
          data8, quick, root / "base", progress=False, conditioner=text)  # fmt: skip
    sr = aug(low_size=8)
    train(EfficientUNet(EfficientUNetConfig(size=16, width=16, low_size=8, cross_attention=[],
                                            attention=[])),
          DDPMMethod(), data16, quick, root / "sr16", progress=False, conditioner=sr)  # fmt: skip
    adm_sr = aug(low_size=16)
    train(DualUNet(DualUNetConfig(size=32, width=16, mults=[1, 2], cond_encoder="resnet18")),
          ADMMethod(), data32, quick, root / "sr32", progress=False, conditioner=adm_sr)  # fmt: skip
    return {k: str(root / k / "model.safetensors") for k in ("base", "sr16", "sr32")}


def cascade_args(stages, out, *extra):
    return ("run", "--pipeline", "imagen", "--base-model", stages["base"], "--base-steps", "3",
            "--sr-models", f"{stages['sr16']},{stages['sr32']}", "--sr-samplers", "ddim,adm",
            "--sr-steps", "2,3", "-q", "-o", str(out), *extra)  # fmt: skip


def test_cascade_runs_stages_from_two_plugins_and_saves_each_stage(stages, tmp_path):
    out = tmp_path / "final.safetensors"
    result = run_cli(*cascade_args(stages, out, "--prompt", "a handwritten seven",
                                   "--prompt", "3", "--save-stages"))  # fmt: skip
    assert result.code == 0, result.err
    from diffplug.checkpoint import load_tensors

    final = load_tensors(out)["samples"]
    assert final.shape == (2, 1, 32, 32)  # two prompts: two samples
    s0 = load_tensors(tmp_path / "final.stage0.safetensors")["samples"]
    s1 = load_tensors(tmp_path / "final.stage1.safetensors")["samples"]
    assert s0.shape == (2, 1, 8, 8) and s1.shape == (2, 1, 16, 16)
    recipe = read_recipe(out)
    assert recipe["prompts"] == ["a handwritten seven", "3"]
    assert [s["sampler"]["name"] for s in recipe["stages"]] == ["ddim", "ddim", "adm"]
    assert recipe["stages"][1]["conditioner"]["options"]["level"] == 0.1
    # the same seeds give the same images, whatever the batch size
    again = tmp_path / "again.safetensors"
    result = run_cli(*cascade_args(stages, again, "--prompt", "a handwritten seven",
                                   "--prompt", "3", "--batch-size", "1"))  # fmt: skip
    assert result.code == 0, result.err
    torch.testing.assert_close(load_tensors(again)["samples"], final, rtol=0, atol=1e-5)


def test_cascade_sweep_and_per_stage_options(stages, tmp_path):
    out = tmp_path / "swept.png"
    result = run_cli(*cascade_args(stages, out, "--prompt", "7", "--num-samples", "3",
                                   "--sr-aug-sweep", "0,0.2", "--sr-aug-level", "0.1,0.3",
                                   "--guidance", "4"))  # fmt: skip
    assert result.code == 0, result.err
    recipe = read_recipe(out)
    assert recipe["prompts"] == ["7"] * 3  # one prompt, repeated
    assert recipe["stages"][2]["conditioner"]["options"]["level"] == 0.3
    assert recipe["stages"][1]["conditioner"]["options"]["sweep"] == [0.0, 0.2]


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "pass --prompt"),
        (("--prompt", "7", "--sr-steps", "1,2,3"), "--sr-steps needs one value or one per stage"),
        (("--prompt", "7", "--sampler", "ddim"), "--pipeline runs its own stages"),
        (("--prompt", "7", "--no-such", "1"), "--no-such"),
        (("--prompt", "7", "--sr-threshold", "loud"), "--sr-threshold"),
    ],
)
def test_cascade_refuses_bad_requests_cleanly(stages, tmp_path, extra, message):
    result = run_cli(*cascade_args(stages, tmp_path / "x.png", *extra))
    assert_clean_error(result, message)


def test_run_a_text_model_with_prompts_and_guidance(stages, tmp_path):
    out = tmp_path / "t.png"
    result = run_cli("run", "--model", stages["base"], "--sampler", "ddim", "--steps", "2",
                     "--prompt", "seven", "--prompt", "", "--guidance", "3", "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    recipe = read_recipe(out)
    assert recipe["guidance"] == 3.0 and recipe["prompts"] == ["seven", ""]
    assert_clean_error(run_cli("run", "--model", stages["base"], "--sampler", "ddim", "-q",
                               "-o", str(tmp_path / "u.png")), "is text-conditional")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--prompt", "seven", "-q",
                               "-o", str(tmp_path / "v.png")), "not text-conditional")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--guidance", "3", "-q",
                               "-o", str(tmp_path / "w.png")), "unconditional")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--save-stages", "-q",
                               "-o", str(tmp_path / "y.png")), "--save-stages needs --pipeline")  # fmt: skip


def test_run_passes_conditioner_options_to_the_models_conditioner(stages, tmp_path):
    images = tmp_path / "low.safetensors"
    from diffplug.output import write_samples

    write_samples((digits("heldout", 8).images[:2] + 1) / 2 * 2 - 1, images, {})
    out = tmp_path / "sr.png"
    result = run_cli("run", "--model", stages["sr16"], "--sampler", "ddim", "--steps", "2",
                     "--condition-images", str(images), "--num-samples", "2", "--level", "0.35",
                     "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    assert read_recipe(out)["conditioner"]["options"]["level"] == 0.35
    bad = run_cli("run", "--model", stages["sr16"], "--sampler", "ddim", "--condition-images",
                  str(images), "--levle", "0.3", "-q", "-o", str(tmp_path / "b.png"))  # fmt: skip
    assert_clean_error(bad, "--levle")


def test_train_gives_an_option_both_the_denoiser_and_conditioner_declare_to_both(tmp_path):
    from diffplug.checkpoint import read_metadata

    out = tmp_path / "sr"
    result = run_cli("train", "--method", "ddpm", "--denoiser", "efficient-unet", "--conditioner",
                     "noise-aug", "--low-size", "4", "--size", "8", "--width", "16",
                     "--cross-attention", "", "--attention", "", "--steps", "1", "--batch-size",
                     "2", "--max-level", "0.3", "--out", str(out), "-q")  # fmt: skip
    assert result.code == 0, result.err
    meta = read_metadata(out / "model.safetensors")
    assert meta["config"]["low_size"] == 4 and meta["config"]["conditioning"] == "image"
    assert meta["extra"]["conditioner"]["config"]["low_size"] == 4
    assert meta["extra"]["conditioner"]["config"]["max_level"] == 0.3
