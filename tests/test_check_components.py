"""``check_conditioner`` and ``check_autoencoder`` are proven like ``check_sampler``: every
shipped conditioner and autoencoder passes them, and planted bugs (a wrong shape, a null
condition of the wrong shape, non-determinism, a batch-dependent conditioner, an input
ignored, a decode that ignores its latents, a wrong latent shape or scale) each fail with a
one-line reason."""

from __future__ import annotations

import dataclasses
import itertools
import string

import pytest
import torch

import diffplug
from diffplug import LowResConditioner, load_model, read_metadata, recorded_conditioner
from diffplug.data import digits, resize
from diffplug.latent import load_autoencoder, recorded_autoencoder
from diffplug.testing import check_autoencoder, check_conditioner, smooth_images
from diffplug.testing.threads import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


REGISTRY = diffplug.default_registry()
IMAGES = list(digits("heldout", 32).images[:4])  # (1, 32, 32) condition images in [-1, 1]
PROMPTS = ["a handwritten seven", "3", "the digit 1", "nine"]
#: inputs for every shipped conditioner, by registered name
INPUTS = {
    "none": [1, 2],
    "lowres": IMAGES,
    "noise-aug": IMAGES,
    "text": PROMPTS,
    "t5": PROMPTS,
    "clip": PROMPTS,
    "clip-sdxl": PROMPTS,  # built from a pipeline folder's two encoders: tests/test_sd_xl.py
}


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- every shipped conditioner passes ------------------------------------------------------


def test_every_registered_conditioner_has_a_case_here():
    assert {e.name for e in REGISTRY.entries("conditioner")} <= set(INPUTS)


@pytest.mark.parametrize("name", ["none", "lowres", "noise-aug", "text"])
def test_a_shipped_conditioner_at_its_defaults_passes(name):
    conditioner = REGISTRY.load("conditioner", name)()
    conditioner.name = name
    check_conditioner(conditioner, INPUTS[name])


def test_the_image_conditioners_give_the_declared_shapes():
    lowres = LowResConditioner.from_options(low_size=8, image_size=32)
    spec = check_conditioner(lowres, IMAGES, shapes={"image": (1, 8, 8)},
                             dtypes={"image": torch.float32})  # fmt: skip
    assert spec == {"image": ((1, 8, 8), torch.float32)}
    aug = REGISTRY.load("conditioner", "noise-aug").from_options(level=0.3, sweep=[0.1, 0.5])
    for variant in aug.sweep():
        check_conditioner(variant, IMAGES, shapes={"image": (1, 8, 8), "aug_level": ()})


def _shipped_models_with_a_conditioner():
    for entry in REGISTRY.entries("pretrained"):
        meta = read_metadata(entry.load())
        if meta["kind"] == "denoiser" and meta.get("extra", {}).get("conditioner"):
            yield entry.name


@pytest.mark.parametrize("model", list(_shipped_models_with_a_conditioner()))
def test_the_conditioner_of_every_shipped_model_passes(model):
    denoiser, _ = load_model(REGISTRY, model)
    conditioner = recorded_conditioner(denoiser, REGISTRY)
    inputs = INPUTS[conditioner.name]
    if conditioner.name in ("lowres", "noise-aug") and conditioner.config.channels == 3:
        inputs = [x.expand(3, -1, -1) for x in inputs]  # an RGB stage (the emoji's)
    spec = check_conditioner(conditioner, inputs)
    if denoiser.conditioning == "text":  # the trained encoder's width is the U-Net's
        assert spec["text_pooled"][0] == (denoiser.config.text_dim,)


def test_the_t5_conditioner_passes(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "a", "handwritten", "seven", "3", "the", "digit", "1",
             "nine"]  # fmt: skip
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(words), d_model=16, d_ff=32, num_layers=2,
                                   num_heads=2, d_kv=8, dropout_rate=0.0)  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(tmp_path, safe_serialization=True)
    t5 = REGISTRY.load("conditioner", "t5").from_options(path=str(tmp_path), max_tokens=8)
    spec = check_conditioner(t5, PROMPTS)
    assert spec["text"] == ((8, 16), torch.float32)


def test_the_clip_conditioner_passes(tmp_path):
    """On a tiny random CLIP text model with a character-level tokenizer, built here."""
    if "clip" not in {e.name for e in REGISTRY.entries("conditioner")}:
        pytest.skip("diffplug-clip is not installed")
    transformers = pytest.importorskip("transformers")
    chars = string.ascii_lowercase + string.digits
    vocab = {c + end: i for i, (c, end) in enumerate(itertools.product(chars, ("", "</w>")))}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    clip = REGISTRY.load("conditioner", "clip").from_options(clip_path=str(tmp_path))
    spec = check_conditioner(clip, PROMPTS)
    assert spec["text"] == ((77, 32), torch.float32)


def test_the_conditioner_is_left_in_the_mode_it_was_in():
    text = REGISTRY.load("conditioner", "text")()
    text.train()
    check_conditioner(text, PROMPTS)
    assert text.training and all(m.training for m in text.modules())


# -- planted conditioner bugs ------------------------------------------------------------


class TwiceTheSize(LowResConditioner):
    def forward(self, inputs):
        return {"image": resize(super().forward(inputs)["image"], 2 * self.config.low_size)}


class IgnoresInput(LowResConditioner):
    def forward(self, inputs):
        return super().forward([None] * len(inputs))  # every input gives the null condition


class BroadcastBatch(LowResConditioner):
    def forward(self, inputs):
        return {"image": super().forward(inputs)["image"][:1]}  # one row for the batch


class SmallNull(LowResConditioner):
    def null(self, batch):
        return {"image": torch.zeros(batch, 1, 4, 4)}


class NoNull(LowResConditioner):
    def null(self, batch):
        return None


class Jitter(LowResConditioner):
    def forward(self, inputs):
        image = super().forward(inputs)["image"]
        return {"image": (image + 1e-3 * torch.randn_like(image)).clamp(-1, 1)}  # global RNG


class BatchNormalised(LowResConditioner):
    def forward(self, inputs):
        image = super().forward(inputs)["image"]
        return {"image": (image - image.mean(0, keepdim=True)).clamp(-1, 1)}  # the batch's mean


class Unscaled(LowResConditioner):
    def forward(self, inputs):
        return {"image": (super().forward(inputs)["image"] + 1) * 127.5}  # [0, 255]


def noise_aug(cls_body):
    base = REGISTRY.load("conditioner", "noise-aug")
    return type("Planted", (base,), cls_body)(base.Config(level=0.3))


def _unseeded(self, inputs, seeds):
    image = LowResConditioner.forward(self, inputs)["image"]
    level = torch.full((len(inputs),), self.config.level, dtype=torch.float64)
    return self.augment(image, level, torch.randn_like(image))  # not from the seeds


def _one_stream(self, inputs, seeds):
    image = LowResConditioner.forward(self, inputs)["image"]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seeds[0]))
    level = torch.full((len(inputs),), self.config.level, dtype=torch.float64)
    return self.augment(image, level, noise)  # one stream for the batch: depends on it


def _no_level_in_null(self, batch):
    return {"image": torch.zeros(batch, 1, 8, 8)}


PLANTED_CONDITIONERS = {
    "wrong-shape": (TwiceTheSize, r"\['image'\] is \(1, 16, 16\) per sample, declared \(1, 8, 8\)"),
    "a-row-for-the-batch": (BroadcastBatch, "a batch of 4 must give 4 rows"),
    "null-of-the-wrong-shape": (SmallNull, r"null\(1\)\['image'\] is \(1, 4, 4\)"),
    "no-null": (NoNull, r"null\(1\) returned None"),
    "non-deterministic": (Jitter, r"forward\(inputs\) is not deterministic"),
    "batch-dependent": (BatchNormalised, "must not depend on its batch"),
    "ignores-its-input": (IgnoresInput, "inputs 0 and 1 .* gave the same condition"),
    "outside-the-image-contract": (Unscaled, r"outside \[-1, 1\]"),
}


@pytest.mark.parametrize("bug", list(PLANTED_CONDITIONERS))
def test_each_planted_conditioner_bug_fails(bug):
    cls, message = PLANTED_CONDITIONERS[bug]
    conditioner = cls(LowResConditioner.Config(low_size=8, image_size=32))
    with pytest.raises(AssertionError, match=message) as info:
        check_conditioner(conditioner, IMAGES, shapes={"image": (1, 8, 8)})
    assert one_line(info).startswith(f"conditioner {cls.__name__}: ")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"condition": _unseeded}, r"condition\(inputs, seeds\) is not deterministic"),
        ({"condition": _one_stream}, "condition: sample 0's .* must not depend on its batch"),
        ({"null": _no_level_in_null}, r"null\(1\) gives keys \['image'\]"),
    ],
    ids=["noise-not-from-the-seeds", "one-noise-stream-per-batch", "null-without-aug-level"],
)
def test_planted_bugs_in_a_noising_conditioner_fail(body, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_conditioner(noise_aug(body), IMAGES)
    one_line(info)


def test_a_text_conditioner_that_pads_to_the_batch_fails():
    """Unmasked padding to the longest prompt of the batch: each prompt's embedding then
    depends on the others."""
    base = REGISTRY.load("conditioner", "text")

    class PadsToTheBatch(base):
        def encode(self, ids):
            ids = ids[:, : int((ids != 0).sum(1).max())]
            h = self.tokens(ids.to(self.positions.device)) + self.positions[: ids.shape[1]]
            h = self.norm(self.encoder(h))
            return {"text": h.mean(1, keepdim=True), "text_pooled": h[:, 0]}

    with pytest.raises(AssertionError, match="must not depend on its batch") as info:
        check_conditioner(PadsToTheBatch(), PROMPTS)
    one_line(info)


def test_an_unconditional_conditioner_returns_none():
    class Talkative(diffplug.Conditioner):
        def forward(self, inputs):
            return {"x": torch.zeros(len(inputs), 1)}

    with pytest.raises(AssertionError, match="kind None .* but forward returned"):
        check_conditioner(Talkative(), [1, 2])


def test_check_conditioner_needs_two_real_inputs():
    lowres = LowResConditioner()
    with pytest.raises(AssertionError, match="at least two different inputs"):
        check_conditioner(lowres, IMAGES[:1])
    with pytest.raises(AssertionError, match="None is the null condition"):
        check_conditioner(lowres, [IMAGES[0], None])


# -- every shipped autoencoder passes ------------------------------------------------------


def vae_digits():
    return load_autoencoder("vae-digits", REGISTRY)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 32, 32), (3, 16, 12)])
def test_the_identity_autoencoder_passes(shape):
    report = check_autoencoder(REGISTRY.load("autoencoder", "identity")(), shape)
    assert report.round_trip_rms == 0 and report.latent_std is None


def test_every_shipped_pretrained_autoencoder_passes_on_digits():
    checked = 0
    for entry in REGISTRY.entries("pretrained"):
        if read_metadata(entry.load())["kind"] != "autoencoder":
            continue
        ae = load_autoencoder(entry.name, REGISTRY)
        shape = (ae.config.in_channels, 32, 32)
        report = check_autoencoder(ae, shape, data=digits("heldout", 32).images)
        assert report.round_trip_rms < 0.12 and 0.9 < report.latent_std < 1.1, report
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("model", ["adm-latent-digits", "imagen-latent-digits"])
def test_the_autoencoder_of_every_shipped_latent_model_passes_at_its_shape(model):
    denoiser, _ = load_model(REGISTRY, model)
    ae = recorded_autoencoder(denoiser, REGISTRY)
    report = check_autoencoder(ae, ae.image_shape(denoiser.sample_shape))
    assert report.latent_shape == denoiser.sample_shape


def test_the_default_tolerance_is_met_by_the_shipped_vae_with_margin():
    report = check_autoencoder(vae_digits(), (1, 32, 32))
    assert report.round_trip_rms < 0.12, report  # the default tolerance is 0.15
    with pytest.raises(AssertionError, match="RMS error 0.1"):
        check_autoencoder(vae_digits(), (1, 32, 32), tolerance=0.05)


def test_smooth_images_are_smooth_and_the_same_everywhere():
    x = smooth_images((2, 64, 64), n=3)
    assert x.shape == (3, 2, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, smooth_images((2, 64, 64), n=3))
    for dim in (-1, -2):  # no edges: neighbours differ by less than a fifth of the range
        assert float(x.diff(dim=dim).abs().max()) < 0.4
    assert float(x.std()) > 0.3 and not torch.equal(x[0], x[1])


# -- planted autoencoder bugs --------------------------------------------------------------


def _zeros_decoded(self, z):
    return super(type(self), self).decode(torch.zeros_like(z))


def _batch_centred_encode(self, x):
    return super(type(self), self).encode(x - x.mean(0) / 4)


def planted_vae(body=None, **config):
    """vae-digits' weights in a subclass with ``body`` overriding methods, and ``config``
    changed."""
    ae = vae_digits()
    cls = type(ae) if body is None else type("Planted", (type(ae),), body)
    bug = cls(dataclasses.replace(ae.config, **config))
    bug.load_state_dict(ae.state_dict())
    return bug.eval()


PLANTED_AUTOENCODERS = {
    "decode-ignores-its-input": (
        {"decode": _zeros_decoded},
        {},
        r"decode\(encode\(x\)\) is not x: RMS error",
    ),
    "encode-and-decode-disagree-on-the-scale": (
        {"decode": lambda self, z: self.decode_unscaled(z)},
        {},
        r"decode\(encode\(x\)\) is not x",
    ),
    "declares-the-wrong-downsampling": (
        {
            "latent_shape": lambda self, s: (4, s[1] // 2, s[2] // 2),
            "image_shape": lambda self, s: (1, s[1] * 2, s[2] * 2),
        },
        {},
        r"encode gave latents of shape \(4, 8, 8\) .* latent_shape declares \(4, 16, 16\)",
    ),
    "shapes-that-do-not-invert": (
        {"latent_shape": lambda self, s: (4, s[1] // 2, s[2] // 2)},
        {},
        r"latent_shape\(1, 32, 32\) is \(4, 16, 16\), whose image_shape is \(1, 64, 64\)",
    ),
    "sd-scaling-factor-on-another-vae": (
        None,
        {"scaling_factor": 0.18215},
        r"latents of typical data have std 0.0906, not about 1 .* by 11.03",
    ),
    "non-deterministic-encode": (
        None,
        {"sample_posterior": True},
        "encode is not deterministic",
    ),
    "batch-dependent-encode": (
        {"encode": _batch_centred_encode},
        {},
        "encode of a sample alone differs from it in a batch",
    ),
}


@pytest.mark.parametrize("bug", list(PLANTED_AUTOENCODERS))
def test_each_planted_autoencoder_bug_fails(bug):
    body, config, message = PLANTED_AUTOENCODERS[bug]
    with pytest.raises(AssertionError, match=message) as info:
        check_autoencoder(planted_vae(body, **config), (1, 32, 32))
    assert one_line(info).startswith("autoencoder ")


def test_an_uncalibrated_scale_fails_on_typical_data():
    """vae-digits before calibration (scaling factor 1): its digits' latents have std 0.38."""
    with pytest.raises(AssertionError, match=r"std 0.3\d+") as info:
        check_autoencoder(planted_vae(scaling_factor=1.0), (1, 32, 32),
                          data=digits("heldout", 32).images)  # fmt: skip
    one_line(info)


def test_an_untrained_kl_vae_fails_the_round_trip():
    untrained = REGISTRY.load("autoencoder", "kl-vae")()
    with pytest.raises(AssertionError, match="is not x"):
        check_autoencoder(untrained, (1, 32, 32))
