"""A checkpoint is checked against its config before anything is allocated: a 3 MB file whose
config claims width 1024 (3 GB of weights) is refused at the memory of a genuine run; weights
of the wrong kind of dtype and non-integer sizes are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffplug import CheckpointError, OptionError, load_component, save_component
from diffplug.registry import default_registry
from diffplug.testing import fresh_registry

PEAK = """import resource, sys
from diffplug.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    sys.stderr.write(f"rc={exc.code}\\n")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _rewrite(src, dst, config=None, tensors=None):
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
    if config:
        meta["diffplug.config"] = json.dumps({**json.loads(meta["diffplug.config"]), **config})
    state = load_file(str(src))
    state.update(tensors(state) if tensors else {})
    save_file(state, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def genuine():
    return default_registry().get("pretrained", "ddpm-digits").load()


def _peak_kib(model, out):
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, "run", "--sampler", "ddim", "--model", str(model),
         "--steps", "2", "--num-samples", "2", "-q", "-o", str(out), "--overwrite"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return int(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_a_hostile_config_is_refused_at_the_memory_of_a_genuine_run(tmp_path, genuine):
    hostile = _rewrite(genuine, tmp_path / "hostile.safetensors", config={"width": 1024})
    assert hostile.stat().st_size < 4 * 1024 * 1024
    with pytest.raises(CheckpointError, match="weights do not match the config"):
        load_component(hostile)
    ok_peak, ok_err = _peak_kib(genuine, tmp_path / "a.png")
    bad_peak, bad_err = _peak_kib(hostile, tmp_path / "b.png")
    assert "rc=0" in ok_err and "rc=2" in bad_err, (ok_err, bad_err)
    assert "weights do not match the config" in bad_err
    assert bad_peak < 1.5 * ok_peak, (bad_peak, ok_peak)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_of_the_wrong_kind_of_dtype_are_refused(tmp_path, genuine, dtype):
    def cast(state):
        name = sorted(state)[0]
        return {name: state[name].to(dtype)}

    bad = _rewrite(genuine, tmp_path / "int.safetensors", tensors=cast)
    with pytest.raises(CheckpointError, match="wrong kind of dtype"):
        load_component(bad)


def test_half_precision_weights_still_load(tmp_path, genuine):
    half = _rewrite(genuine, tmp_path / "half.safetensors",
                    tensors=lambda s: {k: v.half() for k, v in s.items()})  # fmt: skip
    model = load_component(half)
    assert next(model.parameters()).dtype == torch.float32


def test_a_fractional_size_is_refused_not_truncated(tmp_path, genuine):
    bad = _rewrite(genuine, tmp_path / "frac.safetensors", config={"width": 32.7})
    with pytest.raises(OptionError, match="--width expects int, got 32.7"):
        load_component(bad)
    whole = _rewrite(genuine, tmp_path / "whole.safetensors", config={"width": 32.0})
    assert load_component(whole).config.width == 32


def test_a_component_the_meta_device_cannot_build_is_checked_after_building(tmp_path):
    import fixture_meta_unfriendly as plugin

    registry = fresh_registry(plugin)
    cls = registry.load("denoiser", "meta-unfriendly")
    model = cls(cls.Config(channels=1, size=4))
    path = tmp_path / "m.safetensors"
    save_component(model, path, kind="denoiser", registry=registry)
    back = load_component(path, registry=registry)
    assert back.total == 3.0
    wrong = _rewrite(path, tmp_path / "wrong.safetensors",
                     tensors=lambda s: {"w": torch.ones(5)})  # fmt: skip
    with pytest.raises(CheckpointError, match="weights do not match the config"):
        load_component(wrong, registry=registry)
