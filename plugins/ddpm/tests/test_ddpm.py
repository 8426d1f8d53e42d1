"""The DDPM plugin's own tests: the ancestral step against the closed-form posterior, its
registration and the scheduler contract, the UNet, the training loss, and the shipped
``ddpm-digits`` weights.

The posterior q(x_{t'} | x_t, x0) is derived here independently of Ho et al.'s formula, by
conditioning the joint Gaussian of (x_{t'}, x_t) given x0 (t' the next timestep of the
sub-sequence, abar' = abar_{t'}):

    x_{t'} = sqrt(abar')*x0 + sqrt(1 - abar')*e1,   x_t = sqrt(abar_t/abar')*x_{t'} + ...,
    Var x_{t'} = 1 - abar',  Var x_t = 1 - abar_t,  Cov = sqrt(abar_t/abar')*(1 - abar'),

so mean = sqrt(abar')*x0 + Cov/Var x_t*(x_t - sqrt(abar_t)*x0) and variance = the Schur
complement 1 - abar' - Cov^2/(1 - abar_t), all in float64 from the alphas_cumprod table.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re

import numpy as np
import pytest
import torch

import diffplug
import diffplug_ddpm.plugin as plugin
from diffplug import (
    KINDS,
    VP,
    OptionError,
    VPConfig,
    default_registry,
    load_component,
    read_metadata,
    save_component,
)
from diffplug.testing import (
    check_denoiser,
    check_sampler_deterministic,
    check_scheduler,
    fresh_registry,
)
from diffplug_ddpm.method import DDPMMethod
from diffplug_ddpm.scheduler import DDPM
from diffplug_ddpm.unet import UNet, UNetConfig

F64 = torch.float64
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")


def ddpm_sampler(**options) -> DDPM:
    """The sampler as the plugin registers it (not the class imported directly)."""
    return fresh_registry(plugin).load("scheduler", "ddpm").from_options(**options)


def posterior(abar_t: float, abar_prev: float) -> tuple[float, float, float]:
    """(coefficient of x_t, coefficient of x0, variance) of q(x_{t'} | x_t, x0), by Gaussian
    conditioning (module docstring)."""
    var_prev, var_t = 1 - abar_prev, 1 - abar_t
    cov = math.sqrt(abar_t / abar_prev) * var_prev
    gain = cov / var_t
    return gain, math.sqrt(abar_prev) - gain * math.sqrt(abar_t), var_prev - cov * cov / var_t


def close(x: float, y: float, rel: float = 1e-10) -> bool:
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-14)


# ------------------------------------------------------------------- the ancestral step


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize(
    "config", [VPConfig(), VPConfig(beta_schedule="squaredcos_cap_v2")], ids=["linear", "cosine"]
)
def test_every_1000_step_transition_is_the_posterior(config, variance):
    process = VP(config)
    abar = process.alphas_cumprod.to(F64).tolist()
    plan = ddpm_sampler(variance=variance).plan(process, 1000)
    assert plan.info["timesteps"] == list(range(999, -1, -1))
    assert all(c == 0 for c in plan.c)  # the update is written in x_t and x0_hat only
    for t in (999, 998, 900, 500, 250, 100, 10, 2, 1):
        i = 999 - t
        coef_x, coef_x0, var = posterior(abar[t], abar[t - 1])
        assert close(plan.a[i], coef_x) and close(plan.b[i], coef_x0), (t, plan.a[i], plan.b[i])
        # Ho et al.'s eq. 7 with beta_t = 1 - abar_t/abar_{t-1}: the same posterior
        beta = 1 - abar[t] / abar[t - 1]
        assert close(var, (1 - abar[t - 1]) / (1 - abar[t]) * beta)
        want = var if variance == "fixed_small" else beta
        assert close(plan.d[i] ** 2, want), (t, plan.d[i] ** 2, want)
        assert close(plan.alpha[i], math.sqrt(abar[t]))
        assert close(plan.sigma[i], math.sqrt(1 - abar[t]))
    # t = 0 steps to x0_hat exactly, with no noise
    assert (plan.a[-1], plan.b[-1], plan.d[-1]) == (0.0, 1.0, 0.0)
    assert not plan.noisy(999) and all(plan.noisy(i) for i in range(999))


def test_fixed_large_variance_is_the_betas_table():
    """fixed_large at T steps is Ho et al.'s sigma_t^2 = beta_t, from the betas table itself
    (float32 rounding of alphas_cumprod, relative ~6e-8, is all that separates
    1 - abar_t/abar_{t-1} from beta_t where beta is ~1e-4: measured 3.5e-4, at t = 4)."""
    process = VP()
    d = torch.tensor(ddpm_sampler(variance="fixed_large").plan(process, 1000).d, dtype=F64)
    betas = process.betas.to(F64)[1:]
    rel = ((d.flip(0)[1:] ** 2 - betas) / betas).abs().max().item()
    assert rel < 1e-3, rel


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_sub_sequence_steps_are_the_posterior_between_consecutive_timesteps(spacing, variance):
    process = VP()
    abar = process.alphas_cumprod.to(F64).tolist()
    for steps in (3, 10, 37):
        plan = ddpm_sampler(variance=variance, spacing=spacing).plan(process, steps)
        ts = plan.info["timesteps"]
        for i, t in enumerate(ts):
            prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
            coef_x, coef_x0, var = posterior(abar[t], prev)
            assert close(plan.a[i], coef_x) and close(plan.b[i], coef_x0), (steps, t)
            want = var if variance == "fixed_small" else 1 - abar[t] / prev
            assert close(plan.d[i] ** 2, want) if t > 0 else plan.d[i] == 0, (steps, t)
            if variance == "fixed_small":
                # x_t ~ q(x_t | x0) stepped by the posterior has q(x_{t'} | x0) as marginal
                assert close(plan.a[i] * math.sqrt(abar[t]) + plan.b[i], math.sqrt(prev))
                assert close(plan.a[i] ** 2 * (1 - abar[t]) + plan.d[i] ** 2, 1 - prev)


def test_options_out_of_range_are_refused_naming_the_option():
    with pytest.raises(OptionError, match="--spacing must be one of leading, trailing, linspace"):
        ddpm_sampler(spacing="quadratic")
    with pytest.raises(OptionError, match="--variance must be one of fixed_small, fixed_large"):
        ddpm_sampler(variance="learned")
    with pytest.raises(OptionError, match="--steps-offset must be >= 0"):
        ddpm_sampler(steps_offset=-1)


# ------------------------------------------------------------------ registration, contracts


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_registers_its_components_through_its_entry_point():
    eps = [
        ep
        for ep in importlib.metadata.entry_points(group="diffplug")
        if ep.dist is not None and _normalize(ep.dist.name) == "diffplug-ddpm"
    ]
    assert [ep.value for ep in eps] == ["diffplug_ddpm.plugin"]
    assert eps[0].load() is plugin
    registry = fresh_registry(eps[0].load())
    assert list(registry.errors()) == []
    core = fresh_registry()
    added = {kind: set(registry.names(kind)) - set(core.names(kind)) for kind in KINDS}
    assert {k: v for k, v in added.items() if v} == {
        "scheduler": {"ddpm"},
        "method": {"ddpm"},
        "denoiser": {"unet"},
        "pretrained": {"ddpm-digits"},
    }
    assert registry.load("scheduler", "ddpm") is DDPM
    assert registry.load("method", "ddpm") is DDPMMethod
    assert registry.load("denoiser", "unet") is UNet
    assert os.path.isfile(registry.load("pretrained", "ddpm-digits"))


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_honours_the_scheduler_contract(spacing, variance):
    sampler = ddpm_sampler(spacing=spacing, variance=variance)
    check_scheduler(sampler)
    check_scheduler(sampler, VP(VPConfig(beta_schedule="squaredcos_cap_v2")))
    check_scheduler(sampler, VP(VPConfig(num_train_timesteps=50)), steps=(1, 7, 50))


def test_samples_are_deterministic_per_seed():
    check_sampler_deterministic(ddpm_sampler(spacing="trailing"))


# ---------------------------------------------------------------------------- the UNet


def tiny_unet(seed: int = 0, **options) -> UNet:
    """A small UNet with its zero-initialised output layers perturbed (a fresh UNet outputs
    exactly 0, which depends on nothing)."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{"size": 8, "width": 8, "heads": 2, **options}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "options",
    [
        {"channels": 1},
        {"channels": 3, "prediction": "x0"},
        {"channels": 2, "size": 16, "mults": [1, 2, 2], "blocks": 2},
        {"channels": 1, "size": 6, "attention": []},
    ],
    ids=["1x8x8", "3x8x8", "2x16x16-3-levels", "1x6x6-no-attention"],
)
def test_unet_maps_each_shape_to_itself(options):
    model = tiny_unet(**options).eval()
    c, h, w = model.sample_shape
    x = torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 400.0, 999.0]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_unet_is_deterministic_and_each_sample_sees_its_own_t():
    model = tiny_unet().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 8, generator=g).expand(3, -1, -1, -1).contiguous()
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        out = model(x, t)
        assert torch.equal(out, model(x, t))  # the same call twice: bitwise equal
        # the same image at three times gives three different outputs ...
        for i, j in [(0, 1), (1, 2), (0, 2)]:
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
        # ... each the output of that sample alone at its own t (not t[0], not a mean)
        for k in range(3):
            alone = model(x[k : k + 1], t[k : k + 1])
            assert torch.allclose(out[k : k + 1], alone, rtol=1e-5, atol=1e-6), k
    # training mode: dropout (0.1 by default) makes two calls differ
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


def test_unet_honours_the_denoiser_contract_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig(size=8, width=8, heads=2, prediction="v"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    check_denoiser(model)
    path = tmp_path / "m.safetensors"
    save_component(model, path, kind="denoiser")
    again = load_component(path, kind="denoiser")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t), again(x, t))
    assert again.config == model.config


def test_class_conditional_unet_uses_labels_and_a_null_label():
    torch.manual_seed(0)
    model = UNet(UNetConfig(size=8, width=8, heads=2, num_classes=10, conditioning="class"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 5.0])
    with torch.no_grad():
        a = model(x, t, {"labels": torch.tensor([1, 1])})
        b = model(x, t, {"labels": torch.tensor([2, 2])})
        null = model(x, t, None)
    assert not torch.allclose(a, b) and not torch.allclose(a, null)


# ------------------------------------------------------------------ the training method


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_the_mse_to_the_target_on_a_seeded_batch(prediction):
    """Method.loss draws t ~ U{0..T-1} then eps ~ N(0, I) from the generator; the reference
    redraws them from an identically seeded one, forms x_t with abar from float64 numpy betas
    and takes the plain mean of squared errors (eps, or v = alpha*eps - sigma*x0)."""
    model = tiny_unet(prediction=prediction).eval()
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    method = DDPMMethod()
    with torch.no_grad():
        loss = method.loss(model, x0, None, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0.double() + sigma * eps.double()
    with torch.no_grad():
        out = model(x_t.float(), t.float()).double()
    target = eps.double() if prediction == "eps" else alpha * eps - sigma * x0
    expected = (out - target).pow(2).mean()
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # measured 8e-8
    # a different seed draws other t and eps: a different loss
    with torch.no_grad():
        other = method.loss(model, x0, None, torch.Generator().manual_seed(8))
    assert abs(other.item() - loss.item()) > 1e-3 * loss.item()


def test_training_times_are_uniform_integers_over_the_process():
    method = DDPMMethod.from_options(num_train_timesteps=50, beta_schedule="scaled_linear")
    spec = method.process_spec()
    assert spec == {
        "name": "vp",
        "num_train_timesteps": 50,
        "beta_schedule": "scaled_linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "rescale_zero_terminal_snr": False,
    }
    assert method.denoiser_defaults() == {"process": spec}
    model = UNet(UNetConfig(size=8, width=8, heads=2, **method.denoiser_defaults()))
    n = 50_000
    t = method.sample_times(model, n, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32 and torch.equal(t, t.round())
    counts = torch.bincount(t.long(), minlength=50)
    assert len(counts) == 50  # nothing outside 0..49
    # chi-square against U{0..49}: 49 degrees of freedom, P(> 100) ~ 2e-5
    chi2 = ((counts - n / 50) ** 2 / (n / 50)).sum().item()
    assert chi2 < 100, chi2
    with pytest.raises(OptionError, match="--beta-schedule must be one of"):
        DDPMMethod.from_options(beta_schedule="sigmoid")


# -------------------------------------------------------------------------- ddpm-digits


def test_ddpm_digits_loads_and_is_the_model_its_docs_describe():
    """The plugin's README says nothing of the model; its registered summary ("UNet (eps,
    linear betas, T=1000) trained on the 8x8 digits; EMA weights") and docs/models.md (0.76M
    parameters, width 32, multipliers (1, 2), one block per level, attention at 4x4, dropout
    0.1, 8000 steps of batch 128, EMA 0.999) do."""
    entry = default_registry().get("pretrained", "ddpm-digits")
    assert entry.dist == "diffplug-ddpm"
    assert entry.summary.startswith("UNet (eps, linear betas, T=1000) trained on the 8x8 digits")
    path = entry.load()
    model = diffplug.load_component(path)
    assert isinstance(model, UNet) and not model.training
    cfg = model.config
    assert cfg.prediction == "eps" and cfg.conditioning is None and cfg.num_classes == 0
    assert model.sample_shape == (1, 8, 8)
    assert model.process.spec() == {
        "name": "vp",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "rescale_zero_terminal_snr": False,
    }
    assert (cfg.width, cfg.mults, cfg.blocks, cfg.attention, cfg.dropout) == (
        32, [1, 2], 1, [4], 0.1,
    )  # fmt: skip
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.76
    extra = read_metadata(path)["extra"]
    assert extra["method"]["name"] == "ddpm" and extra["data"]["spec"] == "digits"
    assert extra["data"]["size"] == 8 and extra["step"] == 8000
    assert extra["train"]["batch_size"] == 128 and extra["train"]["ema_decay"] == 0.999


def test_ddpm_digits_predicts_the_noise_of_held_out_digits():
    """The weights are trained: on noised held-out digits the eps error at t = 300 is far
    below the 1.0 of an untrained (zero-output) UNet (measured 0.086)."""
    from diffplug import digits

    model = diffplug.load_component(default_registry().get("pretrained", "ddpm-digits").load())
    x0 = digits("heldout", 8).images[:64]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = model.process.alphas_cumprod.to(F64)[300]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()
    with torch.no_grad():
        err = (model(x_t, torch.full((64,), 300.0)) - eps).pow(2).mean().item()
    assert err < 0.2, err
