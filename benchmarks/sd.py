"""An SD-1.5-shaped pipeline on this CPU: diffplug against diffusers on the same components.

The components are SD 1.5's shapes with random, seeded weights (no network): the UNet from
its real config (860M parameters), a CLIP ViT-L/14-shaped text encoder (12 layers, width 768,
SD's 77-token window; the tokenizer's vocabulary is written here) and the SD VAE's shape.
They are saved as a pipeline folder once, imported with ``diffplug import-diffusers``, and
sampled at 256x256 (32x32 latents), 10 DDIM steps, guidance 7.5, batch 1, one prompt, by
``diffplug.load(...).sample`` and by diffusers' ``StableDiffusionPipeline`` in one process,
after one untimed call of each (the process's first call pays a one-off set-up of some
seconds, whichever side makes it), ``REPEATS`` times each in alternating order. Peak memory
is the resident set's rise above what the process held before the call (both pipelines'
weights stay loaded throughout), polled every 5 ms. The two outputs are compared as a check that both sides did the same work.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine, table

DOC = ROOT / "docs" / "generation.md"
SIZE, STEPS, GUIDANCE, SEED = 256, 10, 7.5, 0
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
REPEATS = int(os.environ.get("SD_REPEATS", "4"))
#: SD 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), but sample_size
#: 32: diffplug samples a model at its recorded size, 32x32 latents here (256x256 images)
UNET = dict(sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # fmt: skip
#: SD's VAE (AutoencoderKL, 83M parameters)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
           down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn):  # noqa: ANN001, ANN201 - any call
    """(result, seconds, peak resident bytes above the start)."""
    start_rss, peak, done = rss(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss() - start_rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return result, seconds, peak[0]


def write_pipeline(folder: Path) -> None:
    import diffusers
    import transformers

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from tiny_sd import SD_SCHEDULE, make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()  # fmt: skip
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(**VAE).eval()
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)  # fmt: skip


def run() -> str:
    import diffusers

    import diffplug
    from diffplug.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        folder, checkpoint = Path(tmp) / "sd15-shaped", Path(tmp) / "sd15.safetensors"
        write_pipeline(folder)
        try:
            cli(["import-diffusers", str(folder), "-o", str(checkpoint)])
        except SystemExit as exc:
            if exc.code:
                raise
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        params = sum(p.numel() for p in pipe.unet.parameters())
        run = diffplug.load(model=checkpoint, steps=STEPS, guidance=GUIDANCE)  # recorded DDIM

        def ours() -> torch.Tensor:
            return run.sample(seeds=[SEED], prompt=PROMPT, progress=False).tensor

        def theirs() -> torch.Tensor:
            with torch.no_grad():
                return pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            height=SIZE, width=SIZE, output_type="pt",
                            generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip

        times: dict[str, list[float]] = {"diffplug": [], "diffusers": []}
        peaks: dict[str, list[int]] = {"diffplug": [], "diffusers": []}
        images = {}
        sides = [("diffplug", ours), ("diffusers", theirs)]
        for _, fn in sides:  # untimed: the process's first call pays one-off kernel set-up
            fn()
        for repeat in range(REPEATS):
            for name, fn in sides if repeat % 2 == 0 else sides[::-1]:
                images[name], seconds, peak = timed(fn)
                times[name].append(seconds)
                peaks[name].append(peak)
                print(f"  {name}: {seconds:.1f} s", flush=True)
    diff = float((images["diffplug"].double() - images["diffusers"].double()).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) / 2**20 for k, v in peaks.items()}
    rows = [[k, f"{med[k]:.1f} s", f"{min(times[k]):.1f}-{max(times[k]):.1f} s",
             f"{med[k] / STEPS:.2f} s", f"{peak[k]:.0f} MiB"] for k in times]  # fmt: skip
    return "\n".join([
        f"Measured on {machine()}: an SD-1.5-shaped pipeline (UNet {params / 1e6:.0f}M "
        f"parameters, random weights), {SIZE}x{SIZE}, {STEPS} DDIM steps, guidance "
        f"{GUIDANCE:g}, batch 1, median of {REPEATS} calls each in alternating order after "
        "one untimed call each, in one process (`uv run python benchmarks/run.py sd`).",
        "",
        table(["", "time", "calls", "per step", "peak memory above the weights"], rows),
        "",
        f"- diffplug / diffusers: **{med['diffplug'] / med['diffusers']:.2f}x** the time "
        f"(target <= 1.0), {peak['diffplug'] / max(peak['diffusers'], 1):.2f}x the peak memory.",
        f"- the two images differ by at most {diff:.1e} on [0, 1] (same weights, prompt and "
        "generator).",
    ])  # fmt: skip


if __name__ == "__main__":
    print(run())
