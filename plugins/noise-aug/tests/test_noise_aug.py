"""Noise-conditioning augmentation: levels, the forward process it uses, per-sample draws,
seeds and batch independence at sampling, the best-of sweep, and training with it."""

import math

import pytest
import torch

from diffplug import OptionError, default_registry, digits, resize
from diffplug_noise_aug.conditioner import NoiseAugConditioner, NoiseAugConfig, gaussian_blur


def aug(**kw):
    cond = NoiseAugConditioner(NoiseAugConfig(**{"low_size": 4, **kw}))
    cond.name = "noise-aug"
    return cond


def cosine_alpha_sigma(t: int, T: int = 1000) -> tuple[float, float]:
    """diffusers' squaredcos_cap_v2 in float64, written out: the independent reference."""

    def f(u):
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2

    abar = 1.0
    for i in range(t + 1):
        abar *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return math.sqrt(abar), math.sqrt(1 - abar)


def test_registered_and_image_kind():
    cls = default_registry().load("conditioner", "noise-aug")
    assert cls is NoiseAugConditioner and cls.kind == "image"


def test_level_zero_is_the_identity_and_level_one_is_pure_noise():
    cond = aug()
    image, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    out = cond.augment(image, torch.zeros(3, dtype=torch.float64), noise)
    assert torch.equal(out["image"], image) and not out["aug_level"].any()
    out = cond.augment(image, torch.ones(3, dtype=torch.float64), noise)
    alpha, sigma = cosine_alpha_sigma(999)
    assert alpha < 1e-4
    torch.testing.assert_close(out["image"], alpha * image + sigma * noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["image"], noise, rtol=0, atol=1e-4)
    exact = aug(process={"name": "decoupled"})  # ADM's process reaches alpha = 0 exactly
    assert torch.equal(
        exact.augment(image, torch.ones(3, dtype=torch.float64), noise)["image"], noise
    )


@pytest.mark.parametrize("t", [1, 111, 333, 555, 998])
def test_levels_follow_the_process_forward_marginal(t):
    """Level u is time u * (T - 1) of the condition process (an integer t here)."""
    cond = aug()
    torch.manual_seed(t)
    image, noise = torch.rand(1, 1, 4, 4) * 2 - 1, torch.randn(1, 1, 4, 4)
    level = torch.tensor([t / 999], dtype=torch.float64)
    got = cond.augment(image, level, noise)["image"]
    alpha, sigma = cosine_alpha_sigma(t)
    # float32 arithmetic (measured <= 3.1e-6 over 200 draws)
    torch.testing.assert_close(got, alpha * image + sigma * noise, rtol=0, atol=1e-5)


def test_training_draws_a_level_per_sample_within_the_range_from_the_generator():
    cond = aug(max_level=0.4)
    x0 = digits("train", 8).images[:16]
    a = cond.from_data(x0, torch.Generator().manual_seed(5))
    b = cond.from_data(x0, torch.Generator().manual_seed(5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["aug_level"], b["aug_level"])
    levels = a["aug_level"]
    assert levels.shape == (16,) and len(set(levels.tolist())) == 16
    assert 0 <= levels.min() and levels.max() <= 0.4
    clean = aug(max_level=0.0).from_data(x0, torch.Generator().manual_seed(5))
    assert torch.equal(clean["image"], resize(x0, 4))  # max_level 0: no augmentation


def test_blur_is_a_normalised_gaussian_per_sample():
    images = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    out = gaussian_blur(images, torch.tensor([0.0, 0.8, 1.5], dtype=torch.float64))
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=1e-6)  # sigma 0: unchanged
    # reference for sample 2: the 5-tap kernel, reflect padding, in float64 by hand
    k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float64) / 1.5) ** 2)
    k /= k.sum()
    padded = torch.nn.functional.pad(images[2:3], (2, 2, 2, 2), mode="reflect")[0]
    ref = torch.zeros(2, 6, 6, dtype=torch.float64)
    for i in range(6):
        for j in range(6):
            ref[:, i, j] = (padded[:, i : i + 5, j : j + 5] * k[:, None] * k[None, :]).sum((1, 2))
    torch.testing.assert_close(out[2], ref, rtol=0, atol=1e-10)
    blurred = aug(blur=2.0, max_level=0.0).from_data(torch.rand(4, 1, 8, 8), torch.Generator())
    assert blurred["image"].shape == (4, 1, 4, 4)


def test_sampling_noise_comes_from_each_seed_and_not_the_batch():
    cond = aug(level=0.3)
    images = [torch.rand(1, 8, 8) * 2 - 1 for _ in range(3)]
    batch = cond.condition(images, [10, 11, 12])
    alone = cond.condition(images[1:2], [11])
    assert torch.equal(batch["image"][1], alone["image"][0])
    assert torch.equal(batch["aug_level"], torch.full((3,), 0.3))
    assert not torch.equal(cond.condition(images[1:2], [99])["image"], alone["image"])
    assert not torch.equal(batch["image"][1], resize(images[1][None], 4)[0])  # it was noised


def test_options_are_checked():
    with pytest.raises(OptionError, match="--sweep levels must lie in"):
        NoiseAugConfig(sweep=[0.1, 1.5])
    with pytest.raises(OptionError, match="--level must be <= 1"):
        NoiseAugConditioner.from_options(level="2")


@pytest.fixture
def low_res():
    return [resize(digits("heldout", 8).images[k : k + 1], 4)[0] for k in range(6)]


def test_score_is_the_downsampled_error_and_l1_is_available(low_res):
    full = digits("heldout", 8).images[:6]  # low_res are exactly these, shrunk
    assert aug().score(full, low_res).abs().max() == 0
    other = digits("heldout", 8).images[6:12]
    ref = (resize(other, 4) - torch.stack(low_res)).flatten(1)
    torch.testing.assert_close(aug().score(other, low_res), ref.pow(2).mean(1), rtol=0, atol=1e-7)
    l1 = aug(scorer="lowres-l1").score(other, low_res)
    torch.testing.assert_close(l1, ref.abs().mean(1), rtol=0, atol=1e-7)
