"""GPU sampling: throughput eager / torch.compile / CUDA graphs, and no host sync per step.

Needs a CUDA device; on a machine without one it writes a section saying so. The sync check
runs the loop under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
synchronising call (``.item()``, ``bool(tensor)``, indexing a CPU schedule with a GPU
tensor...). The NaN check is off inside it: that check is one deliberate sync per batch,
after the last step.
"""

from __future__ import annotations

import time

import torch

import diffplug
from benchmarks.common import table, write_section
from diffplug.sampling import sample

BATCH, STEPS = 256, 50


def _throughput(model, scheduler, repeats: int = 5) -> float:
    def once() -> None:
        sample(model, scheduler, steps=STEPS, seeds=range(BATCH), device="cuda")
        torch.cuda.synchronize()

    once()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return BATCH * repeats / (time.perf_counter() - start)


def run() -> str:
    if not torch.cuda.is_available():
        return """## GPU sampling

Not measured: no GPU was lent to the sessions that ran these benchmarks. On a CUDA machine,
`uv run python benchmarks/run.py gpu` fills this section (throughput eager, with
`torch.compile`, with CUDA graphs, and the no-sync-per-step check)."""
    run = diffplug.load(sampler="ddim", model="ddpm-digits", device="cuda")
    scheduler, model, name = run.scheduler, run.denoiser, run.model_name
    rows = [["eager", f"{_throughput(model, scheduler):.0f}"]]
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(model, scheduler, steps=STEPS, seeds=range(BATCH), device="cuda",
               check_finite=False)  # fmt: skip
        sync_free = "yes: the loop ran under set_sync_debug_mode('error')"
    except RuntimeError as exc:
        sync_free = f"NO: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    forward = model.forward
    model.forward = torch.compile(forward)
    rows.append(["torch.compile", f"{_throughput(model, scheduler):.0f}"])
    model.forward = torch.compile(forward, mode="reduce-overhead")  # CUDA graphs
    rows.append(["torch.compile(mode='reduce-overhead') (CUDA graphs)",
                 f"{_throughput(model, scheduler):.0f}"])  # fmt: skip
    model.forward = forward
    device = torch.cuda.get_device_name()
    return f"""## GPU sampling

`{name}`, DDIM {STEPS} steps, batch {BATCH}, {device}, torch {torch.__version__}.

{table(["denoiser", "samples/s"], rows)}

No host-device sync per step: {sync_free}.
"""


if __name__ == "__main__":
    write_section("gpu", run())
