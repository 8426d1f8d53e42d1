"""A model's recorded thresholding (``extra["threshold"]``, chosen by docs/claims.md's
measurement) is what ``run``, ``diffplug.load`` and the Imagen cascade use when none is given;
a given ``--threshold`` still wins."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from cliutil import run_cli

import diffplug
from diffplug.checkpoint import read_metadata
from diffplug.output import read_recipe
from diffplug.pipeline import StageSpec, run_stage
from diffplug.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a handwritten seven"


def _record_threshold():
    spec = importlib.util.spec_from_file_location("record", ROOT / "scripts/record_threshold.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _shipped(name: str) -> str:
    return default_registry().get("pretrained", name).load()


@pytest.fixture
def static_model(tmp_path):
    """imagen-digits-base with ``static`` recorded (tensors unchanged)."""
    path = tmp_path / "static.safetensors"
    shutil.copy(_shipped("imagen-digits-base"), path)
    _record_threshold()(str(path), "static")
    return path


#: what docs/claims.md measured best for each shipped cascade model
MEASURED = {
    "imagen-digits-base": ("dynamic", 0.95),
    "imagen-emoji-base": ("none", 0.995),
    "imagen-digits-sr": ("none", 0.995),
    "imagen-digits-sr-noaug": ("none", 0.995),
    "imagen-emoji-sr": ("none", 0.995),
}


@pytest.mark.parametrize("name", list(MEASURED))
def test_the_shipped_cascade_models_record_the_measured_threshold(name):
    recorded = read_metadata(_shipped(name))["extra"]["threshold"]
    assert (recorded["kind"], recorded["percentile"]) == MEASURED[name]
    run = diffplug.load(model=name, sampler="ddim", steps=2)
    assert (run.threshold, run.percentile) == (recorded["kind"], recorded["percentile"])


def test_recording_keeps_every_tensor(static_model):
    original = diffplug.load_tensors(_shipped("imagen-digits-base"))
    recorded = diffplug.load_tensors(static_model)
    assert original.keys() == recorded.keys()
    assert all(torch.equal(original[k], recorded[k]) for k in original)
    assert read_metadata(static_model)["extra"]["threshold"] == {"kind": "static",
                                                                  "percentile": 0.995}  # fmt: skip


def test_run_uses_the_recorded_threshold_and_a_given_one_wins(static_model):
    default = diffplug.load(model=str(static_model), sampler="ddim", steps=4, guidance=8)
    assert default.threshold == "static"
    explicit = diffplug.load(model=str(static_model), sampler="ddim", steps=4, guidance=8,
                             threshold="static")  # fmt: skip
    off = diffplug.load(model=str(static_model), sampler="ddim", steps=4, guidance=8,
                        threshold="none")  # fmt: skip
    assert off.threshold == "none"
    images = [r.sample(prompt=[PROMPT] * 4, seed=0).tensor for r in (default, explicit, off)]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], images[2])  # guidance 8 leaves [-1, 1] without clipping


def test_the_cli_records_the_threshold_it_used(static_model, tmp_path):
    out = tmp_path / "x.safetensors"
    result = run_cli("run", "--model", str(static_model), "--sampler", "ddim", "--steps", "2",
                     "--prompt", PROMPT, "--num-samples", "2", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    assert read_recipe(out)["threshold"] == "static"


def test_a_cascade_stage_uses_its_models_recorded_threshold(static_model):
    from diffplug_imagen.cascade import Cascade, CascadeConfig, EmojiCascadeConfig

    assert CascadeConfig().threshold == EmojiCascadeConfig().threshold == "recorded"
    cascade = Cascade(CascadeConfig(base_model=str(static_model), base_steps=2, sr_models=[]))
    (base,) = cascade.run(prompts=[PROMPT] * 2, seeds=[0, 1], batch_size=2,
                          device=torch.device("cpu"))  # fmt: skip
    assert base.recipe["threshold"] == "static"
    spec = StageSpec(str(static_model), "ddim", 2, 3.0, threshold="dynamic")
    given = run_stage(spec, seeds=[0], conditions=[PROMPT], batch_size=1,
                      device=torch.device("cpu"))  # fmt: skip
    assert given.recipe["threshold"] == "dynamic"


def test_a_super_resolution_stage_uses_its_models_recorded_threshold(tmp_path):
    from diffplug_imagen.cascade import Cascade, CascadeConfig

    sr = tmp_path / "sr-static.safetensors"
    shutil.copy(_shipped("imagen-digits-sr"), sr)
    _record_threshold()(str(sr), "static")
    assert CascadeConfig().sr_threshold == ["recorded"]
    for given, expected in ((["recorded"], "static"), (["none"], "none")):
        cfg = CascadeConfig(base_steps=2, sr_models=[str(sr)], sr_steps=[2], sr_threshold=given)
        stages = Cascade(cfg).run(prompts=[PROMPT], seeds=[0], batch_size=1,
                                  device=torch.device("cpu"))  # fmt: skip
        assert stages[1].recipe["threshold"] == expected
