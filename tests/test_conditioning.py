"""Image (super-resolution) conditioning: the lowres conditioner, the trainer's from_data hook,
a short real training that must use its condition, and the train/run CLI."""

import pytest
import torch
from cliutil import assert_clean_error, run_cli

from diffplug.checkpoint import load_tensors, read_metadata
from diffplug.components import NullConditioner
from diffplug.conditioners import LowResConditioner, LowResConfig
from diffplug.data import digits, resize
from diffplug.errors import UserError
from diffplug.output import read_recipe
from diffplug.registry import default_registry
from diffplug.sampling import sample
from diffplug.training import TrainConfig, Trainer
from diffplug_adm.dual_unet import DualUNet, DualUNetConfig
from diffplug_adm.method import ADMMethod
from diffplug_adm.scheduler import ADM, ADMConfig
from diffplug_ddpm.method import DDPMMethod
from diffplug_ddpm.unet import UNet, UNetConfig

# timm imports torchvision (seconds): pay it at collection, not inside one test's time
pytest.importorskip("timm")


def sr_unet(**kw):
    cfg = dict(size=16, width=16, mults=[1, 2], cond_encoder="resnet18", conditioning="image")
    return DualUNet(DualUNetConfig(**{**cfg, **kw}))


def test_lowres_is_registered_and_gives_image_conditioning():
    cls = default_registry().load("conditioner", "lowres")
    assert cls is LowResConditioner and cls.kind == "image"
    assert cls.from_options(low_size="4").config.low_size == 4


def test_lowres_resizes_any_input_and_null_is_zeros():
    cond = LowResConditioner(LowResConfig(low_size=4))
    big, small, odd = (
        torch.rand(1, 16, 16) * 2 - 1,
        torch.rand(1, 4, 4) * 2 - 1,
        torch.rand(1, 8, 6),
    )
    out = cond([big, None, small, odd])["image"]
    assert out.shape == (4, 1, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], resize(big[None], 4)[0], rtol=0, atol=0)
    assert torch.equal(out[1], torch.zeros(1, 4, 4))
    assert torch.equal(out[2], small)  # already low-res: untouched
    assert cond.null(3)["image"].shape == (3, 1, 4, 4) and not cond.null(3)["image"].any()
    rgb = LowResConditioner(LowResConfig(low_size=2, channels=3))
    assert rgb([torch.zeros(3, 5, 5)])["image"].shape == (1, 3, 2, 2)
    for bad in (torch.zeros(3, 8, 8), torch.zeros(8, 8), "image.png"):
        with pytest.raises(UserError, match="must be a \\(1, h, w\\) tensor"):
            cond([bad])


def test_from_data_downsamples_exactly_as_the_data_module_and_draws_nothing():
    x0 = digits("train", 16).images[:8]
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    got = LowResConditioner(LowResConfig(low_size=8)).from_data(x0, generator)["image"]
    assert torch.equal(got, resize(x0, 8))
    assert torch.equal(generator.get_state(), state)  # resumed runs stay exact
    with pytest.raises(UserError, match="3-channel images"):
        LowResConditioner(LowResConfig(channels=3)).from_data(x0, generator)
    with pytest.raises(UserError, match="cannot build conditions from training data"):
        NullConditioner().from_data(x0, generator)


def test_the_trainer_refuses_a_conditioner_the_denoiser_cannot_take():
    data, config = digits("train", 16), TrainConfig(steps=1, batch_size=2)
    unconditional = UNet(UNetConfig(size=16, width=8, mults=[1, 2], attention=[], heads=2))
    with pytest.raises(UserError, match="gives image conditioning but the denoiser expects none"):
        Trainer(unconditional, DDPMMethod(), data, config, conditioner=LowResConditioner())
    with pytest.raises(UserError, match="--conditioner lowres"):
        Trainer(sr_unet(cond_resize=8), ADMMethod(), data, config)
    with pytest.raises(UserError, match="gives no conditioning but the denoiser expects image"):
        Trainer(sr_unet(cond_resize=8), ADMMethod(), data, config, conditioner=NullConditioner())


def test_a_short_super_resolution_training_uses_its_condition():
    """45 steps teach a dual UNet to follow its 8x8 condition on 16x16 digits.

    Measured own/shuffled MSE: 0.47-0.53 over three training seeds (0.63 after 40 steps, about
    1 untrained). 45 steps at batch 32 take ~16 s on one shared core. The backbone sees the
    condition at 8x8, its own size: resizing it to 32 costs twice the time and adds nothing.
    """
    torch.manual_seed(0)
    model = sr_unet(cond_resize=8, heads=1)
    conditioner = LowResConditioner(LowResConfig(low_size=8))
    config = TrainConfig(steps=45, batch_size=32, lr=5e-3, lr_schedule="constant", warmup=5)
    trainer = Trainer(model, ADMMethod(), digits("train", 16), config, conditioner=conditioner)
    for _ in range(config.steps):
        trainer.train_step()
    model.load_state_dict(trainer.ema_state())

    held = digits("heldout", 16).images[:32]
    # deterministic: the stochastic sampler's fresh noise blurs the comparison
    samples = sample(model, ADM(ADMConfig(deterministic=True)), steps=10, seeds=list(range(32)),
                     conditioner=conditioner, conditions=list(held))  # fmt: skip
    low, conditions = resize(samples, 8), resize(held, 8)
    own = (low - conditions).square().mean().item()
    shuffled = (low - conditions.roll(1, 0)).square().mean().item()  # nobody keeps its own
    assert own < 0.75 * shuffled, (own, shuffled)


def _write_pngs(folder, sizes):
    from PIL import Image

    folder.mkdir()
    for k, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w), generator=torch.Generator().manual_seed(k))
        Image.fromarray(pixels.to(torch.uint8).numpy(), mode="L").save(folder / f"{k}.png")


def test_train_and_run_a_super_resolution_model_through_the_cli(tmp_path):
    out = tmp_path / "sr"
    result = run_cli(
        "train", "--method", "adm", "--size", "16", "--width", "16", "--mults", "1,2",
        "--heads", "1", "--cond-encoder", "resnet18", "--cond-resize", "8",
        "--conditioner", "lowres", "--low-size", "4", "--steps", "2", "--batch-size", "4",
        "--guidance", "1.5", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    model = str(out / "model.safetensors")
    meta = read_metadata(model)
    assert meta["extra"]["guidance"] == 1.5  # run's default for this model
    assert meta["extra"]["conditioner"] == {
        "plugin": "diffplug",
        "name": "lowres",
        "config": {"low_size": 4, "channels": 1, "image_size": 16},
        "weights": False,
    }
    _write_pngs(tmp_path / "lowres", [(16, 16), (9, 7)])
    base = ("run", "--model", model, "--sampler", "adm", "--steps", "2", "--num-samples", "3",
            "--quiet")  # fmt: skip
    first = tmp_path / "a.safetensors"
    result = run_cli(*base, "--condition-images", str(tmp_path / "lowres"), "-o", str(first))
    assert result.code == 0, result.err
    assert load_tensors(first)["samples"].shape == (3, 1, 16, 16)
    recipe = read_recipe(first)
    assert recipe["conditioner"]["name"] == "lowres"
    assert recipe["conditioner"]["options"] == {"low_size": 4, "channels": 1, "image_size": 16}
    assert recipe["condition_images"] == str(tmp_path / "lowres")
    assert recipe["guidance"] == 1.5
    # a run's own samples file conditions the next run
    again = run_cli(*base, "--condition-images", str(first), "-o", str(tmp_path / "b.png"))
    assert again.code == 0, again.err

    assert_clean_error(run_cli(*base, "-o", str(tmp_path / "c.png")), "--condition-images")
    assert_clean_error(
        run_cli("train", "--method", "ddpm", "--conditioner", "lowres", "--steps", "1",
                "--quiet", "--out", str(tmp_path / "nope")),
        "gives image conditioning but the denoiser expects none",
    )  # fmt: skip
    assert not (tmp_path / "nope").exists()
    assert_clean_error(
        run_cli("train", "--method", "ddpm", "--guidance", "3", "--steps", "1", "--quiet",
                "--out", str(tmp_path / "unguided")),
        "--guidance 3: the model is unconditional",
    )  # fmt: skip
    assert not (tmp_path / "unguided").exists()
    (tmp_path / "empty").mkdir()
    assert_clean_error(
        run_cli(
            *base, "--condition-images", str(tmp_path / "empty"), "-o", str(tmp_path / "d.png")
        ),
        "--condition-images",
        "no readable images",
    )
    assert_clean_error(
        run_cli("run", "--model", "gmm-digits", "--sampler", "ddim", "--steps", "2",
                "--condition-images", str(tmp_path / "lowres"), "-o", str(tmp_path / "e.png")),
        "not image-conditional",
    )  # fmt: skip


def test_a_small_input_takes_the_training_images_path_before_shrinking():
    """With image_size set (train sets it from --size), an 8x8 input is first brought to the
    training size and then shrunk, as every training image was; a full-size input is just
    shrunk; without image_size inputs are shrunk directly."""
    small = digits("heldout", 8).images[:2]
    cond = LowResConditioner(LowResConfig(low_size=8, image_size=32))
    got = cond(list(small))["image"]
    torch.testing.assert_close(got, resize(resize(small, 32), 8), rtol=0, atol=0)
    big = digits("heldout", 32).images[:2]
    torch.testing.assert_close(cond(list(big))["image"], resize(big, 8), rtol=0, atol=0)
    direct = LowResConditioner(LowResConfig(low_size=8))(list(small))["image"]
    assert torch.equal(direct, small) and not torch.equal(got, small)


def test_imagen_word_tokens_give_every_word_of_the_emoji_captions_its_own_embedding():
    from diffplug_emoji.dataset import Emoji
    from diffplug_imagen.text import TextConditioner, TextConfig

    cond = TextConditioner(TextConfig(dim=32, tokens="words", buckets=4096, max_tokens=32))
    words = sorted({w for cs in Emoji().captions("train") for c in cs for w in cond_words(c)})
    pairs = {tuple(cond.tokenize([w])[0, 1].tolist()) for w in words}
    assert len(words) > 2000 and len(pairs) == len(words)


def cond_words(caption):
    from diffplug_imagen.text import WORD, normalise

    return WORD.findall(normalise(caption))
