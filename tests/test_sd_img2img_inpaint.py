"""img2img and inpainting with a 9-channel UNet on tiny random SD pipelines (written here)
against diffusers' ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline``:
same weights, prompt, init image, mask, strength, guidance and per-sample generators, the
pipelines' own scheduler (diffplug's ``diffusers`` sampler with the recorded options)."""

import pytest
import torch
from cliutil import run_cli
from tiny_sd import write_sd

import diffplug
from diffplug import read_metadata
from diffplug.testing import torch_threads

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SEEDS, PROMPTS = [7, 8], ["the seven", "a lighthouse"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _posterior_mean(monkeypatch):
    """diffusers' pipelines encode an init (and a masked image) by *sampling* the VAE's
    posterior with the sample's generator; diffplug encodes with its mean, so an init gives
    the same latents whatever the seed. The reference is given the mean too: what is
    compared is the loop (strength, noising, guidance, mask), not that one draw."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mode())  # fmt: skip


def imported(folder, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run_cli("import-diffusers", str(folder), "-o", str(out))
    assert result.code == 0, result.err
    return out


def init_and_mask():
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, 16, 16), generator=g)
    mask = torch.zeros((1, 1, 16, 16))
    mask[..., 8:, :] = 1  # regenerate the lower half
    return image, mask


def ours(model, **kw):
    sampling = read_metadata(model)["extra"]["sampling"]
    run = diffplug.load(model=str(model), sampler=sampling["sampler"], steps=10, guidance=7.5,
                        **sampling["options"])  # fmt: skip
    return run.sample(seeds=SEEDS, prompt=PROMPTS, progress=False, **kw).tensor


def gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def test_img2img_equals_stable_diffusion_img2img_pipeline(tmp_path):
    folder = write_sd(tmp_path / "sd", seed=0)
    image, _ = init_and_mask()
    got = ours(imported(folder, tmp_path), init=image[0], strength=0.6)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, image=image.expand(2, -1, -1, -1), strength=0.6,
               num_inference_steps=10, guidance_scale=7.5, generator=gens(),
               output_type="pt").images  # fmt: skip
    assert float((got.double() - ref.double()).abs().max()) <= 1e-4


def test_inpainting_unet_equals_stable_diffusion_inpaint_pipeline(tmp_path):
    folder = write_sd(tmp_path / "sd-inpaint", seed=0, inpaint=True)
    image, mask = init_and_mask()
    model = imported(folder, tmp_path)
    assert read_metadata(model)["config"]["channels"] == 4  # 9 in, 4 out: a latent model
    got = ours(model, init=image[0], mask=mask[0])
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, image=image.expand(2, -1, -1, -1),
               mask_image=mask.expand(2, -1, -1, -1), height=16, width=16, strength=1.0,
               num_inference_steps=10, guidance_scale=7.5, generator=gens(),
               output_type="pt").images  # fmt: skip
    assert float((got.double() - ref.double()).abs().max()) <= 1e-4
