"""``python -m diffplug_vae.calibrate MODEL [--data digits] [--size 32]``: measure and store a
trained VAE's ``scaling_factor``.

Why: a diffusion model wants unit-variance latents, and a freshly trained VAE's latent scale is
only known after training (SD measured its 0.18215 the same way). This sets
``scaling_factor = 1 / std`` of the posterior means of the training images and rewrites the
checkpoint (atomically), keeping its training record.
"""

from __future__ import annotations

import argparse
import sys

from diffplug import UserError, load_component, load_data, read_metadata, save_component
from diffplug_vae.model import KLVAE, fit_scaling_factor


def calibrate(path: str, data: str = "digits", size: int = 32, channels: int = 1) -> float:
    """Fit ``scaling_factor`` on the ``train`` split of ``data`` and save it into ``path``."""
    vae = load_component(path, kind="autoencoder")
    if not isinstance(vae, KLVAE):
        raise UserError(f"{path}: a {type(vae).__name__}, not a kl-vae")
    extra = read_metadata(path)["extra"]
    images = load_data(data, size, "train", channels).images
    factor = fit_scaling_factor(vae, images)
    vae.config.scaling_factor = factor
    extra["scaling_factor_fit"] = {"data": data, "size": size, "images": len(images)}
    save_component(vae, path, kind="autoencoder", extra=extra)
    return factor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffplug_vae.calibrate", description=__doc__)
    parser.add_argument("model", help="a kl-vae checkpoint: runs/vae-digits/model.safetensors")
    parser.add_argument("--data", default="digits", help="'digits' or an image folder")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    args = parser.parse_args(argv)
    try:
        factor = calibrate(args.model, args.data, args.size, args.channels)
    except UserError as exc:
        print(f"diffplug_vae.calibrate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"scaling_factor = {factor:.6g} written to {args.model}")


if __name__ == "__main__":
    main()
