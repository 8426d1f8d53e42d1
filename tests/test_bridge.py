"""Any sampler on any denoiser: a model of one Gaussian process, re-expressed for another by
matching the signal-to-noise ratio and rescaling x (``diffplug.bridge``).

The Gaussian-mixture oracle is exact in every process, so the bridged oracle of process P
must equal the oracle written directly in process Q, and samplers of Q must draw the mixture
from P's oracle as they do from their own.
"""

from __future__ import annotations

import json

import pytest
import torch
from cliutil import run_cli

from diffplug.bridge import ProcessBridge, bridge
from diffplug.oracle import circle_mixture
from diffplug.sampling import sample
from diffplug.testing.mixture import assert_matches_mixture
from diffplug.testing.threads import torch_threads
from diffplug.vp import VP, VPConfig
from diffplug_adm.process import Decoupled
from diffplug_adm.scheduler import ADM
from diffplug_ddim.scheduler import DDIM

F64 = torch.float64
VP_LINEAR = {"name": "vp"}
DECOUPLED = {"name": "decoupled"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _v(oracle, x, t):
    """The oracle's exact answer in its own process, as v = alpha*eps - sigma*x0."""
    x0 = oracle(x, t)
    a, s = (z.view(-1, 1, 1, 1) for z in oracle.process.alpha_sigma(t))
    return a * ((x - a * x0) / s) - s * x0


@pytest.mark.parametrize(
    "source, target, times",
    [
        (VP_LINEAR, DECOUPLED, [0.01, 0.2, 0.5, 0.9, 0.99]),
        (DECOUPLED, VP_LINEAR, [0.0, 1.0, 123.5, 500.0, 998.25]),
        (
            {"name": "vp", "beta_schedule": "squaredcos_cap_v2"},
            VP_LINEAR,
            [3.0, 250.75, 900.0],
        ),
    ],
    ids=["vp->decoupled", "decoupled->vp", "cosine->linear"],
)
def test_the_bridged_oracle_is_the_oracle_of_the_other_process(source, target, times):
    inner, direct = circle_mixture(process=source), circle_mixture(process=target)
    bridged = ProcessBridge(inner, direct.process)
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t in times:
        tt = torch.full((6,), t, dtype=F64)
        torch.testing.assert_close(bridged(x, tt), _v(direct, x, tt), rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "process", [VP(), VP(VPConfig(beta_schedule="scaled_linear")), Decoupled()]
)
def test_t_for_logsnr_inverts_logsnr(process):
    low, high = process.t_range
    t = torch.linspace(low, high, 37, dtype=F64)
    back = process.t_for_logsnr(process.logsnr(t))
    torch.testing.assert_close(back, t, rtol=0, atol=1e-9 * max(1.0, high))
    # beyond the range: clamped to its ends
    ends = process.t_for_logsnr(torch.tensor([1e6, -1e6], dtype=F64))
    torch.testing.assert_close(ends, torch.tensor([low, high], dtype=F64), rtol=0, atol=1e-9)


def test_pure_noise_outside_the_source_range_stays_finite():
    """ADM starts at t = 1 (alpha = 0): no VP time has that SNR, so the bridge clamps to the
    VP model's noisiest step and answers v = -x0_hat there (x0_hat near the data mean)."""
    oracle = circle_mixture(process=VP_LINEAR)
    bridged = ProcessBridge(oracle, Decoupled())
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    v = bridged(x, torch.ones(4, dtype=F64))
    assert bool(torch.isfinite(v).all())
    mean = oracle.data_mean().view(1, 1, 2, 2)
    assert float((v + mean).abs().max()) < 0.05


def test_bridge_only_when_needed():
    vp_oracle = circle_mixture(process=VP_LINEAR)
    assert bridge(vp_oracle, DDIM()) is vp_oracle
    bridged = bridge(vp_oracle, ADM())
    assert isinstance(bridged, ProcessBridge) and bridged.process.name == "decoupled"
    assert bridged.prediction == "v" and bridged.sample_shape == vp_oracle.sample_shape


@pytest.mark.slow
@pytest.mark.parametrize(
    "oracle_process, sampler",
    [(DECOUPLED, DDIM()), (DECOUPLED, DDIM.from_options(eta=1.0)), (VP_LINEAR, ADM())],
    ids=["ddim-on-decoupled", "ddim-eta1-on-decoupled", "adm-on-vp"],
)
def test_a_foreign_sampler_draws_the_mixture(oracle_process, sampler):
    """1000 steps of a sampler of the other process draw the mixture's mean, covariance and
    mode weights (the spread is each sampler's own discretisation matter, tested elsewhere)."""
    oracle = circle_mixture(process=oracle_process)
    x = sample(oracle, sampler, steps=1000, seeds=range(4096), dtype=F64)
    assert_matches_mixture(x, oracle, keys=("mean", "covariance", "modes"))


def test_cli_runs_ddim_on_the_adm_model_and_adm_on_the_ddpm_model(tmp_path):
    for sampler, model in (("ddim", "adm-digits"), ("adm", "ddpm-digits")):
        out = tmp_path / f"{sampler}.safetensors"
        result = run_cli("run", "--sampler", sampler, "--model", model, "--steps", "5",
                         "--num-samples", "4", "-q", "-o", str(out))  # fmt: skip
        assert result.code == 0, result.err
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            recipe = json.loads(f.metadata()["diffplug.recipe"])
            x = f.get_tensor("samples")
        assert recipe["bridged"]["to"]["name"] == ("vp" if sampler == "ddim" else "decoupled")
        assert bool(torch.isfinite(x).all())
