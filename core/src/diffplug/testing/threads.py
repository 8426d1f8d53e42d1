"""Run a block with a fixed number of torch threads (restored afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Tests on tiny tensors (oracles, schedules) want one thread: on a busy machine intra-op
    threads only add synchronisation, which can make a (4, 8) softmax 1000x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
