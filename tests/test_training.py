"""The training loop: learning, EMA, exact resume, atomic checkpoints, the train CLI."""

import json

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from coreonly import ENV, core_only
from fixture_tiny_model import TinyConfig, TinyDenoiser, UniformVP

from diffplug import Conditioner
from diffplug.checkpoint import load_component, load_tensors, read_metadata
from diffplug.data import Dataset, digits
from diffplug.training import TrainConfig, Trainer, draw_captions, lr_at, train


@pytest.fixture(autouse=True)
def _core_only():
    """Core and the fixture plugins only: checkpoints name the fixture denoiser's plugin."""
    with core_only():
        yield


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyDenoiser(TinyConfig(size=8, widths=[8, 8]))


def data():
    return digits("train", 8)


def test_loss_decreases_on_a_tiny_run(tmp_path):
    config = TrainConfig(steps=150, batch_size=64, lr=2e-3, warmup=10, checkpoint_every=1000)
    result = train(tiny_model(), UniformVP(), data(), config, tmp_path, progress=False)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    assert result.steps == 150 and result.images_per_second > 0


def test_ema_follows_the_weights_with_the_warmup_decay():
    config = TrainConfig(steps=3, batch_size=8, ema_decay=0.9, ema_warmup=True)
    trainer = Trainer(tiny_model(), UniformVP(), data(), config)
    params = list(trainer.model.parameters())
    expected = [p.detach().clone() for p in params]
    for step in range(3):
        trainer.train_step()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [e * decay + p.detach() * (1 - decay) for e, p in zip(expected, params)]
    for e, got in zip(expected, trainer.ema):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
    assert not torch.equal(trainer.ema[0], params[0].detach())


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=20, batch_size=16, warmup=5, checkpoint_every=10, lr=1e-3)
    train(tiny_model(), UniformVP(), data(), config, tmp_path / "one", progress=False)
    train(
        tiny_model(), UniformVP(), data(), config, tmp_path / "two", progress=False, stop_after=10
    )
    assert (tmp_path / "two" / "latest").read_text() == "state-00000010"
    train(
        tiny_model(seed=123),
        UniformVP(),
        data(),
        config,
        tmp_path / "two",
        resume=True,
        progress=False,
    )
    for name in ("model.safetensors",):
        a = load_tensors(tmp_path / "one" / name)
        b = load_tensors(tmp_path / "two" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    raw_a = load_tensors(tmp_path / "one" / "state-00000020" / "raw.safetensors")
    raw_b = load_tensors(tmp_path / "two" / "state-00000020" / "raw.safetensors")
    assert all(torch.allclose(raw_a[k], raw_b[k], atol=1e-6) for k in raw_a)


def test_checkpoints_are_complete_and_loadable(tmp_path):
    config = TrainConfig(steps=4, batch_size=8, checkpoint_every=2)
    train(tiny_model(), UniformVP(), data(), config, tmp_path, progress=False, extra={"note": "x"})
    assert (tmp_path / "latest").read_text() == "state-00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "model.safetensors",
        "state-00000004",
    ]
    state = json.loads((tmp_path / "state-00000004" / "state.json").read_text())
    assert state["step"] == 4
    meta = read_metadata(tmp_path / "model.safetensors")
    assert (
        meta["kind"] == "denoiser"
        and meta["plugin"] == "fixture-tiny-model"
        and meta["name"] == "tiny-conv"
    )
    assert meta["extra"]["note"] == "x" and meta["extra"]["step"] == 4
    model = load_component(tmp_path / "model.safetensors", kind="denoiser")
    assert isinstance(model, TinyDenoiser)
    assert model.config.widths == [8, 8] and not model.training


def test_an_interrupted_save_leaves_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    config = TrainConfig(steps=4, batch_size=8, checkpoint_every=2)
    trainer = Trainer(tiny_model(), UniformVP(), data(), config)
    trainer.train_step()
    trainer.train_step()
    trainer.save(tmp_path, {})
    trainer.train_step()
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(tmp_path, {})
    monkeypatch.setattr(st, "save_file", real)
    assert (tmp_path / "latest").read_text() == "state-00000002"
    fresh = Trainer(tiny_model(), UniformVP(), data(), config)
    fresh.load(tmp_path)
    assert fresh.step == 2


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup=10, lr=1.0, lr_schedule="cosine")
    assert lr_at(config, 0) == pytest.approx(0.1)
    assert lr_at(config, 9) == pytest.approx(1.0)
    assert lr_at(config, 10) == pytest.approx(1.0)
    assert lr_at(config, 100) == pytest.approx(0.1)


def cli(*args):
    """``diffplug ARGS`` with core and the fixture plugins only."""
    return run_cli(*args, env=ENV)


def test_train_cli_trains_resumes_and_validates(tmp_path):
    out = tmp_path / "run"
    args = (
        "train",
        "--method",
        "uniform-vp",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--widths",
        "8,8",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--out",
        str(out),
    )
    result = cli(*args)
    assert result.code == 0, result.err
    assert "0.0" in result.err and (out / "model.safetensors").exists()
    assert read_metadata(out / "model.safetensors")["config"]["widths"] == [8, 8]
    assert_clean_error(cli(*args), "--resume")
    longer = [a if a != "4" else "6" for a in args]
    assert cli(*longer, "--resume").code == 0
    assert json.loads((out / "state-00000006" / "state.json").read_text())["step"] == 6
    assert_clean_error(
        cli(*args[:-2], "--out", str(tmp_path / "x"), "--lrr", "1"),
        "no method, denoiser or loop option --lrr",
        "--lr",
    )
    assert_clean_error(cli("train", "--method", "nope"), "unknown method 'nope'")
    assert_clean_error(
        cli(
            "train",
            "--method",
            "uniform-vp",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "y"),
        ),
        "does not exist",
    )
    sample = tmp_path / "s.safetensors"
    assert (
        cli(
            "run",
            "--sampler",
            "fixture-ddim",
            "--model",
            str(out / "model.safetensors"),
            "--steps",
            "3",
            "--num-samples",
            "2",
            "-q",
            "-o",
            str(sample),
        ).code
        == 0
    )


class _RecordingConditioner(Conditioner):
    """Records the captions the trainer hands it; the condition is unused by the model."""

    kind = None

    def __init__(self, takes_captions=True):
        super().__init__()
        self.seen = []
        if not takes_captions:  # an older conditioner: from_data(x0, generator, labels)
            self.from_data = lambda x0, generator, labels=None: self.seen.append(None)

    def forward(self, inputs):
        return None

    def from_data(self, x0, generator, labels=None, captions=None):
        self.seen.append(list(captions))
        return None


def _captioned(n=12):
    images = digits("train", 8).images[:n]
    return Dataset(images, captions=[[f"image {i}", f"picture {i}"] for i in range(n)])


def test_each_batch_gives_the_conditioner_one_of_each_images_captions():
    trainer = Trainer(tiny_model(), UniformVP(), _captioned(), TrainConfig(batch_size=32),
                      conditioner=_RecordingConditioner())  # fmt: skip
    trainer.generator.manual_seed(5)
    idx = torch.randint(0, 12, (32,), generator=trainer.generator)
    trainer.generator.manual_seed(5)
    trainer.batch()
    (captions,) = trainer.conditioner.seen
    assert [c.split()[1] for c in captions] == [str(i) for i in idx.tolist()]
    assert {c.split()[0] for c in captions} == {"image", "picture"}  # both phrasings drawn


def test_caption_draws_are_uniform_and_reproducible():
    captions = [["a", "b", "c"]] * 3000
    g = torch.Generator().manual_seed(0)
    drawn = draw_captions(captions, list(range(3000)), g)
    counts = [drawn.count(c) for c in "abc"]
    assert all(abs(k - 1000) < 100 for k in counts), counts
    assert draw_captions(captions, list(range(3000)), torch.Generator().manual_seed(0)) == drawn


def test_a_conditioner_without_a_captions_parameter_is_called_without_them():
    conditioner = _RecordingConditioner(takes_captions=False)
    trainer = Trainer(tiny_model(), UniformVP(), _captioned(), TrainConfig(batch_size=4),
                      conditioner=conditioner)  # fmt: skip
    trainer.batch()
    assert conditioner.seen == [None]
