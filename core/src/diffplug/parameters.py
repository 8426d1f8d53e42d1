"""A1111's ``parameters`` PNG text, written from a recipe, so tools that read A1111's PNGs
(its own "PNG Info", ComfyUI, Civitai, image browsers) show how an image was made.

A1111's layout: the prompt, then ``Negative prompt: ...`` when there is one, then one line of
``Key: value`` pairs separated by ", " (a value holding a comma, colon or quote is JSON
quoted). The diffplug recipe beside it (``diffplug.recipe``) stays the complete record; this
is the summary those tools understand.
"""

from __future__ import annotations

import json
from typing import Any

#: A1111's names of the samplers diffplug shares with it
SAMPLERS = {
    "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler-ancestral": "Euler a",
    "heun": "Heun", "dpm2": "DPM2", "dpm2-ancestral": "DPM2 a", "lms": "LMS",
    "dpmpp-2s-ancestral": "DPM++ 2S a", "dpmpp-sde": "DPM++ SDE", "dpmpp-2m": "DPM++ 2M",
    "dpmpp-2m-sde": "DPM++ 2M SDE", "dpmpp-3m-sde": "DPM++ 3M SDE", "unipc": "UniPC",
    "deis": "DEIS", "ipndm": "iPNDM", "ipndm-v": "iPNDM_v", "lcm": "LCM",
}  # fmt: skip
#: A1111's "Schedule type" names of diffplug's schedules
SCHEDULES = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm-uniform": "SGM Uniform", "simple": "Simple",
    "ddim-uniform": "DDIM", "beta": "Beta", "linear-quadratic": "Linear Quadratic",
    "kl-optimal": "KL Optimal",
}  # fmt: skip


def parameters(recipe: dict[str, Any], size: tuple[int, int], k: int = 0) -> str:
    """The ``parameters`` text of sample ``k`` of ``recipe`` ((width, height) ``size``)."""
    prompts, negatives = recipe.get("prompts") or [], recipe.get("negative_prompts") or []
    seeds = recipe.get("seeds") or [0]
    sampler, steps, guidance = _sampler(recipe)
    schedule = (recipe.get("schedule") or {}).get("name")
    model = recipe.get("model") or {}
    fields: dict[str, Any] = {
        "Steps": steps,
        "Sampler": SAMPLERS.get(sampler, sampler),
        "Schedule type": SCHEDULES.get(schedule, schedule) if schedule else "Automatic",
        "CFG scale": f"{float(guidance):g}",
        "Seed": seeds[min(k, len(seeds) - 1)],
        "Size": f"{size[0]}x{size[1]}",
    }
    if model.get("sha256"):
        fields["Model hash"] = model["sha256"][:10]  # A1111's short SHA-256
    fields["Model"] = model.get("name") or (recipe.get("pipeline") or {}).get("name")
    if "strength" in recipe:
        fields["Denoising strength"] = f"{float(recipe['strength']):g}"
    if recipe.get("mask"):
        fields["Inpaint area"] = "Whole picture"
    fields["Version"] = f"diffplug {(recipe.get('versions') or {}).get('diffplug', '')}".strip()
    lines = [prompts[k % len(prompts)] if prompts else ""]
    if negatives:
        lines.append(f"Negative prompt: {negatives[k % len(negatives)]}")
    lines.append(", ".join(f"{key}: {_quote(v)}" for key, v in fields.items() if v is not None))
    return "\n".join(lines)


def _sampler(recipe: dict[str, Any]) -> tuple[str, Any, Any]:
    """(sampler name, steps, guidance) of a run or, for a pipeline, of its base stage."""
    if "sampler" in recipe:
        return recipe["sampler"]["name"], recipe.get("steps"), recipe.get("guidance", 1.0)
    options = (recipe.get("pipeline") or {}).get("options") or {}
    return (options.get("base_sampler", "?"), options.get("base_steps"),
            options.get("guidance", 1.0))  # fmt: skip


def _quote(value: Any) -> str:
    """A1111's ``quote``: JSON-quote a value that would break the ", "-separated line."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',\n:"') else text


__all__ = ["parameters"]
