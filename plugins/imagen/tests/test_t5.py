"""The frozen T5 conditioner, on a tiny randomly initialised T5 built here (never downloaded)."""

import pytest
import torch

from diffplug import TrainConfig, Trainer, UserError, default_registry, digits
from diffplug_imagen.unet import EfficientUNet, EfficientUNetConfig

transformers = pytest.importorskip("transformers")

WORDS = ["<pad>", "</s>", "<unk>", "a", "handwritten", "seven", "three", "the", "digit", "7"]


def ddpm_method():
    """DDPM's training method, by name: another plugin is reached only through the registry."""
    return default_registry().load("method", "ddpm")()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])  # fmt: skip
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_ff=32, num_layers=2,
                                   num_heads=2, d_kv=8, dropout_rate=0.0)  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def t5(folder, **kw):
    from diffplug_imagen.t5 import T5Conditioner, T5Config

    cond = T5Conditioner(T5Config(path=str(folder), max_tokens=8, **kw))
    cond.name = "t5"
    return cond


def test_t5_embeddings_equal_the_encoder_run_directly_with_padding_masked(t5_dir):
    cond = t5(t5_dir)
    out = cond(["a handwritten seven", "7"])
    assert out["text"].shape == (2, 8, 16) and cond.dim == 16
    assert out["text_mask"].tolist()[1] == [True, True] + [False] * 6  # "7" and </s>
    model = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(t5_dir)
    for k, prompt in enumerate(["a handwritten seven", "7"]):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0]
        n = ids.shape[1]
        torch.testing.assert_close(out["text"][k, :n], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["text_pooled"][k], ref.mean(0), rtol=0, atol=1e-5)
        assert not out["text"][k, n:].any()  # padding zeroed and masked


def test_t5_null_is_the_empty_prompt(t5_dir):
    cond = t5(t5_dir)
    torch.testing.assert_close(cond.null(2)["text"], cond(["", ""])["text"], rtol=0, atol=0)


def test_t5_stays_frozen_while_a_denoiser_trains_on_it(t5_dir):
    cond = t5(t5_dir)
    before = {k: v.clone() for k, v in cond.state_dict().items()}
    torch.manual_seed(0)
    model = EfficientUNet(EfficientUNetConfig(size=8, width=16, text_dim=16))
    data = digits("train", 8)
    trainer = Trainer(model, ddpm_method(), data, TrainConfig(batch_size=4), conditioner=cond)
    for _ in range(2):
        assert torch.isfinite(trainer.train_step())
    assert not cond.encoder.training
    for k, v in cond.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(trainer.params) == len(list(model.parameters()))  # only the denoiser learns


def test_t5_refuses_missing_folders_and_pickle_only_checkpoints(tmp_path, t5_dir):
    with pytest.raises(UserError, match="must name a local folder"):
        t5(tmp_path / "nowhere")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="no .safetensors weights"):
        t5(tmp_path)
