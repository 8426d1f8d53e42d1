"""Settings for every test of the workspace."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each worker's torch, and every process it starts
    # (CLI subprocesses, torchrun), on one thread keeps the cores from being oversubscribed
    # (2 workers x 2 threads on 2 cores spent much of the suite waiting at OpenMP barriers).
    # Tests about thread counts set their own (``diffplug.testing.torch_threads``).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
