"""Inpainting: any model keeps the known region (pasted at every level, exactly the init at
the end), RePaint resampling is an option, latent masks follow the latent grid, and a
``takes_mask`` denoiser is given the mask and the masked image instead of being pasted."""

from __future__ import annotations

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from PIL import Image

import diffplug
from diffplug.components import Denoiser
from diffplug.data import digits
from diffplug.evaluate import classify
from diffplug.init_image import Init
from diffplug.inpaint import to_grid
from diffplug.sampling import prepare

HELDOUT = digits("heldout", 8)
REAL = ((HELDOUT.images[::3] + 1) / 2).clamp(0, 1)  # 100 held-out digits in [0, 1]
LABELS = HELDOUT.labels[::3]
LOWER = torch.zeros(1, 8, 8)
LOWER[:, 4:] = 1  # white (regenerate) below, black (keep) above


def _known_error(out: torch.Tensor, init: torch.Tensor) -> float:
    return float((out[..., :4, :] - init[..., :4, :]).abs().max())


@pytest.mark.parametrize(
    ("model", "sampler", "steps", "repaint", "least"),
    [("ddpm-digits", "ddim", 10, 4, 0.55), ("adm-digits", "adm", 10, 4, 0.5),
     ("ddpm-digits", "ddpm", 50, 9, 0.7)],  # the 70%: 75% here, 74.0% on all 300
)  # fmt: skip
def test_the_lower_half_is_completed_and_the_upper_half_kept(model, sampler, steps, repaint,
                                                             least):  # fmt: skip
    """The issue's proof on 100 held-out digits (the numbers on all 300 are in
    docs/generation.md): the known half within 1/255 and the completed digit's class."""
    run = diffplug.load(sampler=sampler, model=model, steps=steps)
    out = run.sample(len(REAL), seed=0, init=REAL, mask=LOWER, repaint=repaint,
                     progress=False).tensor  # fmt: skip
    assert _known_error(out, REAL) <= 1 / 255
    assert (out[..., 4:, :] - REAL[..., 4:, :]).abs().mean() > 0.02  # it did regenerate
    assert (classify(out * 2 - 1) == LABELS).float().mean() >= least


def test_every_level_sees_the_known_region_at_its_own_noise():
    """Between steps the known region is alpha_j*x0 + sigma_j*eps of the next call, with
    the sample's own first noise, as diffusers' inpainting pipeline does."""
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=5)
    seen = []
    hook = run.denoiser.register_forward_pre_hook(lambda _, args: seen.append(args[0][:1].clone()))
    try:
        run.sample(1, seed=9, init=REAL[:1], mask=LOWER, strength=0.8, progress=False)
    finally:
        hook.remove()
    plan = run.loop.start_at(0.8).plan
    eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(9))
    x0 = REAL[0] * 2 - 1
    assert len(seen) == len(plan) == 4
    for j, x in enumerate(seen):
        want = plan.alpha[j] * x0 + plan.sigma[j] * eps
        torch.testing.assert_close(x[0, :, :4], want[:, :4], rtol=0, atol=1e-5)


def test_repaint_draws_the_known_region_afresh_and_keeps_sample_k_at_any_batch_size():
    """RePaint's known region is q(x_j | x0) with fresh noise at every level, drawn from the
    sample's own generator: sample k is still the same at any batch size."""
    run = diffplug.load(sampler="ddpm", model="ddpm-digits", steps=5)
    seen = []
    hook = run.denoiser.register_forward_pre_hook(lambda _, args: seen.append(args[0][:1].clone()))
    try:
        run.sample(1, seed=9, init=REAL[:1], mask=LOWER, strength=0.8, repaint=1,
                   progress=False)  # fmt: skip
    finally:
        hook.remove()
    eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(9))
    x0, plan = REAL[0] * 2 - 1, run.loop.start_at(0.8).plan
    assert len(seen) == 2 * len(plan) - 1  # each step but the last taken twice
    torch.testing.assert_close(seen[0][0, :, :4], (plan.alpha[0] * x0 + plan.sigma[0] * eps)[:, :4],
                               rtol=0, atol=1e-5)  # fmt: skip
    later = seen[1][0, :, :4] - plan.alpha[1] * x0[:, :4]
    assert (later - plan.sigma[1] * eps[:, :4]).abs().max() > 0.1  # not the first eps again
    both = run.sample(4, seed=2, init=REAL[:4], mask=LOWER, repaint=2, progress=False).tensor
    one = run.sample(4, seed=2, init=REAL[:4], mask=LOWER, repaint=2, batch_size=1,
                     progress=False).tensor  # fmt: skip
    assert torch.equal(both, one)


def test_repaint_changes_the_completion_and_is_refused_where_a_step_cannot_be_retaken():
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=4)
    plain = run.sample(4, init=REAL[:4], mask=LOWER, progress=False).tensor
    again = run.sample(4, init=REAL[:4], mask=LOWER, repaint=2, progress=False).tensor
    assert not torch.equal(plain, again) and _known_error(again, REAL[:4]) <= 1 / 255
    multistep = diffplug.load(sampler="dpmpp-2m", model="ddpm-digits", steps=4)
    with pytest.raises(diffplug.IncompatibleError, match="repaint takes a step again"):
        multistep.sample(1, init=REAL[:1], mask=LOWER, repaint=1, progress=False)
    # without repaint every sampler inpaints: the stepper's x is pasted as any other
    out = multistep.sample(2, init=REAL[:2], mask=LOWER, progress=False).tensor
    assert _known_error(out, REAL[:2]) <= 1 / 255


def test_a_latent_mask_is_brought_to_the_latent_grid():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1
    grid = to_grid(mask, (8, 8))
    assert grid.shape == (1, 1, 8, 8) and grid[..., 4:, :].all() and not grid[..., :4, :].any()
    run = diffplug.load(sampler="adm", model="adm-latent-digits", steps=4)
    side = run.image_shape[-1]
    init = torch.nn.functional.interpolate(REAL[:2], size=side, mode="bilinear")
    image_mask = torch.zeros(1, side, side)
    image_mask[:, side // 2 :] = 1
    out = run.sample(2, init=init, mask=image_mask, progress=False).tensor
    assert torch.isfinite(out).all() and out.shape == init.shape


class _Inpainter(Denoiser):
    """A ``takes_mask`` denoiser around the digits UNet: it records what it is given."""

    takes_mask = True

    def __init__(self, inner: Denoiser) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x, t, cond=None):
        self.seen.append({k: v.clone() for k, v in cond.items()})
        return self.inner(x, t, None)


def test_a_takes_mask_denoiser_gets_the_mask_and_masked_image_and_nothing_is_pasted():
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=4)
    denoiser = _Inpainter(run.denoiser)
    loop = prepare(denoiser, run.scheduler, steps=4)
    init = REAL[:3] * 2 - 1
    mask = LOWER.expand(3, 1, 8, 8)
    out = loop.draw([0, 1, 2], init=Init(init, 1.0, mask))
    given = denoiser.seen[0]
    assert given["mask"].shape[1:] == (1, 8, 8) and given["masked"].shape[1:] == (1, 8, 8)
    torch.testing.assert_close(given["mask"][:3], mask)
    torch.testing.assert_close(given["masked"][:3], init * (1 - mask))
    assert (out[:, :, :4] - init[:, :, :4]).abs().max() > 0.1  # not pasted: the model's own
    pasted = prepare(run.denoiser, run.scheduler, steps=4).draw([0, 1, 2],
                                                                init=Init(init, 1.0, mask))  # fmt: skip
    assert (pasted[:, :, :4] - init[:, :, :4]).abs().max() < 1e-5


def test_a_takes_mask_denoiser_without_a_mask_regenerates_everything():
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=2)
    denoiser = _Inpainter(run.denoiser)
    prepare(denoiser, run.scheduler, steps=2).draw([0])
    assert bool(denoiser.seen[0]["mask"].eq(1).all())
    assert bool(denoiser.seen[0]["masked"].eq(0).all())  # a grey image, encoded (pixels)


# -- bad input ---------------------------------------------------------------------------
def _run(tmp_path, *args):
    init = tmp_path / "init.png"
    Image.new("L", (8, 8), 100).save(init)
    return run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", "--steps", "4",
                   "--num-samples", "2", "--init-image", str(init), *args, "-o",
                   str(tmp_path / "o.png"))  # fmt: skip


def test_a_mask_of_another_size_is_refused_with_both_sizes(tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (12, 12), 255).save(mask)
    assert_clean_error(_run(tmp_path, "--mask", str(mask)), "12x12, but the init image is 8x8")


def test_a_mask_without_an_init_image_is_refused(tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (8, 8), 255).save(mask)
    result = run_cli("run", "--sampler", "ddim", "--mask", str(mask), "-o",
                     str(tmp_path / "o.png"))  # fmt: skip
    assert_clean_error(result, "--mask goes with --init-image")


def test_a_mask_that_is_not_an_image_is_refused(tmp_path):
    mask = tmp_path / "mask.jpg"
    mask.write_bytes(b"\x00\x01 nothing")
    assert_clean_error(_run(tmp_path, "--mask", str(mask)), "--mask", "not an image")


def test_repaint_without_a_mask_is_refused(tmp_path):
    assert_clean_error(_run(tmp_path, "--repaint", "2"), "--repaint", "goes with --mask")


def test_the_cli_inpaints(tmp_path):
    mask = tmp_path / "mask.png"
    Image.fromarray((LOWER[0] * 255).byte().numpy()).save(mask)
    result = _run(tmp_path, "--mask", str(mask), "--repaint", "1")
    assert result.code == 0, result.err
    recipe = diffplug.load(recipe=tmp_path / "o.png").defaults
    assert recipe["mask"] == str(mask) and recipe["repaint"] == 1
