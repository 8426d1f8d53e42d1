"""Exact resume: SIGINT or SIGTERM at a random moment lets the step in flight finish and saves
one consistent state; resuming gives the uninterrupted run bit for bit (in one process and
under a 2-process DDP run). A resume that would change the run is refused, naming what.

Nothing lost: a full disk mid-checkpoint, a SIGKILL mid-write, an interrupt right after
--resume each leave the last complete checkpoint named by `latest`, resumable; a new state is
durable before `latest` names it and before the old one goes; what a killed write left behind
is removed by the next run, and nothing else is."""

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
from coreonly import ENV as CORE_ENV
from safetensors.torch import load_file

from diffplug.atomic import TEMP_NAME
from diffplug.checkpoint import read_metadata

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


# -- nothing lost: disk full, a kill mid-write, an interrupt right after --resume ----------


def _small(out, steps=4):
    return ["train", "--method", "uniform-vp", "--steps", str(steps), "--batch-size", "8",
            "--widths", "8,8", "--checkpoint-every", "2", "-q", "--out", str(out)]  # fmt: skip


def _model_step(out):
    return read_metadata(out / "model.safetensors")["extra"]["step"]


def _errors(result):
    return [line for line in result.err.splitlines() if line.startswith("diffplug: error")]


def _disk_full_at(monkeypatch, module, attr, when):
    """Make ``module.attr`` (a safetensors save) raise ENOSPC for the file ``when`` picks."""
    import errno

    real = getattr(module, attr)

    def save(tensors, filename, *args, **kw):
        if when(str(filename)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kw)

    monkeypatch.setattr(module, attr, save)


def test_disk_full_mid_checkpoint_keeps_the_last_complete_one_and_resumes(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    _disk_full_at(monkeypatch, safetensors.torch, "save_file",
                  lambda f: f.endswith("00000004/optimizer.safetensors"))  # fmt: skip
    result = run_cli(*_small(out), env=CORE_ENV)
    assert_clean_error(
        result,
        f"no space left on device while writing {out}/state-00000004/optimizer.safetensors",
        f"the last complete checkpoint is step 2 at {out}/state-00000002",
    )
    assert len(_errors(result)) == 1
    assert (out / "latest").read_text() == "state-00000002"
    assert _model_step(out) == 2  # never newer than `latest`
    assert sorted(p.name for p in out.iterdir()) == ["latest", "model.safetensors",
                                                     "state-00000002"]  # fmt: skip
    monkeypatch.undo()
    resumed = run_cli(*_small(out, steps=6), "--resume", env=CORE_ENV)
    assert resumed.code == 0, resumed.err
    assert (out / "latest").read_text() == "state-00000006" and _model_step(out) == 6


def test_disk_full_writing_the_model_leaves_it_older_than_latest_and_resume_mends_it(
    tmp_path, monkeypatch
):
    import diffplug.checkpoint

    out = tmp_path / "run"
    calls = []
    _disk_full_at(monkeypatch, diffplug.checkpoint, "save_file",
                  lambda f: calls.append(f) or len(calls) == 2)  # the second model write  # fmt: skip
    result = run_cli(*_small(out), env=CORE_ENV)
    assert_clean_error(
        result,
        f"no space left on device while writing {out}/model.safetensors",
        f"the last complete checkpoint is step 4 at {out}/state-00000004",
    )
    assert (out / "latest").read_text() == "state-00000004"
    assert _model_step(out) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.undo()
    resumed = run_cli(*_small(out), "--resume", env=CORE_ENV)  # no step left: the model is mended
    assert resumed.code == 0, resumed.err
    assert _model_step(out) == 4
    assert sorted(p.name for p in out.iterdir()) == ["latest", "model.safetensors",
                                                     "state-00000004"]  # fmt: skip


def test_a_new_state_is_durable_before_latest_names_it_and_before_the_old_one_goes(
    tmp_path, monkeypatch
):
    """The order of operations, observed: every file of the new state fsynced, its folder
    renamed into place and the output folder fsynced, then `latest` replaced and fsynced, then
    the model, and only then the older state removed."""
    out = tmp_path / "run"
    assert run_cli(*_small(out, steps=2), env=CORE_ENV).code == 0
    events = []
    real = {"fsync": os.fsync, "rename": os.rename, "replace": os.replace}

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def rename(src, dst, *a, **kw):
        events.append(("rename", str(src), str(dst)))
        return real["rename"](src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        events.append(("replace", str(src), str(dst)))
        return real["replace"](src, dst, *a, **kw)

    import shutil

    rmtree = shutil.rmtree
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (events.append(("rmtree", str(p))),
                                                              rmtree(p, *a, **k)))  # fmt: skip
    assert run_cli(*_small(out, steps=4), "--resume", env=CORE_ENV).code == 0
    monkeypatch.undo()

    def at(*event):
        return events.index(event)

    tmp, new = str(out / ".tmp-state-00000004"), str(out / "state-00000004")
    moved = at("rename", tmp, new)
    for name in ("rng-0.safetensors", "raw.safetensors", "ema.safetensors",
                 "optimizer.safetensors", "state.json"):  # fmt: skip
        assert at("fsync", f"{tmp}/{name}") < moved, name
    assert at("fsync", tmp) < moved
    latest = next(
        i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out / "latest")
    )
    assert moved < events.index(("fsync", str(out)), moved) < latest
    model = next(i for i, e in enumerate(events)
                 if e[0] == "replace" and e[2] == str(out / "model.safetensors"))  # fmt: skip
    assert latest < events.index(("fsync", str(out)), latest) < model
    assert model < at("rmtree", str(out / "state-00000002"))


def test_an_interrupt_right_after_resume_keeps_the_only_checkpoint(tmp_path, monkeypatch):
    """A signal that lands as the resumed loop begins saves nothing and deletes nothing."""
    import signal as signals

    from diffplug import training

    out = tmp_path / "run"
    assert run_cli(*_small(out, steps=2), env=CORE_ENV).code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    enter = training._Signals.__enter__

    def caught_at_once(self):
        enter(self)
        self.caught = signals.SIGINT
        return self

    monkeypatch.setattr(training._Signals, "__enter__", caught_at_once)
    result = run_cli(*_small(out, steps=8), "--resume", env=CORE_ENV)
    assert result.code == 130, result.err
    assert "interrupted; checkpoint at step 2" in result.err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert run_cli(*_small(out), "--resume", env=CORE_ENV).code == 0


KILL_DURING = """import os, signal, sys
import safetensors.torch as st
real = st.save_file
def save(tensors, filename, *a, **kw):
    if str(filename).endswith(sys.argv[1]):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, filename, *a, **kw)
st.save_file = save
from diffplug.cli import main
main(sys.argv[2:])
"""
KILL_IN_ATOMIC = """import os, signal, sys
from diffplug.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(script, *args):
    env = {**ENV, **CORE_ENV, "PYTHONPATH": str(Path(__file__).parent / "fixtures")}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def test_what_a_killed_checkpoint_write_leaves_is_removed_by_the_next_run(tmp_path):
    """SIGKILL (no handler runs) in the middle of writing the step-4 state, then in the middle
    of an atomic write of model.safetensors: the resumed run removes both leftovers, says so
    in one line, and leaves every other file alone."""
    out = tmp_path / "run"
    _killed(KILL_DURING, "00000004/optimizer.safetensors", *_small(out))
    _killed(KILL_IN_ATOMIC, str(out / "model.safetensors"))
    assert (out / "latest").read_text() == "state-00000002"
    assert (out / ".tmp-state-00000004" / "optimizer.safetensors").read_bytes() == b"half a file"
    [temp] = [p.name for p in out.iterdir() if TEMP_NAME.match(p.name)]
    host = TEMP_NAME.match(temp)["host"]
    keep = {  # a user's files, another target's leftover, a live writer's, another host's
        "notes.tmp": b"mine",
        ".tmp-state-mine": b"mine",
        f".samples.png.diffplug-{host}-{TEMP_NAME.match(temp)['pid']}-abcdefgh.tmp": b"other",
        f".model.safetensors.diffplug-{host}-{os.getpid()}-abcdefgh.tmp": b"live",
        f".model.safetensors.diffplug-00000000-{TEMP_NAME.match(temp)['pid']}-abcdefgh.tmp": b"x",
    }
    for name, data in keep.items():
        (out / name).write_bytes(data)
    result = run_cli(*_small(out), "--resume", env=CORE_ENV)
    assert result.code == 0, result.err
    [line] = [line for line in result.err.splitlines() if "stale temporary" in line]
    assert ".tmp-state-00000004/" in line and temp in line
    assert not (out / ".tmp-state-00000004").exists() and not (out / temp).exists()
    assert {n: (out / n).read_bytes() for n in keep} == keep
    assert (out / "latest").read_text() == "state-00000004" and _model_step(out) == 4


@pytest.mark.parametrize("resumed", [True, False])
def test_a_second_interrupt_during_the_interrupt_save_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, resumed
):
    """Ctrl-C, then Ctrl-C again while that checkpoint is being written: the write stops, its
    partial state is removed at once, `latest` still names the last complete state, the one
    line says which step that is, and --resume continues from it."""
    import signal as signals

    from diffplug import training

    out = tmp_path / "run"
    if resumed:
        assert run_cli(*_small(out, steps=2), env=CORE_ENV).code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    active, step = [], training.Trainer.train_step
    enter = training._Signals.__enter__

    def remembered(self):
        active.append(self)
        return enter(self)

    def first_ctrl_c_after_a_step(self):
        loss = step(self)
        active[0].caught = signals.SIGINT  # the first Ctrl-C, during this step
        return loss

    def second_ctrl_c_mid_write(self, out, state_dir, tmp_dir, extra):
        tmp_dir.mkdir(parents=True, exist_ok=True)
        (tmp_dir / "raw.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(training._Signals, "__enter__", remembered)
    monkeypatch.setattr(training.Trainer, "train_step", first_ctrl_c_after_a_step)
    monkeypatch.setattr(training.Trainer, "_write_state", second_ctrl_c_mid_write)
    result = run_cli(*_small(out, steps=8), *(["--resume"] if resumed else []), env=CORE_ENV)
    assert result.code == 130, result.err
    assert "Traceback" not in result.err
    saving = 3 if resumed else 1
    [line] = [line for line in result.err.splitlines() if "interrupted" in line]
    if resumed:
        assert line == (f"diffplug: interrupted again while saving step {saving}; {out} keeps "
                        "its checkpoint at step 2 (continue with --resume)")  # fmt: skip
    else:
        assert line == f"diffplug: interrupted again while saving step {saving}; nothing was saved"
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing partial left, nothing complete lost
    monkeypatch.undo()
    if resumed:
        assert run_cli(*_small(out), "--resume", env=CORE_ENV).code == 0
        assert _model_step(out) == 4
