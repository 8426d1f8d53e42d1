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
from diffplug.options import build_config
from diffplug.training import TrainConfig, Trainer
from diffplug_ddpm.method import DDPMMethod
from diffplug_ddpm.unet import UNet, UNetConfig

BATCH, STEPS, WINDOWS = 128, 40, 5


def hand_written(model: UNet, images: torch.Tensor, steps: int, fused: bool = False) -> float:
    """The minimal DDPM loop a user would write by hand."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
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


def _shipped_rate(registry, meta: dict, batch: int) -> float:
    """Trainer images/s for a fresh copy of a shipped model's architecture and method."""
    method_cfg = dict(meta["extra"]["method"])
    method = registry.load("method", method_cfg.pop("name")).from_options(**method_cfg)
    model = registry.load("denoiser", meta["name"])(
        build_config(registry.load("denoiser", meta["name"]).Config, meta["config"], owner="bench")
    )
    size = meta["extra"]["data"]["size"]
    trainer = Trainer(model, method, digits("train", size), TrainConfig(batch_size=batch))
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(STEPS // 2):
            loss = trainer.train_step()
        loss.item()
        rates.append(batch * (STEPS // 2) / (time.perf_counter() - start))
    return statistics.median(rates)


def run() -> str:
    torch.manual_seed(0)
    images = digits("train", 8).images
    hand, fused, mine = [], [], []
    for _ in range(WINDOWS):
        hand.append(hand_written(UNet(UNetConfig()), images, STEPS))
        fused.append(hand_written(UNet(UNetConfig()), images, STEPS, fused=True))
        mine.append(ours(UNet(UNetConfig()), STEPS))
    h, f, m = statistics.median(hand), statistics.median(fused), statistics.median(mine)
    params = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    from diffplug.checkpoint import read_metadata
    from diffplug.registry import default_registry

    shipped = []
    registry = default_registry()
    for entry in registry.entries("pretrained"):
        meta = read_metadata(entry.load())
        extra = meta["extra"]
        if "train" not in extra:
            continue
        steps, batch = extra["step"], extra["train"]["batch_size"]
        rate = _shipped_rate(registry, meta, batch)
        minutes = steps * batch / rate / 60
        shipped.append([entry.name, steps, batch, f"{rate:.0f}", f"{minutes:.0f} min"])
    body = f"""## Training throughput

The default digits UNet ({params / 1e6:.2f}M parameters, 8x8), batch {BATCH}, {STEPS}-step
windows, median of {WINDOWS}, interleaved; {machine()}.

{
        table(
            ["loop", "images/s", "ratio"],
            [
                ["hand-written PyTorch (no EMA, no clipping), default AdamW", f"{h:.0f}", "1.00"],
                ["the same with AdamW(fused=True)", f"{f:.0f}", f"{f / h:.3f}"],
                [
                    "diffplug `Trainer` (EMA, clipping, warm-up; fused AdamW)",
                    f"{m:.0f}",
                    f"{m / h:.3f}",
                ],
            ],
        )
    }

The Trainer's cost over the fused hand-written loop (EMA, clipping, bookkeeping):
{(1 - m / f) * 100:.1f}%.

Time to train each shipped model: its own architecture and method, measured here like the
row above (images per second), times its steps x batch:

{table(["model", "steps", "batch", "images/s", "time"], shipped)}
"""
    return body


if __name__ == "__main__":
    write_section("training", run())
