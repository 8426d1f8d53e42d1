"""The CLIP conditioner on a tiny random-weight CLIP built here (never downloaded): parity
with transformers and with diffusers' ``encode_prompt``, SD's 77-token window, clip skip,
long prompts split into windows (or refused), the empty-prompt null, negative prompts through
the loop, determinism, batch independence, and that nothing is fetched from the network."""

import socket
import string
import types

import pytest
import torch
from cliutil import assert_clean_error, run_cli

import diffplug
from diffplug import UserError, default_registry
from diffplug.testing import torch_threads

transformers = pytest.importorskip("transformers")

CHARS = string.ascii_lowercase + string.digits + ",.!?'-()"
#: a few merges, so some words are one token and others several
MERGES = [("t", "h"), ("th", "e</w>"), ("o", "n"), ("on", "e</w>"), ("s", "e"), ("se", "v"),
          ("sev", "e"), ("seve", "n</w>"), ("a", "n"), ("an", "d</w>")]  # fmt: skip
DIM, LAYERS = 32, 3
SHORT = ["the seven", "a lighthouse at dusk, oil on canvas", "one!", ""]


def long_prompt(tokens):
    """A prompt of exactly ``tokens`` tokens: one-letter words, one token each."""
    return " ".join(string.ascii_lowercase[k % 26] for k in range(tokens))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def make_tokenizer(**kw):
    vocab = {}
    for suffix in ("", "</w>"):
        for c in CHARS:
            vocab[c + suffix] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=MERGES, model_max_length=77, **kw)


def make_clip(folder, seed=0, projection=False, **tokenizer_kw):
    tokenizer = make_tokenizer(**tokenizer_kw)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=2 * DIM,
        num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=DIM, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    cls(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def reference(clip_dir):
    """transformers' own model and tokenizer, loaded from the same folder."""
    model = transformers.CLIPTextModel.from_pretrained(clip_dir, local_files_only=True).eval()
    return model, transformers.CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)


def clip(folder, **options):
    from diffplug_clip.clip import CLIPConditioner, CLIPConfig

    cond = CLIPConditioner(CLIPConfig(clip_path=str(folder), **options))
    cond.name = "clip"
    return cond.eval()


@pytest.fixture(scope="module")
def conditioner(clip_dir):
    return clip(clip_dir)


def direct(model, ids, skip=1):
    """CLIPTextModel called on one window of token ids, as diffusers' encode_prompt does."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=skip > 1)
        if skip == 1:
            return out.last_hidden_state[0]
        return model.final_layer_norm(out.hidden_states[-skip])[0]


# -- the window ---------------------------------------------------------------------------


def test_tokenization_is_clip_tokenizers_padded_to_77(conditioner, reference):
    _, tokenizer = reference
    for prompt in [*SHORT, long_prompt(75)]:
        want = tokenizer(prompt, padding="max_length", max_length=77, truncation=False)
        assert conditioner.windows(prompt) == [tuple(want["input_ids"])], prompt
    (window,) = conditioner.windows("the seven")
    assert window[0] == tokenizer.bos_token_id and len(window) == 77
    assert set(window[3:]) == {tokenizer.eos_token_id}  # SD 1.x pads with EOS


def test_an_sd2_style_pad_token_pads_the_window(tmp_path):
    folder = make_clip(tmp_path, pad_token="!")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    cond = clip(folder)
    want = tokenizer("the seven", padding="max_length", max_length=77)["input_ids"]
    assert cond.windows("the seven") == [tuple(want)]
    assert want[-1] == tokenizer.convert_tokens_to_ids("!") != tokenizer.eos_token_id


# -- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_output_is_clip_text_model_on_the_same_ids_bitwise(clip_dir, reference, skip):
    model, tokenizer = reference
    cond = clip(clip_dir, clip_skip=skip)
    out = cond(SHORT)["text"]
    assert out.shape == (len(SHORT), 77, DIM) and out.dtype == torch.float32
    for k, prompt in enumerate(SHORT):
        ids = tokenizer(prompt, padding="max_length", max_length=77)["input_ids"]
        assert torch.equal(out[k], direct(model, ids, skip)), (skip, prompt)
    # against one batched call of the model: the same up to the last bits
    ids = torch.tensor([tokenizer(p, padding="max_length", max_length=77)["input_ids"]
                        for p in SHORT])  # fmt: skip
    with torch.no_grad():
        batched = model(input_ids=ids, output_hidden_states=True)
    ref = batched.last_hidden_state if skip == 1 else model.final_layer_norm(
        batched.hidden_states[-skip])  # fmt: skip
    assert float((out - ref).abs().max()) <= 1e-5


def test_clip_skip_changes_the_layer_and_is_bounded(clip_dir, conditioner):
    last = conditioner(["the seven"])["text"]
    assert not torch.equal(last, clip(clip_dir, clip_skip=2)(["the seven"])["text"])
    with pytest.raises(UserError, match="--clip-skip 4, but the encoder has 3 layers"):
        clip(clip_dir, clip_skip=4)(["the seven"])


def test_equals_diffusers_encode_prompt_with_its_clip_skip(clip_dir, reference):
    """diffusers' StableDiffusionPipeline.encode_prompt, on a pipeline around the same CLIP:
    our clip skip N is its clip_skip N - 1; its unconditional embedding is our null (or the
    negative prompt's encoding). One deliberate difference: diffusers applies clip_skip to the
    prompt only and encodes the unconditional half from the last layer whatever clip_skip is
    (its SDXL pipelines had the same asymmetry, diffusers PRs #13796/#13973); A1111 and
    ComfyUI, like us, read both halves from the same layer, so guidance subtracts like from
    like. There diffusers' unconditional half is our clip skip 1's."""
    diffusers = pytest.importorskip("diffusers")
    model, tokenizer = reference
    if not hasattr(model, "text_model"):  # transformers 5's CLIPTextModel is flat, diffusers
        model.text_model = types.SimpleNamespace(final_layer_norm=model.final_layer_norm)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=DIM,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=model, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    for skip in (1, 2):
        cond = clip(clip_dir, clip_skip=skip)
        for prompt, negative in [("the seven", None), ("a lighthouse at dusk", "blurry")]:
            with torch.no_grad():
                embeds, uncond = pipe.encode_prompt(
                    prompt, "cpu", 1, True, negative_prompt=negative,
                    clip_skip=None if skip == 1 else skip - 1,
                )  # fmt: skip
            assert torch.equal(cond([prompt])["text"], embeds), (skip, prompt)
            last = clip(clip_dir)  # diffusers' negative half: the last layer, always
            want = last.null(1) if negative is None else last([negative])
            assert torch.equal(want["text"], uncond), (skip, negative)
            ours = cond.null(1) if negative is None else cond([negative])
            assert skip == 1 or not torch.equal(ours["text"], uncond)


def test_a_with_projection_checkpoint_gives_the_same_hidden_states(tmp_path):
    plain = clip(make_clip(tmp_path / "plain", seed=3))
    projected = clip(make_clip(tmp_path / "projected", seed=3, projection=True))
    assert type(projected.encoder).__name__ == "CLIPTextModelWithProjection"
    for skip in (1, 2):
        plain.config.clip_skip = projected.config.clip_skip = skip
        assert torch.equal(plain(SHORT)["text"], projected(SHORT)["text"])


# -- long prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [76, 100, 150])
def test_a_long_prompt_is_split_into_75_token_windows(conditioner, reference, tokens):
    model, tokenizer = reference
    prompt = long_prompt(tokens)
    ids = conditioner.tokens(prompt)
    assert len(ids) == tokens
    windows = conditioner.windows(prompt)
    assert len(windows) == 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for w in windows:  # each its own BOS ... EOS, padded
        assert len(w) == 77 and w[0] == bos and w[-1] == eos
    assert windows[0][76] == eos and windows[1][tokens - 75 + 1] == eos
    assert list(windows[0][1:76]) + list(windows[1][1 : tokens - 75 + 1]) == ids  # nothing cut
    out = conditioner([prompt, prompt])["text"]
    assert out.shape == (2, 154, DIM)
    assert torch.equal(out[0, :77], direct(model, list(windows[0])))
    assert torch.equal(out[0, 77:], direct(model, list(windows[1])))
    assert len(conditioner.windows(long_prompt(151))) == 3


def test_a_long_prompt_is_refused_with_its_token_count_when_asked(clip_dir):
    cond = clip(clip_dir, long_prompt="refuse")
    assert cond(["the seven"])["text"].shape == (1, 77, DIM)
    assert cond([long_prompt(75)])["text"].shape == (1, 77, DIM)
    with pytest.raises(UserError, match=r"prompt 1 .* is 100 tokens, more than the 75"):
        cond(["the seven", long_prompt(100)])


def test_shorter_prompts_beside_a_long_one_get_the_empty_prompts_window(conditioner):
    short, longer = "the seven", long_prompt(90)
    out = conditioner([short, longer])["text"]
    assert out.shape == (2, 154, DIM)
    empty = conditioner([""])["text"][0]
    assert torch.equal(out[0, :77], conditioner([short])["text"][0])
    assert torch.equal(out[0, 77:], empty)
    assert torch.equal(out[1], conditioner([longer])["text"][0])
    # align: the null condition repeated to the same windows, and the draw's longest wins
    cond, null = conditioner.align([conditioner([short]), conditioner.null(1)], [long_prompt(200)])
    assert cond["text"].shape == null["text"].shape == (1, 231, DIM)
    assert torch.equal(null["text"][0], empty.repeat(3, 1))


# -- the null, determinism, batches -------------------------------------------------------


def test_the_null_is_the_encoding_of_the_empty_prompt(conditioner):
    null = conditioner.null(3)["text"]
    assert torch.equal(null, conditioner(["", "", ""])["text"])
    assert torch.equal(null, conditioner([None, None, None])["text"])
    assert null.shape == (3, 77, DIM)


def test_deterministic_and_independent_of_the_batch(conditioner):
    batch = conditioner(SHORT)["text"]
    assert torch.equal(batch, conditioner(SHORT)["text"])
    for k, prompt in enumerate(SHORT):
        assert torch.equal(batch[k], conditioner([prompt])["text"][0])
        assert torch.equal(batch[k], conditioner(SHORT[::-1])["text"][len(SHORT) - 1 - k])
    assert torch.equal(conditioner(["the seven"] * 5)["text"][4], batch[0])


def test_check_conditioner_passes(conditioner):
    from diffplug.testing import check_conditioner

    spec = check_conditioner(conditioner, SHORT[:3], shapes={"text": (77, DIM)},
                             dtypes={"text": torch.float32}, atol=0)  # fmt: skip
    assert spec == {"text": ((77, DIM), torch.float32)}


def test_frozen_in_train_mode_too(conditioner):
    conditioner.train()
    try:
        assert not conditioner.encoder.training
        assert not any(p.requires_grad for p in conditioner.parameters())
    finally:
        conditioner.eval()


# -- loading ------------------------------------------------------------------------------


def test_nothing_is_downloaded(clip_dir, monkeypatch):
    import huggingface_hub
    import huggingface_hub.file_download

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to reach the network: {args} {kwargs}")

    for module in (huggingface_hub, huggingface_hub.file_download):
        for name in ("hf_hub_download", "snapshot_download"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cond = clip(clip_dir)
    assert cond(["the seven"])["text"].shape == (1, 77, DIM)


def test_a_stable_diffusion_folder_loads_from_its_subfolders(tmp_path, clip_dir, conditioner):
    import shutil

    root = tmp_path / "sd"
    (root / "unet").mkdir(parents=True)
    shutil.copytree(clip_dir, root / "text_encoder")
    shutil.copytree(clip_dir, root / "tokenizer")
    for f in (root / "text_encoder").glob("tokenizer*"):
        f.unlink()
    assert torch.equal(clip(root)(SHORT)["text"], conditioner(SHORT)["text"])


def test_missing_folders_and_pickle_weights_are_refused(tmp_path, clip_dir):
    with pytest.raises(UserError, match="--clip-path must name a local folder"):
        clip(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--clip-path must name a local folder"):
        clip("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no CLIP text encoder"):
        clip(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((clip_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="no .safetensors weights"):
        clip(pickled)


def test_registered_as_clip_with_its_options():
    entry = default_registry().get("conditioner", "clip")
    assert entry.dist == "diffplug-clip"
    result = run_cli("info", "clip")
    assert result.code == 0, result.err
    for flag in ("--clip-path", "--clip-skip", "--long-prompt"):
        assert flag in result.out


# -- through the loop: an SD-style text UNet (diffplug-diffusers) --------------------------


@pytest.fixture(scope="module")
def text_unet(tmp_path_factory):
    """A tiny diffusers UNet2DConditionModel reading DIM-wide text, as a diffplug model."""
    diffusers = pytest.importorskip("diffusers")
    from diffplug import UnknownComponentError, save_component

    try:  # diffplug-diffusers' wrapper, reached by name (a plugin imports no other plugin)
        wrapper = default_registry().load("denoiser", "diffusers-unet")
    except UnknownComponentError:
        pytest.skip("diffplug-diffusers is not installed")

    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=DIM,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    ).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("unet") / "text-unet.safetensors"
    save_component(wrapper.from_unet(unet), path, kind="denoiser")
    return path


def recorded(run):
    """Record every denoiser call's cond on ``run`` (a list of dicts)."""
    calls = []
    forward = run.denoiser.forward

    def spy(x, t, cond=None):
        calls.append({k: v.clone() for k, v in cond.items()})
        return forward(x, t, cond)

    run.denoiser.forward = spy
    return calls


def test_negative_and_long_prompts_meet_in_one_guided_call(text_unet, clip_dir):
    run = diffplug.load(model=text_unet, sampler="ddim", steps=2, conditioner="clip",
                        clip_path=str(clip_dir), guidance=4.0, chunk=0)  # fmt: skip
    calls = recorded(run)
    negative = long_prompt(80)
    out = run.sample(2, prompt="the seven", negative_prompt=negative, progress=False)
    assert out.recipe["negative_prompts"] == [negative] * 2
    conditioner = run.conditioner
    text = calls[0]["text"]  # cond rows, then the negative rows, one call
    assert text.shape == (4, 154, DIM)
    short = conditioner(["the seven"])["text"][0]
    empty = conditioner.null(1)["text"][0]
    for k in range(2):
        assert torch.equal(text[k], torch.cat([short, empty]))
        assert torch.equal(text[2 + k], conditioner([negative])["text"][0])
    assert all(torch.equal(c["text"], text) for c in calls)


def test_samples_do_not_depend_on_the_batch_with_prompts_of_several_lengths(text_unet, clip_dir):
    run = diffplug.load(model=text_unet, sampler="ddim", steps=2, conditioner="clip",
                        clip_path=str(clip_dir), guidance=3.0)  # fmt: skip
    prompts = ["the seven", long_prompt(100), "one!", long_prompt(160)]
    whole = run.sample(4, prompt=prompts, negative_prompt="blurry", progress=False).tensor
    for size in (1, 3):
        again = run.sample(4, prompt=prompts, negative_prompt="blurry", batch_size=size,
                           progress=False).tensor  # fmt: skip
        assert torch.equal(again, whole), size


def test_cli_refuses_a_long_prompt_in_one_line(text_unet, clip_dir, tmp_path):
    out = tmp_path / "x.png"
    common = ["run", "--model", str(text_unet), "--sampler", "ddim", "--steps", "2", "-q",
              "--num-samples", "1", "--conditioner", "clip", "--clip-path", str(clip_dir),
              "-o", str(out)]  # fmt: skip
    result = run_cli(*common, "--long-prompt", "refuse", "--prompt", long_prompt(76))
    assert_clean_error(result, "is 76 tokens, more than the 75")
    assert len(result.err.strip().splitlines()) == 1 and not out.exists()
    ok = run_cli(*common, "--prompt", long_prompt(76), "--guidance", "2",
                 "--negative-prompt", "blurry", "--clip-skip", "2")  # fmt: skip
    assert ok.code == 0, ok.err
    recipe = diffplug.read_recipe(out)
    assert recipe["conditioner"]["options"] == {
        "clip_path": str(clip_dir), "clip_skip": 2, "long_prompt": "split", "encoder_config": {},
        "final_norm": True, "pooled": False, "tokenizer_files": {}}  # fmt: skip
    assert recipe["negative_prompts"] == ["blurry"]


def test_training_without_captions_is_refused_in_one_line(conditioner):
    """A frozen encoder trains on captions only; with them, from_data is the prompts' encoding
    (clip-sdxl's from_data is the same helper)."""
    from diffplug_clip.clip import need_captions

    with pytest.raises(UserError, match="clip-sdxl conditioner: training needs captioned data"):
        need_captions(None, "clip-sdxl")
    with pytest.raises(UserError, match="needs captioned data") as info:
        conditioner.from_data(torch.zeros(1, 3, 8, 8), torch.Generator())
    assert "\n" not in str(info.value)
    got = conditioner.from_data(torch.zeros(2, 3, 8, 8), torch.Generator(), captions=("a", "b"))
    assert torch.equal(got["text"], conditioner(["a", "b"])["text"])
