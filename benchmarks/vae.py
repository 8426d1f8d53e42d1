"""The shipped digits VAE's reconstructions of the 300 held-out digits (never trained on)."""

from __future__ import annotations

import torch

from benchmarks.common import machine, table
from diffplug.data import digits
from diffplug.evaluate import classify, evaluate
from diffplug.latent import load_autoencoder


def run() -> str:
    vae = load_autoencoder("vae-digits")
    real = digits("heldout", 32)
    with torch.no_grad():
        rec = vae.decode(vae.encode(real.images)).clamp(-1, 1)
    acc = (classify(rec) == real.labels).float().mean()
    acc_real = (classify(real.images) == real.labels).float().mean()
    report = evaluate(rec)
    rows = [
        [
            "reconstruction MSE (per pixel, images in [-1, 1])",
            f"{float((rec - real.images).pow(2).mean()):.5f}",
        ],
        [
            "classifier accuracy on the reconstructions",
            f"{100 * acc:.1f}% (originals: {100 * acc_real:.1f}%)",
        ],
        [
            f"digits FD of the reconstructions (floor {report['floor']:.1f})",
            f"{report['digits_fd']:.1f}",
        ],
        ["scaling_factor", f"{vae.config.scaling_factor:.3f}"],
    ]
    return f"### vae-digits ({machine()})\n\n" + table(["measure", "value"], rows)


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("vae", run())
