"""Text to digits in a VAE's latents (`imagen-latent-digits`): guidance against fidelity.

500 samples per row (50 per digit, "a handwritten <digit>"), 50 steps, decoded by the recorded
autoencoder and scored on the 32x32 images: digits FD against real digits through the same
resizes, the share the classifier reads as the prompted digit, and memorisation.
"""

from __future__ import annotations

import torch

from benchmarks.common import machine, table
from diffplug.conditioners import recorded_conditioner
from diffplug.evaluate import evaluate, load_classifier, to_digits
from diffplug.latent import recorded_autoencoder
from diffplug.registry import default_registry
from diffplug.resolve import build_scheduler, load_model
from diffplug.sampling import sample
from diffplug.testing.matrix import conditions_for

MODEL, N, STEPS = "imagen-latent-digits", 500, 50
ROWS = [("ddim", 1.0), ("ddim", 2.0), ("ddim", 3.0), ("ddpm", 2.0)]


def run() -> str:
    registry = default_registry()
    denoiser, _ = load_model(registry, MODEL)
    conditioner = recorded_conditioner(denoiser, registry)
    autoencoder = recorded_autoencoder(denoiser, registry)
    recorded = denoiser.checkpoint_extra.get("guidance")
    prompts, labels = conditions_for(conditioner, N)
    rows, floor, held = [], None, None
    for sampler, guidance in ROWS:
        images = sample(denoiser, build_scheduler(registry, sampler, {}), steps=STEPS,
                        seeds=list(range(N)), conditioner=conditioner, conditions=prompts,
                        guidance=guidance, autoencoder=autoencoder, batch_size=250)  # fmt: skip
        scores = evaluate(images)
        floor, held = scores["floor"], scores["heldout_share"]
        with torch.no_grad():
            hits = load_classifier()(to_digits(images)).argmax(1) == labels
        mark = " (recorded)" if guidance == recorded else ""
        rows.append([sampler, f"{guidance:g}{mark}", f"{scores['digits_fd']:.2f}",
                     f"{100 * float(hits.float().mean()):.1f}%",
                     f"{100 * scores['memorised_share']:.1f}%",
                     f"{scores['detail_ratio']:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    return "\n\n".join([
        f"### Text to digits in latents: `{MODEL}` ({machine()})",
        f"{N} samples per row (50 per digit, \"a handwritten <digit>\"), {STEPS} steps, decoded "
        f"by `vae-digits`; digits FD floor {floor:.2f} at {N} samples; memorised: share nearer a "
        f"training digit than the held-out digits' 10% quantile (held-out: {100 * held:.0f}%); "
        "detail: full-resolution detail over real digits'.",
        table(["sampler", "guidance", "digits FD", "prompted digit", "memorised", "detail"],
              rows),  # fmt: skip
    ])  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("latent", run())
