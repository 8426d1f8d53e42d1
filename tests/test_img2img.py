"""img2img: the plan's tail starts from the init noised with the sample's own noise, for
every plan kind (VP tables, noise-level samplers replanned, ADM through the bridge, a
cascade's base stage), and bad inputs are refused with one line naming what is wrong."""

from __future__ import annotations

import math

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image

import diffplug
from diffplug.data import digits
from diffplug.evaluate import classify
from diffplug.plan import kept_steps
from diffplug.registry import default_registry

HELDOUT = digits("heldout", 8)
#: held-out digits in [0, 1] (every third: 100, every class)
REAL = ((HELDOUT.images[::3] + 1) / 2).clamp(0, 1)
LABELS = HELDOUT.labels[::3]


@pytest.fixture(scope="module")
def ddim():
    return diffplug.load(sampler="ddim", model="ddpm-digits", steps=10)


def test_the_tail_is_the_last_int_n_s_steps_of_the_plan(ddim):
    full = ddim.loop.plan.t.tolist()
    for strength in (0.3, 0.55, 1.0):
        tail = ddim.loop.start_at(strength).plan.t.tolist()
        assert tail == full[len(full) - kept_steps(10, strength) :]
    assert kept_steps(10, 0.3) == 3 and kept_steps(50, 0.29) == 14  # int(), as diffusers


def test_a_level_sampler_is_replanned_on_the_last_levels():
    run = diffplug.load(sampler="heun", model="ddpm-digits", steps=6, schedule="karras")
    levels = run.loop.plan.levels
    tail = run.loop.start_at(0.5).plan
    assert tail.levels == levels[3:]
    assert tail.sigma[0] == levels[3] and tail.step_count() == 3  # Heun: two calls a step


def test_the_start_is_the_init_noised_with_the_samples_own_noise(ddim):
    """The denoiser's first input is alpha*x0 + sigma*eps at the tail's first timestep, eps
    the first draw of the sample's own generator (seed 5 + k)."""
    seen = []
    hook = ddim.denoiser.register_forward_pre_hook(lambda _, args: seen.append(args[0][:2].clone()))
    try:
        ddim.sample(2, seed=5, init=REAL[:2], strength=0.5, progress=False)
    finally:
        hook.remove()
    plan = ddim.loop.start_at(0.5).plan
    assert plan.t[0] == 400  # leading spacing of 10 steps: 900, 800, ..., 0; the last 5
    for k in range(2):
        eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(5 + k))
        start = plan.alpha[0] * (REAL[k] * 2 - 1) + plan.sigma[0] * eps
        torch.testing.assert_close(seen[0][k], start, rtol=0, atol=1e-6)


def test_strength_one_on_adm_is_text_to_image_bitwise():
    """ADM's first time is pure noise (alpha = 0): img2img at strength 1 must then draw
    exactly the plain samples, which proves the start uses the sample's own seeded noise."""
    run = diffplug.load(sampler="adm", model="adm-digits", steps=4)
    plain = run.sample(3, seed=11, progress=False).tensor
    again = run.sample(3, seed=11, init=REAL[:3], strength=1.0, progress=False).tensor
    assert torch.equal(plain, again)


def test_a_sample_does_not_depend_on_its_batch(ddim):
    both = ddim.sample(4, seed=3, init=REAL[:4], strength=0.5, progress=False).tensor
    alone = ddim.sample(seeds=[5], init=REAL[2:3], strength=0.5, progress=False).tensor
    split = ddim.sample(4, seed=3, init=REAL[:4], strength=0.5, batch_size=3, progress=False)
    assert torch.equal(both[2:3], alone) and torch.equal(both, split.tensor)


def test_img2img_keeps_the_class_ddim_and_adm():
    """Strength 0.3 on all 300 held-out digits (docs/generation.md has the numbers): ADM's
    deterministic update keeps 95.3% (its stochastic posterior step, the default, 87.7%: the
    fresh noise of each step can turn the digit), DDIM at 10 steps on ddpm-digits 92.0% (at 50
    steps 77%: its start, t = 280 of 1000 on DDPM's linear betas, is the same, but the finer
    steps keep less)."""
    every = ((HELDOUT.images + 1) / 2).clamp(0, 1)
    for options, bound in (({"deterministic": True}, 0.9), ({}, 0.85)):
        adm = diffplug.load(sampler="adm", model="adm-digits", steps=10, **options)
        out = adm.sample(len(every), seed=0, init=every, strength=0.3, progress=False).tensor
        assert (classify(out * 2 - 1) == HELDOUT.labels).float().mean() >= bound, options
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=10)
    out = run.sample(len(every), seed=0, init=every, strength=0.3, progress=False).tensor
    assert (classify(out * 2 - 1) == HELDOUT.labels).float().mean() >= 0.9  # 92.0% measured
    low = run.sample(len(REAL), seed=0, init=REAL, strength=0.2, progress=False).tensor
    assert (classify(low * 2 - 1) == LABELS).float().mean() >= 0.9


def _samplers():
    return sorted(name for name in default_registry().names("scheduler") if name != "diffusers")


@pytest.mark.parametrize("sampler", _samplers())
def test_every_sampler_starts_part_way_on_pixels_and_through_the_bridge(sampler):
    """Every installed sampler (bar the diffusers bridge, which needs a scheduler class) on
    the VP model and on ADM's decoupled one: a small strength stays near the init."""
    ran = []
    for model in ("ddpm-digits", "adm-digits"):
        try:
            run = diffplug.load(sampler=sampler, model=model, steps=10)
        except diffplug.UserError:  # a sampler that cannot run this model at all
            continue
        ran.append(model)
        out = run.sample(4, seed=1, init=REAL[:4], strength=0.3, progress=False).tensor
        assert torch.isfinite(out).all()
        assert (out - REAL[:4]).abs().mean() < 0.25, (sampler, model)
    assert ran, f"{sampler} runs neither digits model"


def test_a_latent_model_encodes_the_init():
    run = diffplug.load(sampler="adm", model="adm-latent-digits", steps=10)
    side = run.image_shape[-1]
    init = torch.nn.functional.interpolate(REAL[:4], size=side, mode="bilinear")
    out = run.sample(4, seed=0, init=init, strength=0.2, progress=False).tensor
    far = run.sample(4, seed=0, init=init.flip(-1), strength=0.2, progress=False).tensor
    assert (out - init).abs().mean() < (far - init).abs().mean()


def test_a_cascade_starts_its_base_stage_from_the_init():
    run = diffplug.load(pipeline="imagen", base_steps=10, sr_steps=[2], guidance=3.0)
    out = run.sample(2, prompt="a handwritten seven", init=REAL[:2], strength=0.2,
                     progress=False)  # fmt: skip
    base = out.stages[0].tensor
    assert (base - REAL[:2]).abs().mean() < 0.15
    assert out.recipe["strength"] == 0.2 and out.recipe["init_image"].startswith("(given")


# -- bad input ---------------------------------------------------------------------------
def _png(path, side=8, mode="L"):
    Image.new(mode, (side, side), 128).save(path)
    return str(path)


def _run(*args):
    return run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", "--steps", "4",
                   "--num-samples", "3", *args)  # fmt: skip


def test_an_init_image_of_another_size_is_refused_with_both_sizes(tmp_path):
    big = _png(tmp_path / "big.png", 16)
    assert_clean_error(_run("--init-image", big, "-o", str(tmp_path / "o.png")),
                       "16x16 with 1 channel(s), but the model makes 8x8")  # fmt: skip


def test_a_non_image_is_refused(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert_clean_error(_run("--init-image", str(text), "-o", str(tmp_path / "o.png")),
                       "not an image PIL can read")  # fmt: skip


def test_a_folder_with_fewer_images_than_samples_is_refused_naming_the_counts(tmp_path):
    folder = tmp_path / "inits"
    folder.mkdir()
    _png(folder / "a.png")
    _png(folder / "b.png")
    assert_clean_error(_run("--init-image", str(folder), "-o", str(tmp_path / "o.png")),
                       "2 image(s) for 3 samples")  # fmt: skip


@pytest.mark.parametrize("strength", ["0", "1.5", "2", "nan"])
def test_a_strength_outside_zero_one_is_refused(tmp_path, strength):
    init = _png(tmp_path / "i.png")
    result = _run("--init-image", init, "--strength", strength, "-o", str(tmp_path / "o.png"))
    assert_clean_error(result, "strength must be in (0, 1]")


def test_a_strength_too_small_for_the_steps_is_refused(tmp_path):
    init = _png(tmp_path / "i.png")
    result = _run("--init-image", init, "--strength", "0.1", "-o", str(tmp_path / "o.png"))
    assert_clean_error(result, "int(4 * 0.1) = 0 steps")


def test_strength_without_an_init_is_refused(tmp_path):
    assert_clean_error(_run("--strength", "0.5", "-o", str(tmp_path / "o.png")),
                       "--strength goes with --init-image")  # fmt: skip
    with pytest.raises(diffplug.UserError, match="strength must be in"):
        diffplug.load(sampler="ddim", model="ddpm-digits").sample(init=REAL[:1], strength=math.inf)


def test_the_cli_runs_img2img_and_records_it(tmp_path):
    folder = tmp_path / "inits"
    folder.mkdir()
    for k in range(3):
        Image.fromarray((REAL[k, 0] * 255).round().byte().numpy()).save(folder / f"{k}.png")
    out = tmp_path / "each/"
    result = _run("--init-image", str(folder), "--strength", "0.5", "-o", f"{out}/")
    assert result.code == 0, result.err
    recipe = diffplug.load(recipe=out / "00002.png").defaults
    assert recipe["init_image"] == str(folder) and recipe["init_index"] == [2]
    replay = run_cli("run", "--recipe", str(out / "00002.png"), "-o", str(tmp_path / "r.png"))
    assert replay.code == 0, replay.err
    again = torch.tensor(list(Image.open(tmp_path / "r.png").getdata()))
    assert again.numel() > 0
