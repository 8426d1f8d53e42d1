"""Tiny, seeded diffusers UNets and noise factories shared by this plugin's tests."""

import pytest
import torch

from diffplug.testing import torch_threads

SIZE = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


#: what every tiny test UNet shares: 1x8x8, two levels of 8 and 16 channels
TINY = dict(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4)  # fmt: skip


def _build(cls_name: str, seed: int, config: dict):
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**{**TINY, **config}).eval()


def _unet(seed: int = 0, **overrides):
    return _build("UNet2DModel", seed, {
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
        **overrides,
    })  # fmt: skip


def _text_unet(seed: int = 0, width: int = 16, **overrides):
    return _build("UNet2DConditionModel", seed, {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": width,
        "attention_head_dim": 4,
        **overrides,
    })  # fmt: skip


@pytest.fixture
def make_unet():
    """make_unet(seed=0, **config) -> a tiny UNet2DModel (1x8x8), seeded."""
    return _unet


@pytest.fixture
def make_text_unet():
    """make_text_unet(seed=0, width=16, **config) -> a tiny UNet2DConditionModel."""
    return _text_unet


class GeneratorNoise:
    """diffusers' draw order: x_T, then one draw per noisy step, all from one generator.

    A hand-written diffusers loop draws x_T = randn(shape, generator=g) and its scheduler
    draws randn_tensor(shape, generator=g) at each stochastic step; this ``sample(noise=...)``
    factory makes the same calls on an identically seeded generator.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def __call__(self, seeds, shape, noisy_steps):
        self.shape = (len(seeds), *shape)
        self.noisy_steps = noisy_steps
        return self

    def initial(self):
        return torch.randn(self.shape, generator=self.generator)

    def next(self):
        self.drawn += 1
        return torch.randn(self.shape, generator=self.generator)


class ReplayNoise:
    """A ``sample(noise=...)`` factory replaying a given x_T and per-step noise, in order."""

    def __init__(self, initial, steps):
        self._initial, self._steps, self.drawn = initial, steps, 0

    def __call__(self, seeds, shape, noisy_steps):
        assert (len(seeds), *shape) == tuple(self._initial.shape)
        self.noisy_steps = noisy_steps
        return self

    def initial(self):
        return self._initial

    def next(self):
        z = self._steps[self.drawn]
        self.drawn += 1
        return z


@pytest.fixture
def noise():
    """The noise factories: noise.generator(seed), noise.replay(x_T, zs)."""

    class Factories:
        generator = GeneratorNoise
        replay = ReplayNoise

    return Factories


def max_diff(a, b):
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def diff():
    return max_diff
