"""torchrun: sampling shards batches across processes and gives the single-process output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
#: torchrun's processes and training subprocesses: one xdist worker runs them in turn, so
#: they never share the two cores with each other
pytestmark = pytest.mark.xdist_group("torchrun")


@pytest.mark.slow
def test_torchrun_sampling_is_bit_identical_to_one_process(tmp_path):
    """Two processes at torchrun's default threads (1 each) write the bytes one process at
    its default threads (2 here) writes, at another batch size: the loop's fixed-size chunks
    make a sample's numbers independent of threads, batch and shard."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # defaults
    args = ["run", "--sampler", "ddpm", "--num-samples", "11", "--steps", "10", "--seed", "5",
            "-q"]  # fmt: skip
    dist = subprocess.run(
        [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29517", "-m", "diffplug", *args,
         "--batch-size", "3", "-o", str(tmp_path / "dist.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert dist.returncode == 0, dist.stderr
    single = subprocess.run(
        [sys.executable, "-m", "diffplug", *args, "--batch-size", "11",
         "-o", str(tmp_path / "one.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    assert (tmp_path / "dist.safetensors").read_bytes() == (
        tmp_path / "one.safetensors"
    ).read_bytes()
    assert dist.stderr.count("wrote 11 samples") == 1  # rank 0 writes, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.safetensors", "one.safetensors"]


def test_batches_are_sharded_whole_and_gathered_in_order():
    import torch

    from diffplug import distributed

    seeds = list(range(100, 111))
    shards = [distributed.shard(seeds, 3, r, 2) for r in range(2)]
    assert shards == [[100, 101, 102, 106, 107, 108], [103, 104, 105, 109, 110]]
    assert distributed.gather(torch.arange(4.0), 4, 3, 0, 1).tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_ddp_training_resumes_exactly_and_rank0_checkpoints(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29519", "-m", "diffplug", "train",
            "--method", "ddpm", "--steps", "6", "--batch-size", "8", "--width", "8", "--heads", "2",
            "--checkpoint-every", "3", "-q"]  # fmt: skip

    def train(*extra):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    whole = train("--out", str(tmp_path / "whole"))
    assert whole.stderr.count("diffplug: done") == 1  # rank 0 speaks
    train("--out", str(tmp_path / "split"), "--stop-after", "3")
    train("--out", str(tmp_path / "split"), "--resume")
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch_equal(a[k], b[k]) for k in a)
    state = tmp_path / "split" / "state-00000006"
    assert sorted(p.name for p in state.iterdir()) == [
        "ema.safetensors", "optimizer.safetensors", "raw.safetensors",
        "rng-0.safetensors", "rng-1.safetensors", "state.json",
    ]  # fmt: skip


def torch_equal(x, y):
    import torch

    return torch.equal(x, y)


DISK_FULL_ON_RANK = """import errno, os, sys
import safetensors.torch as st
real = st.save_file
def save(tensors, filename, *a, **kw):
    if os.environ["RANK"] == sys.argv[1] and str(filename).endswith(sys.argv[2]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(tensors, filename, *a, **kw)
st.save_file = save
from diffplug.cli import main
main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank, file", [("0", "00000006/raw.safetensors"), ("1", "00000006/rng-1.safetensors")]
)
def test_ddp_a_checkpoint_write_failing_on_one_rank_stops_every_rank_cleanly(tmp_path, rank, file):
    """Disk full on one rank mid-checkpoint: every rank stops with one line (none is left
    waiting at a barrier), the partial state goes, the step-3 checkpoint stands."""
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_ON_RANK)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29521", str(script), rank, file,
         "train", "--method", "ddpm", "--steps", "6", "--batch-size", "8", "--width", "8",
         "--heads", "2", "--checkpoint-every", "3", "-q", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("diffplug: error:")]
    standing = f"the last complete checkpoint is step 3 at {out}/state-00000003"
    assert len(errors) == 2 and all(standing in line for line in errors), proc.stderr
    assert any(f"no space left on device while writing {out}/state-{file}" in e for e in errors)
    assert any("another process could not write the checkpoint" in e for e in errors)
    ours = proc.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report follows
    # each rank exits 2 (torchrun may stop the second with SIGTERM once the first is out)
    assert "Traceback" not in ours and "exitcode  : 2" in proc.stderr, proc.stderr
    assert "exitcode  : 1" not in proc.stderr, proc.stderr
    assert (out / "latest").read_text() == "state-00000003"
    assert sorted(p.name for p in out.iterdir()) == ["latest", "model.safetensors",
                                                     "state-00000003"]  # fmt: skip
