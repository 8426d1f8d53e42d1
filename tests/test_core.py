"""Core pieces checked against closed forms: conversions, noise streams, options, transforms."""

import math

import pytest
import torch
from fixture_tiny_model import TinyConfig
from fixture_vp_sampler import FixtureDDIM, FixtureDDIMConfig

from diffplug.errors import IncompatibleError, OptionError
from diffplug.noise import NoiseSource
from diffplug.options import build_config
from diffplug.prediction import as_tuple, linear, targets
from diffplug.sampling import sample
from diffplug.testing import dummy_denoiser
from diffplug.transforms import DynamicConfig, DynamicThreshold, StaticThreshold
from diffplug.vp import VP, VPConfig


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "c_eps"])
@pytest.mark.parametrize("alpha, sigma", [(0.9, math.sqrt(1 - 0.81)), (0.3, 0.5), (0.6, 0.8)])
def test_prediction_conversions_invert_the_targets(kind, alpha, sigma):
    if kind == "c_eps" and not math.isclose(alpha, 0.3):
        alpha, sigma = 1 - 0.36, 0.6  # the decoupled process: alpha = 1 - t, sigma = sqrt(t)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, dtype=torch.float64, generator=g)
    eps = torch.randn(5, dtype=torch.float64, generator=g)
    if kind == "c_eps":
        x = x0 + (-x0) * (1 - alpha) + sigma * eps
    else:
        x = alpha * x0 + sigma * eps
    preds = targets(kind, x0, eps, alpha, sigma)
    lin = linear(kind, alpha, sigma)
    x0_hat = lin.x0_x * x + sum(c * p for c, p in zip(lin.x0_p, preds))
    eps_hat = lin.eps_x * x + sum(c * p for c, p in zip(lin.eps_p, preds))
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)


def test_vp_matches_the_closed_form_schedules_and_interpolates():
    vp = VP(VPConfig(beta_schedule="linear"))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(vp.alphas_cumprod.double(), abar, rtol=1e-5, atol=0)
    cos = VP(VPConfig(beta_schedule="squaredcos_cap_v2"))
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.alphas_cumprod[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-4)
    # fractional times interpolate log-SNR between the neighbours, monotonically
    a = vp.abar(torch.tensor([10.0, 10.5, 11.0]))
    assert a[0] > a[1] > a[2]
    logsnr = torch.log(a / (1 - a))
    assert logsnr[1].item() == pytest.approx(((logsnr[0] + logsnr[2]) / 2).item(), rel=1e-9)


def test_noise_streams_do_not_depend_on_the_batch():
    whole = NoiseSource([5, 6, 7], (1, 4, 4), steps=3)
    alone = NoiseSource([6], (1, 4, 4), steps=3)
    assert torch.equal(whole.initial()[1], alone.initial()[0])
    for _ in range(3):
        assert torch.equal(whole.next()[1], alone.next()[0])
    # blocks are refilled as a whole per sample: long runs with tiny blocks stay consistent
    big = NoiseSource([1, 2], (64, 64, 64), steps=5)
    solo = NoiseSource([2], (64, 64, 64), steps=5)
    big.initial(), solo.initial()
    assert big.block_len == 1
    for _ in range(5):
        assert torch.equal(big.next()[1], solo.next()[0])


def test_options_are_coerced_checked_and_listed():
    config = build_config(
        FixtureDDIMConfig, {"eta": "0.5", "spacing": "trailing", "clip_sample": "yes"}, owner="ddim"
    )
    assert config == FixtureDDIMConfig(eta=0.5, spacing="trailing", clip_sample=True)
    with pytest.raises(OptionError, match="--eta must be >= 0"):
        build_config(FixtureDDIMConfig, {"eta": -1}, owner="ddim")
    with pytest.raises(
        OptionError, match="its options: --spacing, --steps-offset, --clip-sample, --eta"
    ):
        build_config(FixtureDDIMConfig, {"etta": 1}, owner="ddim")
    with pytest.raises(OptionError, match="expects bool"):
        build_config(FixtureDDIMConfig, {"clip_sample": "maybe"}, owner="ddim")
    assert build_config(TinyConfig, {"widths": "1,2,4"}, owner="tiny").widths == [1, 2, 4]


def test_static_threshold_clips_and_dynamic_matches_diffusers():
    from diffusers import DDPMScheduler

    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(StaticThreshold()(x), x.clamp(-1, 1))
    for p, cap in [(0.995, 1.0), (0.9, 1.5), (0.95, 10.0)]:
        ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=cap)
        ours = DynamicThreshold(DynamicConfig(percentile=p, max_value=cap))(x)
        torch.testing.assert_close(ours, ref._threshold_sample(x.clone()), rtol=0, atol=1e-6)
    # uncapped: every sample ends up inside [-1, 1] with its p-quantile magnitude at 1
    out = DynamicThreshold(DynamicConfig(percentile=0.9))(x)
    assert out.abs().max() <= 1
    q = torch.quantile(out.reshape(6, -1).abs(), 0.9, dim=1)
    assert ((q > 0.98) & (q <= 1)).all(), q  # interpolated quantile of the clamped values


def test_incompatible_conditioning_is_refused_before_sampling():
    from diffplug.components import NullConditioner

    class TextConditioner(NullConditioner):
        kind = "text"

    with pytest.raises(
        IncompatibleError, match="unconditional but conditioner .* gives text conditioning"
    ):
        sample(dummy_denoiser(), FixtureDDIM(), steps=2, seeds=[0], conditioner=TextConditioner())


def test_callbacks_see_every_step_and_x0():
    seen = []
    out = sample(
        dummy_denoiser(),
        FixtureDDIM(),
        steps=4,
        seeds=[0, 1],
        callback=lambda s: seen.append((s.index, s.x0.shape)),
    )
    assert [i for i, _ in seen] == [0, 1, 2, 3] and seen[0][1] == (2, 1, 4, 4)
    plain = sample(dummy_denoiser(), FixtureDDIM(), steps=4, seeds=[0, 1])
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)  # unfused path == fused path


def test_a_stateful_plan_begins_every_batch_afresh():
    """Plan.begin runs before each batch's first step with that batch's x, so history kept by
    a multistep plan never crosses batches: batch size does not change the samples."""

    class Counting(FixtureDDIM):
        def plan(self, process, steps):
            plan = super().plan(process, steps)
            plan.__class__ = type("CountingPlan", (type(plan),), {
                "linear": False,
                "begin": lambda self, x: begun.append(tuple(x.shape)),
            })  # fmt: skip
            return plan

    begun = []
    whole = sample(dummy_denoiser(), Counting(), steps=3, seeds=[0, 1, 2, 3, 4])
    assert begun == [(5, 1, 4, 4)]
    begun.clear()
    split = sample(dummy_denoiser(), Counting(), steps=3, seeds=[0, 1, 2, 3, 4], batch_size=2)
    assert begun == [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    torch.testing.assert_close(whole, split, rtol=0, atol=0)


def test_guidance_combines_conditional_and_unconditional_predictions():
    from diffplug.components import Conditioner, DenoiserConfig

    class Labels(Conditioner):
        kind = "class"

        def forward(self, inputs):
            return {
                "labels": torch.tensor(
                    [-1 if v is None else v for v in inputs], dtype=torch.float32
                )
            }

    class Shift(type(dummy_denoiser())):
        def forward(self, x, t, cond=None):
            return 0.1 * x + cond["labels"].clamp(min=0).view(-1, 1, 1, 1)

    model = Shift(DenoiserConfig(size=2, conditioning="class", prediction="x0"))
    a = sample(
        model, FixtureDDIM(), steps=1, seeds=[0], conditioner=Labels(), conditions=[2], guidance=1.0
    )
    b = sample(
        model, FixtureDDIM(), steps=1, seeds=[0], conditioner=Labels(), conditions=[2], guidance=3.0
    )
    x_t = NoiseSource([0], (1, 2, 2), steps=0).initial()
    # one DDIM step to t=-1 returns x0_hat: cond = 0.1x + 2, uncond = 0.1x
    torch.testing.assert_close(a, 0.1 * x_t + 2)
    torch.testing.assert_close(b, 0.1 * x_t + 6)
    assert as_tuple(a)[0] is a
