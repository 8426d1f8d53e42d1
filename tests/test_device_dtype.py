"""--dtype and --device: half precision runs and stays near float32 on the CPU; a device or
dtype that is not there is exit 2 with one line, never an internal error."""

from __future__ import annotations

import pytest
import torch
from cliutil import assert_clean_error, run_cli

import diffplug
from diffplug.run import resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def reference():
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=10)
    return run.sample(16, seed=0, progress=False).tensor


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_on_the_cpu_near_float32(reference, dtype):
    """Both run here (float16 convolutions exist on the CPU in this torch); bfloat16's 8-bit
    mantissa leaves more error than float16's 11."""
    run = diffplug.load(sampler="ddim", model="ddpm-digits", steps=10, dtype=dtype)
    assert next(run.denoiser.parameters()).dtype == getattr(torch, dtype)
    out = run.sample(16, seed=0, progress=False)
    assert out.tensor.dtype == torch.float32 and out.recipe["dtype"] == dtype
    error = (out.tensor - reference).abs()
    assert float(error.mean()) < (0.03 if dtype == "bfloat16" else 0.01)
    assert float(error.max()) < 0.5


def test_a_half_precision_run_replays_in_its_dtype(tmp_path):
    out = tmp_path / "b.png"
    first = run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", "--steps", "3",
                    "--num-samples", "2", "--dtype", "bfloat16", "-o", str(out))  # fmt: skip
    assert first.code == 0, first.err
    assert diffplug.load(recipe=out).dtype == torch.bfloat16


def test_an_unknown_dtype_is_one_line(tmp_path):
    result = run_cli("run", "--sampler", "ddim", "--dtype", "float8", "-o", str(tmp_path / "o.png"))
    assert_clean_error(result, "diffplug: error: unknown dtype 'float8'")
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_unavailable_device_is_one_line(tmp_path, device):
    available = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if available:
        pytest.skip(f"{device} is available here")
    result = run_cli("run", "--sampler", "ddim", "--device", device, "-o", str(tmp_path / "o.png"))
    assert_clean_error(result, f"diffplug: error: --device {device}: no ")
    assert len(result.err.strip().splitlines()) == 1
    with pytest.raises(diffplug.UserError):
        diffplug.load(sampler="ddim", model="ddpm-digits", device=device)


def test_auto_is_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_bfloat16_on_a_cuda_device_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(diffplug.UserError, match="no bfloat16; use float16"):
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert resolve_dtype(None) == torch.float32 == resolve_dtype("float32")
