"""A frozen CLIP text encoder as a diffplug conditioner: Stable Diffusion's text conditioning,
from a local folder (never downloaded)."""
