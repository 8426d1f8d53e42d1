"""A tiny SDXL-shaped pipeline (two CLIP encoders, text_time added conditioning) imported
into one checkpoint and sampled against diffusers' ``StableDiffusionXLPipeline``: the
penultimate states of both encoders joined, the second's pooled projection and the size/crop
ids as ``added_cond_kwargs``, SDXL's zero unconditional half (or a negative prompt)."""

import pytest
import torch
from cliutil import run_cli
from tiny_sd import write_sd

import diffplug
from diffplug import read_metadata
from diffplug.testing import torch_threads

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SEEDS, PROMPTS = [5, 6], ["the seven", "a lighthouse"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=1, sdxl=True)


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "sdxl.safetensors"
    result = run_cli("import-diffusers", str(folder), "-o", str(out))
    assert result.code == 0, result.err
    return out


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sdxl_equals_stable_diffusion_xl_pipeline(folder, checkpoint, negative):
    meta = read_metadata(checkpoint)
    assert meta["extra"]["conditioner"]["name"] == "clip-sdxl"
    assert meta["config"]["time_ids"] == [16, 16, 0, 0, 16, 16]
    sampling = meta["extra"]["sampling"]
    run = diffplug.load(model=str(checkpoint), sampler=sampling["sampler"], steps=8,
                        guidance=5.0, **sampling["options"])  # fmt: skip
    ours = run.sample(seeds=SEEDS, prompt=PROMPTS, negative_prompt=negative, progress=False)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, negative_prompt=None if negative is None else [negative] * 2,
               num_inference_steps=8, guidance_scale=5.0, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images  # fmt: skip
    assert ours.tensor.shape == ref.shape == (2, 3, 16, 16)
    err = float((ours.tensor.double() - ref.double()).abs().max())
    assert err <= 1e-4, err


def test_sdxl_at_another_size_equals_the_pipeline_at_that_height_and_width(folder, checkpoint):
    """`size=(24, 32)`: the size ids follow the image (original = target = (24, 32), as
    diffusers' default), so the images equal ``height=24, width=32``."""
    sampling = read_metadata(checkpoint)["extra"]["sampling"]
    run = diffplug.load(model=str(checkpoint), sampler=sampling["sampler"], steps=8,
                        guidance=5.0, size=(24, 32), **sampling["options"])  # fmt: skip
    ours = run.sample(seeds=SEEDS, prompt=PROMPTS, progress=False)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, num_inference_steps=8, guidance_scale=5.0, height=24, width=32,
               output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images  # fmt: skip
    assert ours.tensor.shape == ref.shape == (2, 3, 24, 32)
    err = float((ours.tensor.double() - ref.double()).abs().max())
    assert err <= 1e-4, err
