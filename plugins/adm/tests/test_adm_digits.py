"""The shipped adm-digits model: loads by name, is the default for `--sampler adm`, draws
recognisable digits of every class, and does not copy its training set."""

import dataclasses

import pytest
import torch
from cliutil import run_cli

from diffplug import default_model, default_registry, evaluate, load_model, sample
from diffplug_adm.scheduler import ADM


def test_adm_digits_is_the_default_model_of_the_adm_sampler():
    registry = default_registry()
    scheduler = ADM()
    scheduler.name = "adm"
    assert default_model(registry, scheduler) == "adm-digits"
    model, _ = load_model(registry, "adm-digits")
    assert model.prediction == "c_eps" and model.process.name == "decoupled"
    assert model.config.cond_encoder is None


def test_run_adm_out_of_the_box(tmp_path):
    out = tmp_path / "adm.safetensors"
    result = run_cli("run", "--sampler", "adm", "--num-samples", "8", "-q", "-o", str(out))
    assert result.code == 0, result.err
    assert "adm-digits" in result.err
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        x = f.get_tensor("samples")
        assert '"steps": 10' in f.metadata()["diffplug.recipe"]  # the authors' default
    assert x.shape == (8, 1, 8, 8) and bool(torch.isfinite(x).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
def test_adm_digits_draws_recognisable_digits(deterministic):
    model, _ = load_model(default_registry(), "adm-digits")
    sampler = ADM.from_options(deterministic=deterministic)
    report = evaluate.evaluate(sample(model, sampler, steps=10, seeds=range(300), batch_size=100))
    hist = report["class_histogram"]
    assert min(hist) >= 0.04 and max(hist) <= 0.18, hist
    assert report["confidence"] > 0.9
    assert report["digits_fd"] < 3 * report["floor"], report
    assert report["memorised_share"] <= 0.2, report  # held-out digits score 0.10


def test_run_adm_with_a_schedule_records_it_and_replays(tmp_path):
    """`--sampler adm --schedule karras --rho 5` walks karras' levels on adm-digits (the
    recipe holds the schedule), and --recipe draws the same pixels again."""
    from diffplug import read_recipe

    first = tmp_path / "a.png"
    result = run_cli("run", "--sampler", "adm", "--schedule", "karras", "--rho", "5",
                     "--steps", "4", "--num-samples", "4", "-q", "-o", str(first))  # fmt: skip
    assert result.code == 0, result.err
    recipe = read_recipe(first)
    assert recipe["schedule"]["name"] == "karras" and recipe["schedule"]["options"] == {"rho": 5.0}
    assert recipe["evaluations"] == 4 and recipe["model"]["name"] == "adm-digits"
    again = tmp_path / "b.png"
    assert run_cli("run", "--recipe", str(first), "-q", "-o", str(again)).code == 0
    from PIL import Image

    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def test_the_one_head_control_is_adm_digits_less_its_eps_branch():
    """`adm-digits-onehead`, the two-head ablation's control (docs/claims.md): the same
    network and recipe but the c branch alone, predicting x0; never the sampler's default."""
    registry = default_registry()
    two, _ = load_model(registry, "adm-digits")
    one, _ = load_model(registry, "adm-digits-onehead")
    assert one.prediction == "x0" and one.process.name == "decoupled"
    assert {f.name: getattr(one.config, f.name) for f in dataclasses.fields(one.config)} == {
        f.name: getattr(two.config, f.name) for f in dataclasses.fields(two.config)
    } | {"prediction": "x0"}
    assert set(one.state_dict()) == {k for k in two.state_dict() if "_eps" not in k}
    # docs/models.md and docs/adm.md: 1.22M parameters against 1.85M
    assert round(sum(p.numel() for p in one.parameters()) / 1e6, 2) == 1.22
    assert round(sum(p.numel() for p in two.parameters()) / 1e6, 2) == 1.85


@pytest.mark.slow
def test_the_one_head_control_draws_digits():
    model, _ = load_model(default_registry(), "adm-digits-onehead")
    report = evaluate.evaluate(sample(model, ADM(), steps=10, seeds=range(300), batch_size=100))
    assert report["confidence"] > 0.8 and min(report["class_histogram"]) >= 0.03, report
    assert report["digits_fd"] < 4 * report["floor"], report
