"""Negative prompts: ``Run.sample(negative_prompt=...)`` and ``diffplug run --negative-prompt``
replace the null condition of guidance's unconditional half with the negative prompt's
encoding, for every text conditioner and sampler (one place builds it: the loop's
``_conditioning``). Recorded in the recipe and replayed bitwise; refused where it would change
nothing (no text conditioning, guidance off)."""

from __future__ import annotations

import pytest
import torch
from cliutil import assert_clean_error, run_cli

import diffplug
from diffplug import UserError, default_registry
from diffplug.checkpoint import load_tensors
from diffplug.output import read_recipe
from diffplug.testing import torch_threads

MODEL = "imagen-digits-base"  # the shipped text-to-digits model (guidance 3 recorded)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def run():
    return diffplug.load(model=MODEL, sampler="ddim", steps=8)


def spy(run):
    """Record the cond of every denoiser call of ``run`` (returns the list; undo with
    ``del run.denoiser.forward``)."""
    calls = []
    forward = run.denoiser.forward

    def recording(x, t, cond=None):
        calls.append({k: v.clone() for k, v in cond.items()})
        return forward(x, t, cond)

    run.denoiser.forward = recording
    return calls


def test_the_negative_prompt_changes_the_samples_under_guidance(run):
    assert run.guidance == 3.0 and run.loop.guided
    plain = run.sample(8, prompt="3", seed=0, progress=False).tensor
    away = run.sample(8, prompt="3", negative_prompt="8", seed=0, progress=False).tensor
    assert (plain - away).abs().max() > 0.1
    # the empty negative prompt is the null condition itself: nothing changes, bit for bit
    empty = run.sample(8, prompt="3", negative_prompt="", seed=0, progress=False).tensor
    assert torch.equal(empty, plain)


def test_it_is_the_null_condition_replaced_by_its_encoding(run):
    n, negative = 3, "a handwritten eight"
    calls = spy(run)
    try:
        out = run.sample(n, prompt="3", negative_prompt=negative, seed=2, progress=False)
    finally:
        del run.denoiser.forward
    conditioner = run.conditioner
    with torch.inference_mode():  # as the loop encodes (a transformer's fast path)
        want, prompt = conditioner([negative] * n), conditioner(["3"] * n)
    assert len(calls) == len(run.loop.plan)
    for cond in calls:  # every step: the prompt's rows, then the negative prompt's
        for key, value in want.items():
            assert torch.equal(cond[key][:n], prompt[key]), key
            assert torch.equal(cond[key][n : 2 * n], value), key
    # and the samples are those of a run whose null condition is that encoding
    null = conditioner.null
    conditioner.null = lambda batch: conditioner([negative] * batch)
    try:
        by_hand = run.sample(n, prompt="3", seed=2, progress=False).tensor
    finally:
        conditioner.null = null
    assert torch.equal(by_hand, out.tensor)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m", "heun", "adm", "unipc"])
def test_every_sampler_guides_away_from_it(sampler):
    if sampler not in default_registry().names("scheduler"):
        pytest.skip(f"sampler {sampler} is not installed")
    run = diffplug.load(model=MODEL, sampler=sampler, steps=4)
    calls = spy(run)
    out = run.sample(2, prompt="7", negative_prompt="1", seed=0, progress=False).tensor
    with torch.inference_mode():
        want = run.conditioner(["1", "1"])["text"]
    assert calls and all(torch.equal(c["text"][2:4], want) for c in calls)
    del run.denoiser.forward
    plain = run.sample(2, prompt="7", seed=0, progress=False).tensor
    assert not torch.equal(out, plain)


def test_one_per_sample_is_cycled_and_recorded(run):
    out = run.sample(4, prompt="3", negative_prompt=["8", "5"], seed=1, progress=False)
    assert out.recipe["negative_prompts"] == ["8", "5", "8", "5"]
    one = run.sample(seeds=[2], prompt="3", negative_prompt="5", progress=False).tensor
    assert torch.equal(one[0], out.tensor[1])  # sample 1's own negative prompt, alone
    assert out.recipe_of(3)["negative_prompts"] == ["5"]


def test_recorded_in_the_recipe_and_replayed_bitwise(run, tmp_path):
    out = run.sample(5, prompt=["3", "7"], negative_prompt="8", seed=11, progress=False)
    grid = out.save(tmp_path / "grid.png")
    assert read_recipe(grid)["negative_prompts"] == ["8"] * 5
    again = diffplug.load(recipe=grid).sample(progress=False)
    assert torch.equal(again.tensor, out.tensor)
    assert again.recipe["negative_prompts"] == ["8"] * 5
    # a single sample's PNG replays that sample
    folder = out.save(tmp_path / "each/")
    single = diffplug.load(recipe=folder / "00003.png").sample(progress=False)
    assert torch.equal(single.tensor[0], out.tensor[3])
    # the CLI: the same samples from the flags, and again from the recipe
    flags = tmp_path / "cli.safetensors"
    result = run_cli("run", "--model", MODEL, "--sampler", "ddim", "--steps", "8", "--seed",
                     "11", "--num-samples", "5", "--prompt", "3", "--prompt", "7",
                     "--negative-prompt", "8", "-q", "-o", str(flags))  # fmt: skip
    assert result.code == 0, result.err
    assert torch.equal(load_tensors(flags)["samples"], out.tensor)
    replay = tmp_path / "replay.safetensors"
    result = run_cli("run", "--recipe", str(grid), "-q", "-o", str(replay))
    assert result.code == 0, result.err
    assert torch.equal(load_tensors(replay)["samples"], out.tensor)
    assert read_recipe(replay)["negative_prompts"] == ["8"] * 5
    fixed = run_cli("run", "--recipe", str(grid), "--negative-prompt", "1", "-o",
                    str(tmp_path / "no.png"))  # fmt: skip
    assert_clean_error(fixed, "--recipe fixes the whole run", "--negative-prompt")


def test_refused_for_an_unconditional_model_and_without_guidance(tmp_path):
    unconditional = diffplug.load(model="ddpm-digits", sampler="ddim", steps=2)
    with pytest.raises(UserError, match="model ddpm-digits is not text-conditional"):
        unconditional.sample(2, negative_prompt="8", progress=False)
    off = diffplug.load(model=MODEL, sampler="ddim", steps=2, guidance=1.0)
    with pytest.raises(UserError, match=r"guidance is off \(--guidance 1\)"):
        off.sample(2, prompt="3", negative_prompt="8", progress=False)
    for args, needle in [
        (["--model", "ddpm-digits"], "model ddpm-digits is not text-conditional"),
        (["--model", MODEL, "--prompt", "3", "--guidance", "1"], "guidance is off"),
        (["--model", "imagen-digits-sr", "--condition-images", "x"], "not text-conditional"),
    ]:
        out = tmp_path / "x.png"
        result = run_cli("run", "--sampler", "ddim", "--steps", "2", "--num-samples", "1",
                         *args, "--negative-prompt", "8", "-o", str(out))  # fmt: skip
        assert_clean_error(result, needle)  # before the condition images are read
        assert len(result.err.strip().splitlines()) == 1
        assert not out.exists()
    piped = run_cli("run", "--pipeline", "imagen", "--prompt", "3", "--negative-prompt", "8",
                    "-o", str(tmp_path / "p.png"))  # fmt: skip
    assert_clean_error(piped, "--negative-prompt goes with a single text model")
    with pytest.raises(UserError, match="negative_prompt goes with a single text model"):
        diffplug.load(pipeline="imagen").sample(1, prompt="3", negative_prompt="8")


def test_the_loop_refuses_negatives_when_unguided():
    from diffplug.sampling import sample

    run = diffplug.load(model=MODEL, sampler="ddim", steps=2, guidance=1.0)
    with pytest.raises(UserError, match="this run is not guided"):
        sample(run.denoiser, run.scheduler, steps=2, seeds=[0], conditioner=run.conditioner,
               conditions=["3"], negatives=["8"])  # fmt: skip


def test_a_frozen_t5_conditioner_takes_negative_prompts_too(tmp_path):
    """The same mechanism under diffplug-imagen's t5 conditioner (a tiny random T5 built here)
    and a fresh Efficient U-Net of its width, through the loop directly."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("diffplug_imagen")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from diffplug.sampling import sample

    words = ["<pad>", "</s>", "<unk>", "a", "handwritten", "seven", "three", "blurry"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])  # fmt: skip
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                         eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(words), d_model=16, d_ff=32, num_layers=1,
                                   num_heads=2, d_kv=8, dropout_rate=0.0)  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(tmp_path, safe_serialization=True)
    registry = default_registry()
    t5 = registry.load("conditioner", "t5").from_options(path=str(tmp_path), max_tokens=8)
    t5.name = "t5"
    unet_cls = registry.load("denoiser", "efficient-unet")
    torch.manual_seed(1)
    unet = unet_cls.from_options(size=8, width=16, text_dim=16, conditioning="text").eval()
    with torch.no_grad():  # zero-initialised output layers would hide the text entirely
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    ddim = registry.load("scheduler", "ddim")()
    calls = []
    forward = unet.forward

    def recording(x, t, cond=None):
        calls.append({k: v.clone() for k, v in cond.items()})
        return forward(x, t, cond)

    unet.forward = recording
    common = dict(steps=3, seeds=[0, 1], conditioner=t5, conditions=["a handwritten seven"] * 2,
                  guidance=4.0, chunk=0)  # fmt: skip
    away = sample(unet, ddim, negatives=["blurry", "three"], **common)
    with torch.inference_mode():
        want = t5(["blurry", "three"])
    assert len(calls) == 1 + 3  # the preflight call (null, one row), then three steps
    for cond in calls[1:]:
        for key, value in want.items():
            assert torch.equal(cond[key][2:4], value), key
    plain = sample(unet, ddim, **common)
    assert not torch.equal(away, plain)
