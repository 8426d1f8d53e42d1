"""The four component interfaces: Scheduler, Denoiser, Conditioner, Autoencoder.

Each component has a ``Config`` dataclass of options (see ``diffplug.options``) and is built
from it, so a checkpoint's JSON config alone rebuilds the component.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from diffplug.errors import UserError
from diffplug.options import NoOptions, build_config, option
from diffplug.plan import Plan
from diffplug.prediction import ARITY, check_kind
from diffplug.process import Process, build_process

Cond = dict[str, torch.Tensor] | None


class _Configurable:
    Config: ClassVar[type] = NoOptions
    #: the registered name; set by ``diffplug.checkpoint`` and the registry helpers.
    name: ClassVar[str] = ""

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        """Build from loose option values (CLI strings or JSON), checked and coerced."""
        return cls(build_config(cls.Config, options, owner=f"{cls.__name__}"))


class Schedule(_Configurable, ABC):
    """The noise levels a sampler visits, chosen apart from the sampler (``--schedule``).

    A level is k-diffusion's sigma, ``s = sigma(t)/alpha(t)``; core's schedules are in
    ``diffplug.schedules``.
    """

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def levels(
        self,
        process: Process,
        steps: int,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> torch.Tensor:
        """``steps + 1`` (about: some schedules drop repeats) descending levels in float64,
        the last 0, inside the process's range or [sigma_min, sigma_max]."""


class Scheduler(_Configurable, ABC):
    """A sampler: turns a process and a step count into a ``Plan``."""

    #: steps when the user gives none (the method's own recommendation).
    default_steps: ClassVar[int] = 50
    #: whether ``plan`` walks the noise levels of ``self.schedule`` when one is chosen
    #: (``--schedule``); a sampler that cannot is refused a schedule, saying so.
    walks_noise_levels: ClassVar[bool] = False
    #: the chosen schedule (set by ``diffplug.load`` before planning), or None: the
    #: sampler's own default
    schedule: Schedule | None = None
    #: lower and upper noise levels overriding the process's (``--sigma-min/--sigma-max``)
    sigma_range: tuple[float | None, float | None] = (None, None)
    #: what ``diffplug info`` and ``check_sampler`` read: the order of accuracy in the step
    #: size (None: not declared), denoiser calls per step, whether it draws noise (None:
    #: it depends on the options, e.g. DDIM's eta)
    order: ClassVar[float | None] = None
    evaluations_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def supports(self, process: Process) -> str | None:
        """``None`` if this sampler can run on ``process``, else the reason it cannot."""
        return None

    def native_process(self) -> Process | None:
        """The process this sampler plans on when the model's own is foreign: a denoiser of
        another process is then bridged to it (``diffplug.bridge``). None: no bridging."""
        return None

    @abstractmethod
    def plan(self, process: Process, steps: int) -> Plan:
        """Every step's time and update coefficients, computed once per run."""

    def model_view(self, plan: Plan, model_process: Process) -> Any:
        """How to call the model at each step when the plan is in another parametrisation of
        the model's own process (a ``diffplug.bridge.ModelView``); None: core decides (the
        model as it is, or bridged from the sampler's native process)."""
        return None


@dataclasses.dataclass
class DenoiserConfig:
    """Options every denoiser has; a denoiser's own Config subclasses this."""

    channels: int = option(1, "image (or latent) channels", min=1)
    size: int = option(16, "image (or latent) height and width", min=1)
    prediction: str = option("eps", "what the network outputs", choices=tuple(ARITY))
    process: dict = option({"name": "vp"}, "the forward process it is trained on")
    conditioning: str | None = option(None, "conditioning kind: None, class, text or image")


class Denoiser(_Configurable, nn.Module):
    """A network ``forward(x_t, t, cond) -> prediction`` trained on one process.

    ``t`` is a float tensor of shape (B,) in the process's own time units (integer-valued
    timesteps for VP, (0, 1] for ADM). The output is one tensor of x's shape, or a tuple of
    them for paired predictions (``c_eps``).
    """

    Config: ClassVar[type] = DenoiserConfig
    #: True when each sample's output is computed apart from its batch companions, bit for
    #: bit at any batch size (an exact formula, not a network of CPU kernels): the loop then
    #: skips its fixed-size chunks (``diffplug.sampling``), which cost calls, not accuracy
    batch_invariant: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        nn.Module.__init__(self)
        self.config = config if config is not None else self.Config()
        check_kind(self.config.prediction)
        self.process: Process = build_process(self.config.process)

    @property
    def prediction(self) -> str:
        return self.config.prediction

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.size, self.config.size)

    @property
    def conditioning(self) -> str | None:
        return self.config.conditioning

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> Any:
        """The prediction for noisy ``x`` at times ``t``."""

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional half),
        for a class-conditional denoiser trained on labelled data without a conditioner."""
        raise UserError(
            f"{type(self).__name__} takes class conditioning but declares no null_label; "
            "train it with a conditioner, or give the denoiser a null_label"
        )


class Conditioner(_Configurable, nn.Module):
    """Turns user inputs (prompts, labels, images) into batched conditioning tensors.

    Hooks, each with a default: ``null`` (guidance's unconditional half and training's
    dropped conditions), ``from_data`` (conditions of a training batch), ``condition``
    (conditions at sampling, with per-sample seeds for any randomness; also how a negative
    prompt is encoded), ``align`` (conditions of different lengths made to fit one batch),
    ``sweep`` and ``score`` (sample under several variants and keep each sample's best).
    """

    #: the conditioning kind produced ("class", "text", "image"); None for unconditional.
    kind: ClassVar[str | None] = None
    #: True when the conditioner has weights trained together with the denoiser (a text
    #: encoder learned from scratch); they are saved in the model's checkpoint.
    trainable: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        nn.Module.__init__(self)
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def forward(self, inputs: Sequence[Any]) -> Cond:
        """Conditioning for a batch of inputs, one per sample."""

    def null(self, batch: int) -> Cond:
        """The 'no condition' embedding (classifier-free guidance's unconditional half, for
        a text conditioner the empty prompt's). A negative prompt replaces it at sampling:
        the loop then encodes the negative prompts with ``condition`` instead."""
        return self.forward([None] * batch)

    def align(self, conds: Sequence[Cond], inputs: Sequence[Any] = ()) -> list[Cond]:
        """Conditions made to fit one batch: the same keys and shapes but the batch, so they
        can be concatenated. The loop passes a batch's conditional parts with its null (or
        negative-prompt) parts, and ``inputs``, every input of the draw (prompts, then
        negative prompts; the same list for every batch of one draw). The default returns
        them as they are; a conditioner whose conditions vary in length pads each to the
        longest any input of the draw needs (CLIP: 75-token windows of the empty prompt),
        so that a sample's condition does not depend on its batch."""
        return list(conds)

    def drop(self, cond: Cond, dropped: torch.Tensor) -> Cond:
        """Training's condition dropout: samples where ``dropped`` (B,) is True get the null
        condition, so one model learns both halves that guidance combines."""
        if cond is None:
            return None
        cond, null = self.align([cond, self.null(len(dropped))])
        assert cond is not None and null is not None
        out = {}
        for key, value in cond.items():
            mask = dropped.to(value.device).view(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, null[key].to(value.dtype), value)
        return out

    def condition(self, inputs: Sequence[Any], seeds: Sequence[int]) -> Cond:
        """Conditions at sampling time for samples seeded ``seeds``. A conditioner that
        draws noise (augmentation) must draw it from these seeds alone, so a sample does
        not depend on its batch."""
        return self.forward(inputs)

    def sweep(self) -> list[Conditioner]:
        """Variants to sample under; the loop keeps, per sample, the one ``score`` likes
        best. One variant (itself) by default."""
        return [self]

    def score(self, samples: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
        """(B,) badness of samples for their inputs, lower is better (used by ``sweep``)."""
        return torch.zeros(len(samples), device=samples.device)

    def from_data(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> Cond:
        """The training hook: the condition of a clean batch ``x0`` (N, C, H, W) in [-1, 1]
        with its integer ``labels`` and one caption per image (``captions``, drawn by the
        trainer from each image's captions) when the data has them.

        The trainer calls it for every batch, so a conditioner that can derive its condition
        from the images themselves (a low-resolution copy, an edge map) or their labels (a
        prompt naming the class) needs no captioned data. A conditioner whose ``from_data``
        has no ``captions`` parameter is called without it. Random choices (augmentation,
        noise levels, phrasings) must draw from ``generator`` alone: it is the trainer's
        saved stream, which keeps resumed runs exact.
        """
        raise UserError(
            f"conditioner {self.name or type(self).__name__} cannot build conditions from "
            "training data (it has no from_data); train with one that can, such as lowres"
        )


class Autoencoder(_Configurable, nn.Module):
    """Maps images to the space the denoiser works in (pixels or latents), and back."""

    def __init__(self, config: Any = None) -> None:
        nn.Module.__init__(self)
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the denoiser's space."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's space back to images in [-1, 1]."""

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return image_shape

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return latent_shape


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the denoiser works on images directly."""

    is_identity: ClassVar[bool] = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class NullConditioner(Conditioner):
    """No conditioning: unconditional models need nothing else."""

    def forward(self, inputs: Sequence[Any]) -> Cond:
        return None

    def null(self, batch: int) -> Cond:
        return None
