"""Class-conditional training without a conditioner: dropped labels become the UNet's own
null label (the extra embedding row), which core learns from the denoiser, not its config."""

from __future__ import annotations

import pytest

import diffplug
from diffplug import TrainConfig, Trainer, digits


def _trainer(dropout, num_classes=10):
    registry = diffplug.default_registry()
    unet = registry.load("denoiser", "unet")
    model = unet(unet.Config(size=8, width=8, heads=2, num_classes=num_classes,
                             conditioning="class"))  # fmt: skip
    method = registry.load("method", "ddpm")()
    config = TrainConfig(steps=1, batch_size=32, cond_dropout=dropout, warmup=0)
    return Trainer(model, method, digits("train", 8), config)


@pytest.mark.parametrize("dropout, dropped", [(0.0, 0), (1.0, 32)])
def test_dropped_labels_are_the_denoisers_null_label(dropout, dropped):
    trainer = _trainer(dropout)
    assert trainer.null_label == 10
    _, cond = trainer.batch()
    labels = cond["labels"]
    assert int((labels == 10).sum()) == dropped
    assert bool((labels[labels != 10] < 10).all())


def test_a_class_denoiser_without_a_null_label_is_refused_by_name():
    trainer = _trainer(0.5)
    model = trainer.model

    class NoNull(type(model)):
        null_label = property(diffplug.Denoiser.null_label.fget)

    with pytest.raises(diffplug.UserError, match="declares no null_label"):
        NoNull(model.config).null_label  # noqa: B018
    assert model.null_label == 10
