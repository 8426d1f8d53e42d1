"""A whole Stable Diffusion pipeline folder (tiny, random, written here) imported into one
diffplug checkpoint, and text-to-image against diffusers' ``StableDiffusionPipeline`` on the
same weights, prompts, guidance and per-sample generators: the pipeline's own scheduler
(diffplug's ``diffusers`` sampler with the checkpoint's recorded options) and diffplug's own
samplers that reproduce SD's schedulers (``ddim --steps-offset 1``; ``euler --schedule
ddim-uniform``), with and without a negative prompt, to <= 1e-4 on the [0, 1] images."""

import hashlib
import json
import shutil

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from tiny_sd import SD_SCHEDULE, write_sd

import diffplug
from diffplug import read_metadata
from diffplug.output import read_recipe
from diffplug.testing import torch_threads

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SEEDS, PROMPTS, STEPS, GUIDANCE = [3, 4], ["the seven", "a lighthouse, one"], 10, 7.5
BOUND = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "sd.safetensors"
    result = run_cli("import-diffusers", str(folder), "-o", str(out))
    assert result.code == 0, result.err
    return out


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, scheduler, negative=None):
    pipe.scheduler = scheduler
    return pipe(prompt=PROMPTS, negative_prompt=None if negative is None else [negative] * 2,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images  # fmt: skip


def ours(model, sampler, negative=None, **options):
    run = diffplug.load(model=str(model), sampler=sampler, steps=STEPS, guidance=GUIDANCE,
                        **options)  # fmt: skip
    return run.sample(seeds=SEEDS, prompt=PROMPTS, negative_prompt=negative, progress=False).tensor


def max_diff(a, b):
    assert a.shape == b.shape == (2, 3, 16, 16)
    return float((a.double() - b.double()).abs().max())


DDIM_SD = dict(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
CASES = {
    # the pipeline's own scheduler, as the checkpoint records it (SD's DDIM config)
    "pipeline-ddim": (lambda: diffusers.DDIMScheduler(**DDIM_SD), None, {}),
    "pipeline-euler": (
        lambda: diffusers.EulerDiscreteScheduler(**SD_SCHEDULE),
        "diffusers",
        {
            "scheduler_class": "EulerDiscreteScheduler",
            "scheduler_options": json.dumps({"steps_offset": 1, "timestep_spacing": "leading"}),
        },
    ),  # fmt: skip
    # diffplug's own samplers: DDIM ends at abar = 1 (diffusers' set_alpha_to_one=True)
    "ddim": (
        lambda: diffusers.DDIMScheduler(**{**DDIM_SD, "set_alpha_to_one": True}),
        "ddim",
        {"steps_offset": 1},
    ),  # fmt: skip
    # SD's Euler (leading spacing, offset 1) visits ComfyUI's ddim-uniform levels
    "euler": (
        lambda: diffusers.EulerDiscreteScheduler(**SD_SCHEDULE),
        "euler",
        {"schedule": "ddim-uniform"},
    ),  # fmt: skip
}


@pytest.mark.parametrize("negative", [None, "blurry"])
@pytest.mark.parametrize("case", list(CASES))
def test_text_to_image_equals_stable_diffusion_pipeline(checkpoint, pipe, case, negative):
    make, sampler, options = CASES[case]
    if sampler is None:  # what the import recorded from the folder's scheduler config
        defaults = read_metadata(checkpoint)["extra"]["sampling"]
        sampler, options = defaults["sampler"], defaults["options"]
        assert options["scheduler_class"] == "DDIMScheduler"
    err = max_diff(
        ours(checkpoint, sampler, negative, **options), reference(pipe, make(), negative)
    )
    assert err <= BOUND, (case, negative, err)


def test_the_negative_prompt_changes_the_images(checkpoint):
    plain, negative = ours(checkpoint, "ddim"), ours(checkpoint, "ddim", "blurry")
    assert max_diff(plain, negative) > 1e-3


def test_the_checkpoint_is_self_contained_and_records_its_sources(folder, checkpoint, tmp_path):
    meta = read_metadata(checkpoint)
    extra = meta["extra"]
    assert extra["guidance"] == 7.5 and extra["sampling"]["steps"] == 50
    assert extra["conditioner"]["name"] == "clip" and extra["conditioner"]["weights"]
    assert extra["autoencoder"]["name"] == "kl-vae" and extra["autoencoder"]["weights"]
    want = {f"{p}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for p in ("unet", "vae", "text_encoder") for f in (folder / p).glob("*.safetensors")}  # fmt: skip
    assert extra["diffusers"]["sha256"] == want
    # the file alone, far from the folder (moved away), samples the same images
    before = ours(checkpoint, "ddim")
    moved = tmp_path / "elsewhere" / "copy.safetensors"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    hidden = folder.with_name("hidden")
    folder.rename(hidden)
    try:
        assert torch.equal(ours(moved, "ddim"), before)
    finally:
        hidden.rename(folder)


def test_run_model_folder_equals_the_imported_checkpoint(folder, checkpoint, tmp_path):
    env = {"DIFFPLUG_CACHE_DIR": str(tmp_path / "cache")}
    outs = []
    for model in (folder, checkpoint):
        out = tmp_path / f"{len(outs)}.safetensors"
        result = run_cli("run", "--model", str(model), "--sampler", "ddim", "--steps", "4",
                         "--prompt", "the seven", "--num-samples", "2", "-o", str(out), env=env)  # fmt: skip
        assert result.code == 0, result.err
        outs.append(diffplug.load_tensors(out)["samples"])
    assert torch.equal(outs[0], outs[1])
    assert len(list((tmp_path / "cache" / "imports").glob("*.safetensors"))) == 1


def test_run_without_a_sampler_uses_the_pipelines_recorded_scheduler(checkpoint, tmp_path):
    out = tmp_path / "recorded.safetensors"
    result = run_cli("run", "--model", str(checkpoint), "--steps", "4", "--prompt", "the seven",
                     "--num-samples", "2", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    sampler = read_recipe(out)["sampler"]
    assert (
        sampler["name"] == "diffusers" and sampler["options"]["scheduler_class"] == "DDIMScheduler"
    )
    recorded = read_metadata(checkpoint)["extra"]["sampling"]
    explicit = diffplug.load(model=str(checkpoint), sampler="diffusers", steps=4,
                             **recorded["options"]).sample(2, prompt="the seven", progress=False)  # fmt: skip
    assert torch.equal(diffplug.load_tensors(out)["samples"], explicit.tensor)


def test_a_model_that_records_no_sampler_still_needs_one(tmp_path):
    result = run_cli("run", "--model", "ddpm-digits", "-o", str(tmp_path / "x.png"))
    assert_clean_error(result, "records none", "diffplug list samplers")
    assert not (tmp_path / "x.png").exists()


def test_pickled_weights_are_refused_never_loaded(folder, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(folder, bad)
    weights = bad / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    result = run_cli("import-diffusers", str(bad), "-o", str(tmp_path / "x.safetensors"))
    assert_clean_error(result, "pickled weights", "convert to safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_pipeline_folder_without_model_index_is_refused(folder, tmp_path):
    bad = tmp_path / "no-index"
    shutil.copytree(folder, bad)
    (bad / "model_index.json").unlink()
    for args in (["import-diffusers", str(bad), "-o", str(tmp_path / "x.safetensors")],
                 ["run", "--model", str(bad), "--sampler", "ddim", "-o", str(tmp_path / "x.png")]):  # fmt: skip
        assert_clean_error(run_cli(*args, env={"DIFFPLUG_CACHE_DIR": str(tmp_path)}),
                           "no model_index.json")  # fmt: skip


def test_another_size_equals_the_pipeline_at_that_height_and_width(checkpoint, pipe, tmp_path):
    """`--size 24x32` (16x16 is the tiny pipeline's own): the same images as diffusers'
    ``height=32, width=24``, and the size is in the recipe, so a replay draws them again."""
    make, sampler, options = CASES["ddim"]
    run = diffplug.load(model=str(checkpoint), sampler=sampler, steps=STEPS, guidance=GUIDANCE,
                        size=(32, 24), **options)  # fmt: skip
    mine = run.sample(seeds=SEEDS, prompt=PROMPTS, progress=False)
    pipe.scheduler = make()
    theirs = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=32, width=24, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images  # fmt: skip
    assert mine.tensor.shape == theirs.shape == (2, 3, 32, 24)
    assert float((mine.tensor.double() - theirs.double()).abs().max()) <= BOUND
    assert run.recipe["size"] == [32, 24]
    out = tmp_path / "a.safetensors"
    mine.save(out)
    again = diffplug.load(recipe=out).sample(progress=False).tensor
    assert torch.equal(again, mine.tensor)
    cli = tmp_path / "cli.safetensors"
    result = run_cli("run", "--model", str(checkpoint), "--sampler", "ddim", "--steps-offset",
                     "1", "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--size", "24x32",
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "3", "-q",
                     "-o", str(cli))  # fmt: skip
    assert result.code == 0, result.err
    assert torch.equal(diffplug.load_tensors(cli)["samples"], mine.tensor)
    # the README's form: the pipeline's own recorded sampler, only a size given
    own = tmp_path / "own.safetensors"
    result = run_cli("run", "--model", str(checkpoint), "--prompt", "a lighthouse", "--size",
                     "24x32", "--steps", "2", "--num-samples", "1", "-q", "-o", str(own))  # fmt: skip
    assert result.code == 0, result.err
    assert diffplug.load_tensors(own)["samples"].shape == (1, 3, 32, 24)


def test_a_size_the_vae_cannot_halve_is_one_line(checkpoint, tmp_path):
    result = run_cli("run", "--model", str(checkpoint), "--sampler", "ddim", "--size", "21",
                     "--prompt", "a", "-o", str(tmp_path / "x.png"))  # fmt: skip
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and "multiples of 2" in result.err, result.err
    assert not (tmp_path / "x.png").exists()
