"""Feedback while training: metrics.jsonl (its values, its truncation on resume) and preview
grids from the EMA weights that leave the run exactly as it would have been without them."""

import json

import numpy as np
import pytest
import torch
from cliutil import run_cli
from coreonly import ENV, core_only
from fixture_tiny_model import TinyConfig, TinyDenoiser, UniformVP
from PIL import Image

from diffplug import Conditioner
from diffplug.checkpoint import load_tensors
from diffplug.data import Dataset, digits
from diffplug.errors import UserError
from diffplug.previews import PreviewConfig, Previewer
from diffplug.training import TrainConfig, Trainer, lr_at, train
from diffplug.trainlog import read


@pytest.fixture(autouse=True)
def _core_only():
    with core_only():
        yield


def tiny(seed=0, **config):
    torch.manual_seed(seed)
    return TinyDenoiser(TinyConfig(size=8, widths=[8], **config))


def data():
    return digits("train", 8)


def _weights(out):
    tensors = {"model." + k: v for k, v in load_tensors(out / "model.safetensors").items()}
    latest = (out / "latest").read_text()
    for name in ("raw", "ema", "optimizer"):
        tensors |= {
            f"{name}.{k}": v for k, v in load_tensors(out / latest / f"{name}.safetensors").items()
        }
    return tensors


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# -- metrics.jsonl ----------------------------------------------------------------------------


def test_metrics_lines_hold_the_interval_means_lr_grad_norm_and_ema_decay(tmp_path):
    config = TrainConfig(steps=25, batch_size=16, warmup=5, ema_decay=0.99, grad_clip=1e-6)
    result = train(tiny(), UniformVP(), data(), config, tmp_path, progress=False, log_every=10)
    lines = read(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [10, 20]
    for line, (a, b) in zip(lines, [(0, 10), (10, 20)]):
        assert line["loss"] == pytest.approx(sum(result.losses[a:b]) / (b - a), rel=1e-5)
        assert line["lr"] == pytest.approx(lr_at(config, b - 1))
        assert line["ema_decay"] == pytest.approx(min(0.99, b / (9 + b)))
        # the norm before clipping (clipped to 1e-6, the gradients are far larger)
        assert line["grad_norm"] > 1e-3
        assert line["images_per_s"] > 0 and line["elapsed_s"] > 0
    assert set(lines[0]) == {"step", "loss", "grad_norm", "lr", "ema_decay", "images_per_s",
                             "elapsed_s"}  # fmt: skip


def test_the_grad_norm_is_the_total_norm_of_the_step(tmp_path):
    trainer = Trainer(tiny(), UniformVP(), data(), TrainConfig(batch_size=8, grad_clip=0.0))
    trainer.train_step()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params]))
    torch.testing.assert_close(trainer.grad_norm, expected)
    trainer = Trainer(tiny(), UniformVP(), data(), TrainConfig(batch_size=8, grad_clip=1e-6))
    trainer.train_step()
    assert float(trainer.grad_norm) > 1e-3  # clip_grad_norm_'s return: before clipping


def test_no_metrics_file_with_log_every_zero(tmp_path):
    train(tiny(), UniformVP(), data(), TrainConfig(steps=12, batch_size=4), tmp_path,
          progress=False, log_every=0)  # fmt: skip
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_drops_the_lines_beyond_the_resumed_step(tmp_path):
    config = TrainConfig(steps=20, batch_size=8, checkpoint_every=100)
    train(tiny(), UniformVP(), data(), config, tmp_path, progress=False, log_every=5,
          stop_after=10)  # fmt: skip
    assert [line["step"] for line in read(tmp_path / "metrics.jsonl")] == [5, 10]
    # as if the run had logged on past its checkpoint and been killed mid-line
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 15, "loss": 9.0}) + "\n" + '{"step": 2')
    train(tiny(seed=3), UniformVP(), data(), config, tmp_path, progress=False, log_every=5,
          resume=True)  # fmt: skip
    lines = read(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert lines[2]["loss"] != 9.0


def test_the_cli_writes_metrics_and_previews(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--method", "uniform-vp", "--widths", "8", "--steps", "6",
                     "--batch-size", "4", "--log-every", "2", "--preview-every", "3",
                     "--preview-steps", "2", "--preview-count", "4", "-q", "--out", str(out),
                     env=ENV)  # fmt: skip
    assert result.code == 0, result.err
    assert [line["step"] for line in read(out / "metrics.jsonl")] == [2, 4, 6]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step-3.png", "step-6.png"]
    # --overwrite starts the feedback over too
    result = run_cli("train", "--method", "uniform-vp", "--widths", "8", "--steps", "2",
                     "--batch-size", "4", "--log-every", "1", "-q", "--overwrite", "--out",
                     str(out), env=ENV)  # fmt: skip
    assert result.code == 0, result.err
    assert [line["step"] for line in read(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "previews").exists()


# -- previews ---------------------------------------------------------------------------------


def test_previews_are_written_from_the_ema_weights_with_fixed_seeds(tmp_path):
    config = TrainConfig(steps=10, batch_size=8, checkpoint_every=100)
    preview = PreviewConfig(every=5, steps=3, count=4)
    train(tiny(), UniformVP(), data(), config, tmp_path / "a", progress=False, preview=preview)
    names = sorted(p.name for p in (tmp_path / "a" / "previews").iterdir())
    assert names == ["step-10.png", "step-5.png"]  # nothing half-written left beside them
    with Image.open(tmp_path / "a" / "previews" / "step-10.png") as im:
        recipe = json.loads(im.text["diffplug.recipe"])["preview"]
        grid = np.asarray(im.convert("L"))
    assert recipe["step"] == 10 and recipe["seeds"] == [0, 1, 2, 3]
    assert recipe["sampler"] == "fixture-ddim" and recipe["steps"] == 3
    assert grid.std() > 0  # samples, not a blank canvas
    # the same weights draw the same grid; other (raw, not EMA) weights another
    train(tiny(), UniformVP(), data(), config, tmp_path / "b", progress=False, preview=preview)
    same = (tmp_path / "b" / "previews" / "step-10.png").read_bytes()
    assert same == (tmp_path / "a" / "previews" / "step-10.png").read_bytes()
    trainer = Trainer(tiny(), UniformVP(), data(), config)
    for _ in range(10):
        trainer.train_step()
    previewer = Previewer(preview, trainer, data())
    previewer.write(trainer, tmp_path / "c")
    assert (tmp_path / "c" / "previews" / "step-10.png").read_bytes() == same
    torch._foreach_copy_(trainer.ema, [p.detach() for p in trainer.params])  # EMA := raw
    previewer.write(trainer, tmp_path / "c")
    assert (tmp_path / "c" / "previews" / "step-10.png").read_bytes() != same


def test_previews_leave_the_run_bit_for_bit_and_resume_exactly(tmp_path):
    config = TrainConfig(steps=12, batch_size=8, warmup=3, checkpoint_every=100)
    preview = PreviewConfig(every=4, steps=2, count=2)
    train(tiny(), UniformVP(), data(), config, tmp_path / "plain", progress=False)
    train(tiny(), UniformVP(), data(), config, tmp_path / "whole", progress=False, preview=preview)
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "whole"))
    train(tiny(), UniformVP(), data(), config, tmp_path / "half", progress=False, preview=preview,
          stop_after=6)  # fmt: skip
    train(tiny(seed=9), UniformVP(), data(), config, tmp_path / "half", progress=False,
          preview=preview, resume=True)  # fmt: skip
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "half"))
    for name in ("step-8.png", "step-12.png"):
        a = (tmp_path / "whole" / "previews" / name).read_bytes()
        assert a == (tmp_path / "half" / "previews" / name).read_bytes()


def test_a_preview_restores_the_trained_weights_and_every_modules_mode(tmp_path):
    trainer = Trainer(tiny(), UniformVP(), data(), TrainConfig(batch_size=8))
    trainer.train_step()
    trainer.model.convs[0].eval()  # a frozen part the trainer keeps in eval mode
    before = [p.detach().clone() for p in trainer.params]
    modes = [m.training for m in trainer.model.modules()]
    Previewer(PreviewConfig(every=1, steps=2, count=2), trainer, data()).write(trainer, tmp_path)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert [m.training for m in trainer.model.modules()] == modes


class FakeText(Conditioner):
    """A text conditioner whose condition the tiny model ignores; it records its prompts."""

    kind = "text"

    def __init__(self):
        super().__init__()
        self.prompts = []

    def forward(self, inputs):
        self.prompts.append(list(inputs))
        return {"text": torch.zeros(len(inputs), 1)}

    def from_data(self, x0, generator, labels=None, captions=None):
        return self.forward(list(captions))


def test_a_text_model_previews_the_datas_first_captions():
    images = digits("train", 8).images[:6]
    captioned = Dataset(images, captions=[[f"first {i}", f"second {i}"] for i in range(6)])
    conditioner = FakeText()
    trainer = Trainer(tiny(conditioning="text"), UniformVP(), captioned, TrainConfig(batch_size=4),
                      conditioner=conditioner)  # fmt: skip
    previewer = Previewer(PreviewConfig(every=1, count=4), trainer, captioned)
    assert previewer.inputs == ["first 0", "first 1", "first 2", "first 3"]
    # labelled data without captions: each class's name as its prompt
    labelled = digits("train", 8)
    previewer = Previewer(PreviewConfig(every=1, count=12), trainer, labelled)
    assert previewer.inputs == [str(k % 10) for k in range(12)]


def test_a_class_model_previews_one_sample_per_class_and_an_autoencoder_none(tmp_path):
    class ClassTiny(TinyDenoiser):
        null_label = 10

        def forward(self, x, t, cond=None):
            self.seen = cond["labels"].tolist()
            return super().forward(x, t, cond)

    torch.manual_seed(0)
    model = ClassTiny(TinyConfig(size=8, widths=[8], conditioning="class"))
    trainer = Trainer(model, UniformVP(), data(), TrainConfig(batch_size=4))
    previewer = Previewer(PreviewConfig(every=1, steps=1, count=4), trainer, data())
    assert previewer.inputs == list(range(10))
    previewer.write(trainer, tmp_path)
    assert model.seen[:10] == list(range(10))  # the labels reach it, one per class (then padding)
    trainer.kind = "autoencoder"
    with pytest.raises(UserError, match="samples a denoiser"):
        Previewer(PreviewConfig(every=1), trainer, data())
