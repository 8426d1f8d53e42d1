"""Every installed sampler x every registered schedule, on both kinds of process: the pair
samples, walking the schedule's levels, or is refused before any denoiser call with an
error that names the sampler and says why.

The samplers and schedules are read from the registry when the tests are collected, so a
newly installed plugin's samplers are covered without editing this file; none is skipped.
A sampler takes ``--schedule`` exactly when it declares ``walks_noise_levels`` (core refuses
the others in ``diffplug.load``, before the model is even read); the refusing samplers are
listed in ``REFUSED`` with their reason, so a sampler that starts or stops refusing is seen.

The models are the exact Gaussian-mixture oracle ``gmm-digits`` (the discrete VP process)
and the same mixture written for ADM's decoupled process (saved here), 3 steps, 2 samples:
every level sampler runs on both through the bridge, DDIM/DDPM are bridged to VP and ADM's
sampler to its decoupled process. A handful of pairs go through the command line as well,
on the shipped networks.
"""

from __future__ import annotations

import pytest
import torch
from cliutil import assert_clean_error, run_cli, run_subprocess

import diffplug
from diffplug.bridge import planning_process
from diffplug.checkpoint import load_component, load_tensors, save_component
from diffplug.oracle import GaussianMixtureDenoiser
from diffplug.output import read_recipe
from diffplug.registry import default_registry

STEPS = 3
SAMPLERS = default_registry().names("scheduler")
SCHEDULES = default_registry().names("schedule")
#: samplers that choose their own steps, and why (each refuses every schedule)
REFUSED = {
    "diffusers": "a diffusers scheduler computes its own timesteps (set_timesteps)",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """gmm-digits (VP) and the same mixture on the decoupled (ADM) process."""
    registry = default_registry()
    vp_path = registry.get("pretrained", "gmm-digits").load()
    gmm = load_component(vp_path, kind="denoiser")
    decoupled = GaussianMixtureDenoiser.from_mixture(
        gmm.means, gmm.variances, gmm.weights, process={"name": "decoupled"}
    )
    path = tmp_path_factory.mktemp("models") / "gmm-decoupled.safetensors"
    save_component(decoupled, path, kind="denoiser")
    return {"vp": "gmm-digits", "decoupled": str(path)}


@pytest.fixture
def calls(monkeypatch):
    """Counts the oracle's forward calls (a refusal must come before the first)."""
    count = {"n": 0}
    forward = GaussianMixtureDenoiser.forward

    def counted(self, x, t, cond=None):
        count["n"] += 1
        return forward(self, x, t, cond)

    monkeypatch.setattr(GaussianMixtureDenoiser, "forward", counted)
    return count


def sampler_class(name: str):
    """The sampler's class: an installed sampler that cannot be imported fails here, loudly
    (``diffplug list samplers`` shows its error)."""
    return default_registry().load("scheduler", name)


@pytest.mark.parametrize("process", ["vp", "decoupled"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_pair_samples_or_is_refused_before_any_step(sampler, schedule, process, models,
                                                         calls):  # fmt: skip
    cls = sampler_class(sampler)
    if not cls.walks_noise_levels:
        with pytest.raises(diffplug.DiffplugError) as refused:
            diffplug.load(sampler=sampler, model=models[process], steps=STEPS, schedule=schedule)
        message = str(refused.value)
        assert f"sampler {sampler!r}" in message and "drop --schedule" in message, message
        assert "chooses its own steps" in message, message  # the reason
        assert calls["n"] == 0
        assert sampler in REFUSED, f"{sampler} refuses --schedule: add it to REFUSED, with why"
        return
    assert sampler not in REFUSED, f"{sampler} now takes --schedule: drop it from REFUSED"
    run = diffplug.load(sampler=sampler, model=models[process], steps=STEPS, schedule=schedule)
    out = run.sample(2, seed=0, progress=False)
    assert out.tensor.shape == (2, 1, 8, 8) and bool(torch.isfinite(out.tensor).all())
    assert out.recipe["schedule"]["name"] == schedule
    assert calls["n"] > 0
    # the plan visits every level of the schedule (on the process it plans on), whatever
    # else it visits between them; a level is sigma/alpha in any parametrisation
    plan = run.loop.plan
    planned = planning_process(run.scheduler, run.denoiser.process)
    levels = run.schedule.levels(planned, STEPS, *run.scheduler.sigma_range)[:-1]
    visited = torch.tensor([s / a for s, a in zip(plan.sigma, plan.alpha, strict=True)],
                           dtype=torch.float64)  # fmt: skip
    gaps = ((visited[None, :] - levels[:, None]).abs() / levels[:, None]).amin(dim=1)
    assert float(gaps.max()) < 1e-9, (levels.tolist(), visited.tolist())
    assert float(visited.max()) == pytest.approx(float(levels[0]), rel=1e-9)


def test_the_refused_samplers_are_installed_and_refuse():
    """Every sampler named in REFUSED is installed and declares no noise-level walk (so the
    pair test above saw it refuse, with its reason)."""
    for name in REFUSED:
        assert name in SAMPLERS, name
        assert not sampler_class(name).walks_noise_levels, name


# -- the command line: a handful of pairs on the shipped networks ----------------------------
@pytest.mark.parametrize(
    "sampler, schedule, model",
    [
        ("adm", "karras", "ddpm-digits"),  # ADM's posterior step, bridged to its process
        ("adm", "beta", "adm-digits"),
        ("ddim", "sgm-uniform", "adm-digits"),  # DDIM bridged to VP
        ("heun", "kl-optimal", "adm-digits"),  # a level sampler on the decoupled process
        ("dpmpp-2m-sde", "linear-quadratic", "ddpm-digits"),
        ("euler-ancestral", "ddim-uniform", "ddpm-digits"),
    ],
)
def test_the_command_line_runs_pairs_on_the_shipped_models(tmp_path, sampler, schedule, model):
    out = tmp_path / "s.safetensors"
    result = run_cli("run", "--sampler", sampler, "--schedule", schedule, "--model", model,
                     "--steps", "3", "--num-samples", "2", "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    x = load_tensors(out)["samples"]
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())
    recipe = read_recipe(out)
    assert recipe["schedule"]["name"] == schedule and recipe["sampler"]["name"] == sampler


@pytest.mark.parametrize("sampler", sorted(REFUSED))
def test_the_command_line_refuses_with_exit_2_and_writes_nothing(tmp_path, sampler):
    out = tmp_path / "x.png"
    result = run_cli("run", "--sampler", sampler, "--schedule", "karras", "-o", str(out))
    assert_clean_error(result, f"sampler {sampler!r} chooses its own steps", "drop --schedule")
    assert not out.exists()


def test_a_real_diffplug_process_refuses_with_one_line(tmp_path):
    """The refusal from ``python -m diffplug`` itself: exit 2, one line, nothing written
    (the in-process runs above go through the same ``main``)."""
    refused = tmp_path / "b.png"
    result = run_subprocess("run", "--sampler", "diffusers", "--schedule", "beta", "-o",
                            str(refused), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert_clean_error(result, "sampler 'diffusers'", "drop --schedule")
    assert len(result.err.strip().splitlines()) == 1 and not refused.exists()
