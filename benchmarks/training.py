"""Training throughput: diffplug's loop against a minimal hand-written PyTorch loop.

Same UNet, same batch, same data, same optimizer; the hand-written loop has no EMA, no
clipping, no warm-up and no progress bar, so the ratio is the whole cost of the loop's
features. Runs interleaved, median of several windows.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import machine, table, write_section
from diffplug.data import digits
from diffplug.training import TrainConfig, Trainer
from diffplug_ddpm.method import DDPMMethod
from diffplug_ddpm.unet import UNet, UNetConfig

BATCH, STEPS, WINDOWS = 128, 40, 5


def hand_written(model: UNet, images: torch.Tensor, steps: int) -> float:
    """The minimal DDPM loop a user would write by hand."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    abar = model.process.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (BATCH,), generator=g)]
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = (model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss.item()
    return BATCH * steps / (time.perf_counter() - start)


def ours(model: UNet, steps: int) -> float:
    trainer = Trainer(model, DDPMMethod(), digits("train", 8), TrainConfig(batch_size=BATCH))
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step()
    loss.item()
    return BATCH * steps / (time.perf_counter() - start)


def run() -> str:
    torch.manual_seed(0)
    images = digits("train", 8).images
    hand, mine = [], []
    for _ in range(WINDOWS):
        hand.append(hand_written(UNet(UNetConfig()), images, STEPS))
        mine.append(ours(UNet(UNetConfig()), STEPS))
    h, m = statistics.median(hand), statistics.median(mine)
    params = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    from diffplug.checkpoint import read_metadata
    from diffplug.registry import default_registry

    shipped = []
    for entry in default_registry().entries("pretrained"):
        extra = read_metadata(entry.load())["extra"]
        if "train" in extra:
            steps, batch = extra["step"], extra["train"]["batch_size"]
            minutes = steps * batch / m / 60
            shipped.append([entry.name, steps, batch, f"{minutes:.0f} min"])
    body = f"""## Training throughput

The default digits UNet ({params / 1e6:.2f}M parameters, 8x8), batch {BATCH}, {STEPS}-step
windows, median of {WINDOWS}, interleaved; {machine()}.

{table(["loop", "images/s", "ratio"], [["hand-written PyTorch (no EMA, no clipping)", f"{h:.0f}", "1.00"], ["diffplug `Trainer` (EMA, clipping, warm-up)", f"{m:.0f}", f"{m / h:.3f}"]])}

Time to train each shipped model at this throughput (steps x batch / images per second):

{table(["model", "steps", "batch", "time"], shipped)}
"""
    return body


if __name__ == "__main__":
    write_section("training", run())
