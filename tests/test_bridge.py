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

from diffplug.bridge import bridge, planning_process
from diffplug.errors import IncompatibleError
from diffplug.oracle import circle_mixture
from diffplug.prediction import as_tuple
from diffplug.sampling import fold, sample
from diffplug.testing.mixture import assert_matches_mixture
from diffplug.testing.threads import torch_threads
from diffplug.vp import VP, VPConfig
from diffplug_adm.process import Decoupled
from diffplug_adm.scheduler import ADM
from diffplug_ddim.scheduler import DDIM
from diffplug_ksamplers.samplers import DPMpp2M

F64 = torch.float64
VP_LINEAR = {"name": "vp"}
DECOUPLED = {"name": "decoupled"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _x0_eps_bridged(plan, view, oracle, x, i):
    """(x0_hat, eps_hat) the loop forms at step i of a bridged plan from ``oracle``."""
    tables = fold(plan, oracle.prediction, view)
    t = view.t[i].expand(x.shape[0])
    (pred,) = as_tuple(oracle(x * view.scale[i], t))
    return (
        tables.x0_x[i] * x + tables.x0_p[i][0] * pred,
        tables.eps_x[i] * x + tables.eps_p[i][0] * pred,
    )


@pytest.mark.parametrize(
    "source, target, sampler",
    [
        (VP_LINEAR, DECOUPLED, ADM()),
        (VP_LINEAR, DECOUPLED, ADM.from_options(deterministic=True)),
        (DECOUPLED, VP_LINEAR, DDIM.from_options(spacing="trailing")),
        (DECOUPLED, VP_LINEAR, DPMpp2M()),
        ({"name": "vp", "beta_schedule": "squaredcos_cap_v2"}, VP_LINEAR, DDIM()),
    ],
    ids=[
        "vp->adm",
        "vp->adm-deterministic",
        "decoupled->ddim",
        "decoupled->dpmpp-2m",
        "cosine->linear",
    ],  # fmt: skip
)
def test_the_bridged_oracle_is_the_oracle_of_the_other_process(source, target, sampler):
    """At every step whose SNR the model's process covers, the bridged plan turns the model
    of P into exactly the x0_hat and eps_hat the same mixture gives in Q."""
    inner, direct = circle_mixture(process=source), circle_mixture(process=target)
    plan = sampler.plan(direct.process, 25)
    view = bridge(plan, inner.process)
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    checked = 0
    for i in range(len(plan)):
        a, s = plan.alpha[i], plan.sigma[i]
        low, high = inner.process.t_range
        if not low + 1e-3 * (high - low) < float(view.t[i]) < high - 1e-3 * (high - low):
            continue  # at or beyond the ends of the model's SNR range: clamped (next test)
        x0, eps = _x0_eps_bridged(plan, view, inner, x, i)
        # x in the plan's terms is the point (alpha_q/a)*x of Q at plan.t[i]: x itself for a
        # plan in Q's own terms (DDIM), alpha_q*x for a level plan (x = x0 + s*eps)
        alpha_q = float(direct.process.alpha_sigma(plan.t[i : i + 1].to(F64))[0][0])
        want = direct(x * (alpha_q / a), plan.t[i].expand(6))
        torch.testing.assert_close(x0, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(eps, (x - a * want) / s, rtol=0, atol=1e-8)
        checked += 1
    assert checked >= 22
    assert float(view.t.min()) >= inner.process.t_range[0]


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


def test_a_two_headed_prediction_is_read_back_consistent_with_x():
    """Through v, the bridged (x0_hat, eps_hat) of a (c, eps) model whose heads disagree still
    satisfy x = alpha*x0_hat + sigma*eps_hat in the sampler's process (a deterministic sampler
    would otherwise accumulate the disagreement)."""
    model = circle_mixture(process=DECOUPLED)
    plan = DDIM().plan(VP(), 20)
    tables = fold(plan, "c_eps", bridge(plan, model.process))
    g = torch.Generator().manual_seed(3)
    x, c, eps = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(3))  # unrelated heads
    for i in range(len(plan)):
        x0_hat = tables.x0_x[i] * x + tables.x0_p[i][0] * c + tables.x0_p[i][1] * eps
        eps_hat = tables.eps_x[i] * x + tables.eps_p[i][0] * c + tables.eps_p[i][1] * eps
        back = plan.alpha[i] * x0_hat + plan.sigma[i] * eps_hat
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_pure_noise_outside_the_source_range_stays_finite():
    """ADM starts at t = 1 (alpha = 0): no VP time has that SNR, so the bridge clamps to the
    VP model's noisiest step, where x0_hat is near the data mean."""
    oracle = circle_mixture(process=VP_LINEAR)
    plan = ADM().plan(Decoupled(), 10)
    view = bridge(plan, oracle.process)
    assert float(view.t[0]) == pytest.approx(999.0)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x0, eps = _x0_eps_bridged(plan, view, oracle, x, 0)
    assert bool(torch.isfinite(x0).all()) and bool(torch.isfinite(eps).all())
    assert float((x0 - oracle.data_mean().view(1, 1, 2, 2)).abs().max()) < 0.05


def test_planning_process_bridges_only_when_needed():
    vp, decoupled = VP(), Decoupled()
    assert planning_process(DDIM(), vp) is vp
    assert planning_process(ADM(), decoupled) is decoupled
    assert planning_process(ADM(), vp).name == "decoupled"
    assert planning_process(DDIM(), decoupled).name == "vp"

    class NoNative(DDIM):
        def native_process(self):
            return None

    with pytest.raises(IncompatibleError, match="needs a discrete VP"):
        planning_process(NoNative(), decoupled)


@pytest.mark.slow
@pytest.mark.parametrize(
    "oracle_process, sampler",
    [
        (DECOUPLED, DDIM()),
        (DECOUPLED, DDIM.from_options(eta=1.0)),
        (DECOUPLED, DPMpp2M()),
        (VP_LINEAR, ADM()),
    ],
    ids=["ddim-on-decoupled", "ddim-eta1-on-decoupled", "dpmpp-2m-on-decoupled", "adm-on-vp"],
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
