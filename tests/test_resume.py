"""Exact resume: SIGINT or SIGTERM at a random moment lets the step in flight finish and saves
one consistent state; resuming gives the uninterrupted run bit for bit (in one process and
under a 2-process DDP run). A resume that would change the run is refused, naming what."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from safetensors.torch import load_file

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
#: torchrun's processes and training subprocesses: one xdist worker runs them in turn, so
#: they never share the two cores with each other
pytestmark = pytest.mark.xdist_group("torchrun")
TRAIN = ["train", "--method", "ddpm", "--steps", "400", "--batch-size", "8", "--width", "8",
         "--heads", "2", "--checkpoint-every", "100000", "--seed", "3"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(cmd, cwd, log):
    err = open(log, "w")  # noqa: SIM115 - closed by the caller
    # background jobs inherit SIGINT ignored; a terminal gives the default disposition
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    return proc, err


def _interrupt_when_training(proc, log, sig, delay):
    """Send ``sig`` ``delay`` seconds after the first step shows; False if it finished first."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if re.search(r"training: +\d+%.*\| [1-9]\d*/", Path(log).read_text()):
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            proc.send_signal(sig)
            return True
        time.sleep(0.05)
    return False


def _state(out):
    latest = (out / "latest").read_text().strip()
    tensors = {f"model.{k}": v for k, v in load_file(out / "model.safetensors").items()}
    for name in ("raw", "ema", "optimizer"):
        tensors |= {
            f"{name}.{k}": v for k, v in load_file(out / latest / f"{name}.safetensors").items()
        }
    return tensors


def _assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_interrupted_and_resumed_training_equals_the_uninterrupted_run(tmp_path):
    base = [sys.executable, "-m", "diffplug", *TRAIN]
    whole = subprocess.run([*base, "--out", "whole", "-q"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    rng = random.Random(7)
    interrupts, resume = 0, []
    for k, sig in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM]):
        log = tmp_path / f"log{k}.txt"
        proc, err = _launch([*base, "--out", "split", *resume], tmp_path, log)
        hit = _interrupt_when_training(proc, log, sig, rng.uniform(0.0, 0.6))
        code = proc.wait(timeout=120)
        err.close()
        text = log.read_text()
        assert "Traceback" not in text, text
        if not hit:
            assert code == 0, text
            break
        assert code == 130, text
        assert re.search(r"interrupted; checkpoint at step \d+", text), text
        assert "nothing partial was written" not in text
        interrupts += 1
        resume = ["--resume"]
    if resume:
        done = subprocess.run([*base, "--out", "split", "--resume", "-q"], cwd=tmp_path,
                              env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert interrupts >= 2  # the interrupts landed mid-run
    _assert_same(_state(tmp_path / "whole"), _state(tmp_path / "split"))
    assert not list((tmp_path / "split").glob(".tmp-*"))


@pytest.mark.slow
def test_ddp_interrupted_by_sigterm_checkpoints_every_rank_and_resumes_exactly(tmp_path):
    base = [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29523", "-m", "diffplug",
            *TRAIN]  # fmt: skip
    whole = subprocess.run([*base, "--out", "whole", "-q"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    log = tmp_path / "log.txt"
    proc, err = _launch([*base, "--out", "split"], tmp_path, log)
    assert _interrupt_when_training(proc, log, signal.SIGTERM, 0.3)
    proc.wait(timeout=120)
    err.close()
    text = log.read_text()
    assert re.search(r"interrupted; checkpoint at step \d+", text), text
    latest = (tmp_path / "split" / "latest").read_text().strip()
    assert sorted(p.name for p in (tmp_path / "split" / latest).glob("rng-*")) == [
        "rng-0.safetensors", "rng-1.safetensors"]  # fmt: skip
    done = subprocess.run([*base, "--out", "split", "--resume", "-q"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    _assert_same(_state(tmp_path / "whole"), _state(tmp_path / "split"))


def test_a_resume_that_would_change_the_run_is_refused_by_name(tmp_path):
    out = str(tmp_path / "run")
    small = ["train", "--method", "ddpm", "--steps", "4", "--batch-size", "8", "--width", "8",
             "--heads", "2", "-q", "--out", out]  # fmt: skip
    assert run_cli(*small).code == 0
    for flag, value, needle in (("--batch-size", "16", "--batch-size 16 (the run has 8)"),
                                ("--seed", "5", "--seed 5 (the run has 0)"),
                                ("--width", "16", "model width 16 (the run has 8)")):  # fmt: skip
        args = list(small)
        i = args.index(flag) if flag in args else None
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
        result = run_cli(*args, "--resume")
        assert_clean_error(result, "--resume would change the run", needle)
        assert sum(line.startswith("diffplug: error") for line in result.err.splitlines()) == 1
    longer = [a if a != "4" else "6" for a in small]
    assert run_cli(*longer, "--resume").code == 0  # more steps: allowed
