"""The Efficient U-Net: what it reads from its conditions, its option checks, and
classifier-free guidance in core's loop under the DDPM, DDIM and ADM samplers."""

import pytest
import torch

from diffplug import IncompatibleError, OptionError, default_registry, sample
from diffplug.testing import check_denoiser
from diffplug_imagen.text import TextConditioner, TextConfig
from diffplug_imagen.unet import EfficientUNet, EfficientUNetConfig


def randomised(model, seed=0):
    """Zero-initialised output layers make a new model ignore its inputs; shake them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def text_pair():
    torch.manual_seed(0)
    model = randomised(EfficientUNet(EfficientUNetConfig(size=8, width=16, text_dim=32)))
    cond = TextConditioner(TextConfig(dim=32, max_tokens=12)).eval()
    cond.name = "text"
    return model, cond


def test_text_model_uses_tokens_and_pooled_vector_and_ignores_padding():
    model, cond = text_pair()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0])
    c = cond(["seven", "three"])
    check_denoiser(model, batch=2, cond=c)
    with torch.no_grad():
        out = model(x, t, c)
        other = model(x, t, cond(["three", "seven"]))
        assert not torch.allclose(out, other)
        pooled_only = dict(c, text=torch.zeros_like(c["text"]))
        assert not torch.allclose(model(x, t, pooled_only), out)  # cross-attention is used
        tokens_only = dict(c, text_pooled=torch.zeros_like(c["text_pooled"]))
        assert not torch.allclose(model(x, t, tokens_only), out)  # so is the pooled vector
        masked = dict(c, text=torch.where(c["text_mask"][..., None], c["text"], 7.0))
        torch.testing.assert_close(model(x, t, masked), out, rtol=0, atol=1e-5)
        empty = cond.null(2)  # every token masked: the learned null key/value keeps it defined
        assert torch.isfinite(model(x, t, empty)).all()


def test_super_resolution_stage_reads_the_image_and_the_augmentation_level():
    torch.manual_seed(0)
    model = randomised(EfficientUNet(EfficientUNetConfig(size=16, width=16, low_size=8,
                                                         cross_attention=[])))  # fmt: skip
    assert model.conditioning == "image"
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300.0, 300.0])
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        base = model(x, t, {"image": image})
        at_zero = model(x, t, {"image": image, "aug_level": torch.zeros(2)})
        torch.testing.assert_close(base, at_zero, rtol=0, atol=0)  # absent level means 0
        assert not torch.allclose(
            model(x, t, {"image": image, "aug_level": torch.full((2,), 0.3)}), base
        )
        assert not torch.allclose(model(x, t, {"image": -image}), base)
    with pytest.raises(IncompatibleError, match="needs cond\\['image'\\]"):
        model(x, t, None)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(text_dim=32, low_size=8), "not both"),
        (dict(blocks=[1]), "one count per level"),
        (dict(size=6, mults=[1, 2, 2], blocks=[1, 1, 1]), "divisible by 4"),
        (dict(text_dim=32, conditioning="image"), "does not fit"),
    ],
)
def test_bad_options_are_refused_with_the_reason(options, message):
    with pytest.raises(OptionError, match=message):
        EfficientUNetConfig(**options)


def test_text_width_mismatch_is_refused_before_any_math():
    model, _ = text_pair()
    wide = TextConditioner(TextConfig(dim=64)).eval()
    with pytest.raises(IncompatibleError, match="--text-dim 32"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([10.0]), wide(["seven"]))


class ManualGuidance(torch.nn.Module):
    """The reference: guidance computed by hand inside the denoiser, two separate calls."""

    def __init__(self, model, cond, w):
        super().__init__()
        self.model, self.cond, self.w = model, cond, w
        self.config, self.process = model.config, model.process
        self.prediction, self.sample_shape = model.prediction, model.sample_shape
        self.conditioning = model.conditioning

    def forward(self, x, t, c):
        with torch.no_grad():
            u = self.model(x, t, self.cond.null(x.shape[0]))
            return u + self.w * (self.model(x, t, c) - u)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "adm"])
def test_guidance_in_the_loop_equals_guidance_by_hand_for_every_sampler(sampler):
    model, cond = text_pair()
    scheduler = default_registry().load("scheduler", sampler)()
    prompts = ["seven", "the digit 3", ""]  # the test encoder reads 12 bytes
    kw = dict(steps=4, seeds=[0, 1, 2], conditioner=cond, conditions=prompts)
    guided = sample(model, scheduler, guidance=4.0, **kw)
    by_hand = sample(ManualGuidance(model, cond, 4.0), scheduler, guidance=1.0, **kw)
    # batched (2B) vs two calls of B: float32 rounding only, amplified by w
    torch.testing.assert_close(guided, by_hand, rtol=1e-4, atol=2e-4)
    plain = sample(model, scheduler, guidance=1.0, **kw)
    assert (guided - plain).abs().max() > 1e-3  # guidance changed something


@pytest.mark.parametrize("case", ["text width", "image channels", "image size"])
def test_a_conditioner_the_model_cannot_read_is_refused_before_the_first_step(case):
    """check_compatible compares kinds; the loop's one-sample preflight catches the rest (a T5
    of another width, an RGB condition for a grey stage) before any step runs."""
    from diffplug import LowResConditioner, LowResConfig

    registry = default_registry()
    if case == "text width":
        model, _ = text_pair()
        conditioner = TextConditioner(TextConfig(dim=48, heads=4, max_tokens=12)).eval()
        conditions, match = ["seven"], "text embeddings of width 48"
    else:
        torch.manual_seed(0)
        model = randomised(EfficientUNet(EfficientUNetConfig(size=16, width=16, low_size=8,
                                                             cross_attention=[])))  # fmt: skip
        if case == "image channels":
            conditioner = LowResConditioner(LowResConfig(low_size=8, channels=3))
            conditions, match = [torch.zeros(3, 16, 16)], "shape \\(B, 1, h, w\\)"
        else:
            conditioner = LowResConditioner(LowResConfig(low_size=4, channels=1))
            conditions, match = [torch.zeros(1, 16, 16)], "trained on 8x8 conditions; got 4x4"
    steps = []
    with pytest.raises(IncompatibleError, match=match) as info:
        sample(model, registry.load("scheduler", "ddim")(), steps=5, seeds=[0],
               conditioner=conditioner, conditions=conditions,
               callback=steps.append)  # fmt: skip
    assert "cannot read what conditioner" in str(info.value) and steps == []
