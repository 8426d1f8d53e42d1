"""The self-contained text conditioner: tokens, masking, the null prompt, training with the
model (its weights live in the model's checkpoint), and condition dropout."""

import pytest
import torch

from diffplug import (
    TrainConfig,
    Trainer,
    UserError,
    default_registry,
    digits,
    load_component,
    read_metadata,
    recorded_conditioner,
    train,
)
from diffplug_imagen.text import (
    DIGIT_PHRASINGS,
    PAD,
    SUMMARY,
    TextConditioner,
    TextConfig,
    digit_prompt,
)
from diffplug_imagen.unet import EfficientUNet, EfficientUNetConfig


def ddpm_method():
    """DDPM's training method, by name: another plugin is reached only through the registry."""
    return default_registry().load("method", "ddpm")()


def text_model(**kw):
    return EfficientUNet(EfficientUNetConfig(**{"size": 8, "width": 16, "text_dim": 32, **kw}))


def text_conditioner(**kw):
    torch.manual_seed(0)
    cond = TextConditioner(TextConfig(**{"dim": 32, "max_tokens": 12, **kw}))
    cond.name = "text"
    return cond


def test_tokens_are_normalised_bytes_after_a_summary_token_and_cut_to_length():
    cond = text_conditioner()
    ids = cond.tokenize(["A  Handwritten\tSeven", "", None, "x" * 40])
    assert ids.shape == (4, 13)
    assert (ids[:, 0] == SUMMARY).all()
    expected = [b + 1 for b in b"a handwritten"[:12]]
    assert ids[0, 1:].tolist() == expected
    assert (ids[1, 1:] == PAD).all() and (ids[2, 1:] == PAD).all()
    assert (ids[3, 1:] == ord("x") + 1).all()  # cut to max_tokens, not refused
    with pytest.raises(UserError, match="prompt 0 must be a string"):
        cond.tokenize([7])


def test_word_tokens_hash_each_word_to_two_rows_the_same_in_every_process():
    cond = text_conditioner(tokens="words", buckets=64, max_tokens=6)
    ids = cond.tokenize(["The flag of  JAPAN", "flag: japan!", "", "a b c d e f g"])
    assert ids.shape == (4, 7, 2)
    assert (ids[:, 0] == cond.summary).all() and cond.summary == cond.tokens.num_embeddings - 1
    words = ids[0, 1:5]
    assert ((words[:, 0] >= 1) & (words[:, 0] <= 64)).all()  # first table
    assert ((words[:, 1] >= 65) & (words[:, 1] <= 128)).all()  # second table
    assert (ids[0, 5:] == PAD).all()
    # a word's ids depend on the word alone: case, spacing and neighbours do not move them
    assert ids[1, 1].tolist() == ids[0, 2].tolist()  # "flag"
    assert ids[1, 3].tolist() == ids[0, 4].tolist()  # "japan"
    assert ids[1, 2].tolist() != ids[1, 4].tolist()  # ":" and "!" are words of their own
    assert (ids[2, 1:] == PAD).all()
    # blake2b, not Python's salted hash(): the same ids in every process (pinned values)
    assert ids[0, 4].tolist() == hashed_ids("japan", 64)
    with pytest.raises(UserError, match="prompt 0 is 7 words, but this model's encoder reads"):
        cond(["a b c d e f g"])


def test_word_tokens_take_any_unicode():
    cond = text_conditioner(tokens="words", buckets=64).eval()
    out = cond(["\x00 \ud800 \u202e 🍎 日本の旗", "🍎"])
    assert torch.isfinite(out["text"]).all()
    assert out["text_mask"][0].sum() == 1 + 5 and out["text_mask"][1].sum() == 2


def hashed_ids(word, buckets):
    import hashlib

    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    a, b = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    return [1 + a % buckets, 1 + buckets + b % buckets]


def test_word_tokens_encode_train_and_keep_padding_masked():
    cond = text_conditioner(tokens="words", buckets=64).eval()
    out = cond(["a red apple", "the flag of japan"])
    assert out["text_mask"][0].tolist() == [True] * 4 + [False] * 9
    alone = cond(["a red apple"])
    torch.testing.assert_close(alone["text_pooled"][0], out["text_pooled"][0], rtol=0, atol=1e-6)
    null = cond.null(1)
    torch.testing.assert_close(cond([""])["text_pooled"], null["text_pooled"], rtol=0, atol=0)
    assert not torch.allclose(cond(["japan"])["text_pooled"], cond(["apple"])["text_pooled"])


def test_padding_is_masked_and_a_prompt_does_not_depend_on_its_batch():
    cond = text_conditioner().eval()
    out = cond(["seven", "the digit 3"])
    assert out["text_mask"][0].tolist() == [True] * 6 + [False] * 7
    alone = cond(["seven"])
    torch.testing.assert_close(alone["text"][0, :6], out["text"][0, :6], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone["text_pooled"][0], out["text_pooled"][0], rtol=0, atol=1e-6)
    with torch.no_grad():  # what the padding embeds as must not matter
        cond.tokens.weight[PAD] += 5.0
    moved = cond(["seven"])
    torch.testing.assert_close(moved["text_pooled"], alone["text_pooled"], rtol=0, atol=1e-5)


def test_empty_and_missing_prompts_are_the_null_condition():
    cond = text_conditioner().eval()
    null = cond.null(2)
    for prompt in ("", None, "   "):
        got = cond([prompt, prompt])
        torch.testing.assert_close(got["text_pooled"], null["text_pooled"], rtol=0, atol=0)
        assert got["text_mask"][:, 1:].sum() == 0
    assert not torch.allclose(cond(["seven"])["text_pooled"], null["text_pooled"][:1])


def test_from_data_phrases_labels_with_the_generator_and_needs_labels():
    cond = text_conditioner().eval()
    labels = torch.tensor([7, 3, 0, 9])
    a = cond.from_data(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(1), labels)
    b = cond.from_data(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(1), labels)
    assert torch.equal(a["text"], b["text"])
    phrasing = torch.randint(len(DIGIT_PHRASINGS), (4,), generator=torch.Generator().manual_seed(1))
    prompts = [digit_prompt(y, p) for y, p in zip(labels.tolist(), phrasing.tolist())]
    # training phrasings longer than the encoder reads are cut, as the model was trained
    torch.testing.assert_close(a["text"], cond.encode(cond.tokenize(prompts))["text"], rtol=0,
                               atol=0)  # fmt: skip
    with pytest.raises(UserError, match="reads at most 12"):  # at sampling: refused
        cond(prompts)
    assert digit_prompt(7, 2) == "a handwritten seven" and digit_prompt(7, 3) == "the digit 7"
    with pytest.raises(UserError, match="needs labelled data"):
        cond.from_data(torch.zeros(1, 1, 8, 8), torch.Generator(), None)
    with pytest.raises(UserError, match="labels 0..9"):
        cond.from_data(torch.zeros(1, 1, 8, 8), torch.Generator(), torch.tensor([12]))


def test_from_data_uses_captions_when_the_data_has_them_unless_told_digits():
    x0, labels = torch.zeros(2, 1, 8, 8), torch.tensor([7, 3])
    captions = ["a red apple", "the flag of Japan"]
    auto = text_conditioner().eval()
    got = auto.from_data(x0, torch.Generator(), labels, captions=captions)
    assert torch.equal(got["text"], auto.encode(auto.tokenize(captions))["text"])
    digits_only = text_conditioner(prompts="digits").eval()
    g = torch.Generator().manual_seed(1)
    got = digits_only.from_data(x0, g, labels, captions=captions)
    want = auto.from_data(x0, torch.Generator().manual_seed(1), labels)
    assert torch.equal(got["text"], want["text"])
    strict = text_conditioner(prompts="captions")
    with pytest.raises(UserError, match="needs captioned data"):
        strict.from_data(x0, torch.Generator(), labels)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_condition_dropout_swaps_in_the_null_condition(p):
    cond = text_conditioner()
    trainer = Trainer(text_model(), ddpm_method(), digits("train", 8),
                      TrainConfig(batch_size=6, cond_dropout=p), conditioner=cond)  # fmt: skip
    _, got = trainer.batch()
    null = cond.null(6)
    dropped = torch.isclose(got["text_pooled"], null["text_pooled"]).all(1)
    assert dropped.all() if p == 1.0 else not dropped.any()


def test_a_trained_conditioner_saves_into_the_model_file_and_reloads_exactly(tmp_path):
    cond = text_conditioner()
    before = {k: v.clone() for k, v in cond.state_dict().items()}
    torch.manual_seed(0)
    model = text_model()
    train(model, ddpm_method(), digits("train", 8), TrainConfig(batch_size=8, steps=3,
          warmup=1), tmp_path, progress=False, conditioner=cond)  # fmt: skip
    assert any(not torch.equal(before[k], v) for k, v in cond.state_dict().items())  # it learned
    path = tmp_path / "model.safetensors"
    record = read_metadata(path)["extra"]["conditioner"]
    assert record["weights"] is True and record["name"] == "text"
    loaded = load_component(path, kind="denoiser")
    again = recorded_conditioner(loaded)
    assert isinstance(again, TextConditioner) and not again.training
    # the file holds the EMA weights of both parts
    ema = {
        k[len("conditioner.") :]: v for k, v in _file(path).items() if k.startswith("conditioner.")
    }
    for k, v in again.state_dict().items():
        assert torch.equal(v, ema[k])


def test_resume_with_a_trained_conditioner_is_exact(tmp_path):
    def run(out, stop=None, resume=False):
        torch.manual_seed(0)
        cond, model = text_conditioner(), text_model()
        train(model, ddpm_method(), digits("train", 8), TrainConfig(batch_size=8, steps=4,
              warmup=1), out, progress=False, conditioner=cond, stop_after=stop,
              resume=resume)  # fmt: skip
        return cond, model

    cond_a, model_a = run(tmp_path / "a")
    run(tmp_path / "b", stop=2)
    cond_b, model_b = run(tmp_path / "b", resume=True)
    for x, y in zip(cond_a.state_dict().values(), cond_b.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(x, y)


def _file(path):
    from diffplug import load_tensors

    return load_tensors(path)
