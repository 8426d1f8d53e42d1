"""diffusers schedulers driving diffplug models: parity with a hand-written diffusers loop
(same model, same noise) for many scheduler classes and step counts, batch independence,
the plan contract, bridging, and every refusal."""

import inspect
import json
from dataclasses import dataclass

import diffusers
import pytest
import torch
from cliutil import assert_clean_error, run_cli

from diffplug import (
    VP,
    Denoiser,
    DenoiserConfig,
    IncompatibleError,
    OptionError,
    Process,
    UserError,
    VPConfig,
    default_registry,
    read_recipe,
    sample,
)
from diffplug.testing import (
    check_sampler_deterministic,
    check_scheduler,
    circle_mixture,
    dummy_denoiser,
)
from diffplug_diffusers.scheduler import DiffusersScheduler
from diffplug_diffusers.unet import DiffusersUNet

B = 4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside diffusers
#: the model's process (diffplug's default VP) in diffusers' words: the hand-written loop's
#: scheduler gets these, as the wrapper's does (diffusers' class defaults differ by class).
BETAS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
}


@dataclass
class _OracleEpsConfig(DenoiserConfig):
    prediction: str = "eps"


class OracleEps(Denoiser):
    """The exact mixture denoiser as an eps-predictor: a well-behaved diffplug model whose
    samples stay in range at any step count (a stand-in for a trained one)."""

    Config = _OracleEpsConfig

    def __init__(self):
        oracle = circle_mixture()
        c = oracle.config
        super().__init__(_OracleEpsConfig(channels=c.channels, size=c.size, process=c.process))
        self.oracle = oracle

    def forward(self, x, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t.double())
        x0 = self.oracle(x.double(), t).double()
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        return ((x.double() - a * x0) / s).to(x.dtype)


_MODELS = {}


def model(kind):
    """ "eps": the oracle as an eps model; "v": a tiny untrained diffusers UNet read as v."""
    if kind not in _MODELS:
        if kind == "eps":
            _MODELS[kind] = OracleEps()
        else:
            from diffusers import UNet2DModel

            torch.manual_seed(5)
            unet = UNet2DModel(
                sample_size=8,
                in_channels=1,
                out_channels=1,
                layers_per_block=1,
                block_out_channels=(8, 16),
                norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8,
            )
            _MODELS[kind] = DiffusersUNet.from_unet(unet.eval(), prediction="v")
    return _MODELS[kind]


def diffusers_loop(name, options, den, steps, seed, multiply=False):
    """What a diffusers pipeline does: x_T = randn*init_noise_sigma from one generator,
    scale_model_input, the model, step(generator=g). ``multiply``: scale the model input as
    x*(1/sqrt(s^2 + 1)), the way diffplug's loop applies a plan's model_scale, instead of
    diffusers' x/sqrt(s^2 + 1) (the two round differently in the last bit)."""
    cls = getattr(diffusers, name)
    init_params = inspect.signature(cls.__init__).parameters
    init = {k: v for k, v in options.items() if k in init_params}
    if "clip_sample" in init_params:
        init.setdefault("clip_sample", False)  # the bridge's default (diffplug never clips unasked)
    step_kw = {k: v for k, v in options.items() if k not in init_params}
    sched = cls(**init, **BETAS)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, *den.sample_shape), generator=g) * sched.init_noise_sigma
    if "generator" in inspect.signature(cls.step).parameters:
        step_kw["generator"] = g
    with torch.no_grad():
        for t in sched.timesteps:
            if multiply:
                x_in = x * float(sched.scale_model_input(torch.ones(1, dtype=torch.float64), t))
            else:
                x_in = sched.scale_model_input(x, t)
            out = den(x_in, torch.full((B,), float(t)))
            x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def wrapper(name, options=None):
    return DiffusersScheduler.from_options(
        scheduler_class=name, scheduler_options=json.dumps(options or {})
    )


# (class, options): DDPM-family (x is the VP sample) and sigma-space (k-diffusion: x is
# x0 + s*eps, the model sees x/sqrt(1 + s^2)); deterministic and stochastic.
CASES = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"eta": 0.5, "timestep_spacing": "trailing"}),
    ("DDPMScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3}),
    ("DPMSolverSinglestepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("PNDMScheduler", {}),
    ("SASolverScheduler", {}),
    ("LCMScheduler", {}),
    ("TCDScheduler", {}),
    ("DDIMParallelScheduler", {}),
    ("DDPMParallelScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
]
IDS = [
    f"{n.removesuffix('Scheduler')}{'-' + '-'.join(map(str, o.values())) if o else ''}"
    for n, o in CASES
]
#: Second-order sigma-space schedulers: two model calls per step from sigma = 157 (x_T ~ 157*z).
SECOND_ORDER_SIGMA = (
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)


# Measured on the eps model: diffplug equals the loop that scales the input as x*k bit for bit
# (max |diff| = 0 for every case and step count). Against diffusers' own x/sqrt(s^2 + 1): 0 for
# DDPM-family schedulers (nothing is scaled), <= 5.4e-7 for first-order sigma-space ones, and
# for the second-order ones at 4 steps up to 1.4e-5 (10 and 25 steps: <= 1.1e-6). That is
# diffusers' own sensitivity, not diffplug's: diffusers run with x*k instead of x/d differs
# from itself by exactly as much (4.4e-6 Heun, 6.9e-6 KDPM2, 1.4e-5 KDPM2-ancestral).
@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_wrapper_equals_a_hand_written_diffusers_loop_on_an_eps_model(
    name, options, steps, diff, noise
):
    den = model("eps")
    got = sample(den, wrapper(name, options), steps=steps, seeds=range(B), noise=noise.generator(3))
    same = diffusers_loop(name, options, den, steps, seed=3, multiply=True)
    assert diff(got, same) <= 1e-6  # measured 0
    want = diffusers_loop(name, options, den, steps, seed=3)
    tol = 3e-5 if name in SECOND_ORDER_SIGMA and steps < 10 else 1e-5
    assert diff(got, want) <= tol


# The untrained UNet read as v (samples stay in range): v is re-formed from x0_hat, eps_hat,
# a float32 rounding the UNet then amplifies; measured <= 2.9e-6.
@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_wrapper_equals_a_hand_written_diffusers_loop_on_a_v_unet(name, options, diff, noise):
    den = model("v")
    options = {**options, "prediction_type": "v_prediction"}
    want = diffusers_loop(name, options, den, 10, seed=4)
    got = sample(den, wrapper(name, options), steps=10, seeds=range(B), noise=noise.generator(4))
    assert diff(got, want) <= 1e-5


def test_noise_is_drawn_exactly_where_diffusers_draws_it(noise):
    den = model("eps")
    for name, options, steps, draws in [
        ("DDIMScheduler", {}, 10, 0),
        ("DDIMScheduler", {"eta": 1.0}, 10, 10),
        ("DDPMScheduler", {}, 10, 9),  # not at t = 0
        ("EulerDiscreteScheduler", {}, 10, 0),  # draws, but its s_churn = 0 never uses it
        ("EulerAncestralDiscreteScheduler", {}, 10, 10),
        ("DPMSolverMultistepScheduler", {}, 10, 0),
    ]:
        src = noise.generator(0)
        sample(den, wrapper(name, options), steps=steps, seeds=range(B), noise=src)
        assert src.noisy_steps == src.drawn == draws, name


@pytest.mark.parametrize(
    "name, options",
    [
        ("DPMSolverMultistepScheduler", {}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("DDPMScheduler", {}),
        ("DDIMScheduler", {"eta": 0.7}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("HeunDiscreteScheduler", {}),
    ],
)
def test_samples_do_not_depend_on_the_batch(name, options):
    # a fresh scheduler per batch: multistep history and per-sample noise stay per sample
    check_sampler_deterministic(wrapper(name, options), steps=6)
    check_sampler_deterministic(wrapper(name, options), model("eps"), steps=6)


@pytest.mark.parametrize(
    "name",
    [
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
    ],
)
def test_plan_contract(name):
    check_scheduler(wrapper(name))
    # (not steps = T: diffusers' linspace spacing then repeats a timestep, see the docs)
    check_scheduler(
        wrapper(name),
        VP(VPConfig(num_train_timesteps=100, beta_schedule="scaled_linear")),
        steps=(1, 3, 70),
    )


def test_the_scheduler_is_built_on_the_models_process():
    process = VP(
        VPConfig(
            num_train_timesteps=500,
            beta_schedule="squaredcos_cap_v2",
            rescale_zero_terminal_snr=True,
        )
    )
    plan = wrapper("DDIMScheduler", {"timestep_spacing": "trailing"}).plan(process, 5)
    assert plan.scheduler_config["num_train_timesteps"] == 500
    assert plan.scheduler_config["rescale_betas_zero_snr"] is True
    sched = plan.fresh_scheduler()
    assert torch.equal(sched.alphas_cumprod, process.alphas_cumprod)
    assert plan.info["timesteps"] == [499, 399, 299, 199, 99]
    assert plan.info["scheduler_class"] == "DDIMScheduler"


# ------------------------------------------------------------------------------- bridging


class Flowish(Process):
    """A continuous non-VP process (alpha = 1 - t, sigma = t), registered nowhere."""

    name = "flowish"

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - t, t

    @property
    def t_range(self):
        return 1e-3, 0.999


def test_non_vp_processes_are_refused_then_bridged_like_diffplugs_ddim(diff):
    sched = wrapper("DDIMScheduler", {"clip_sample": False})
    reason = sched.supports(Flowish())
    assert reason and "VP" in reason and "flowish" in reason
    with pytest.raises(IncompatibleError, match="flowish"):
        sched.plan(Flowish(), 10)
    # the loop bridges a foreign model to the scheduler's native VP, as it does for DDIM
    den = dummy_denoiser(process=Flowish())
    ddim = default_registry().load("scheduler", "ddim")()
    got = sample(den, sched, steps=10, seeds=range(3))
    want = sample(den, ddim, steps=10, seeds=range(3))
    assert diff(got, want) <= 1e-6


def test_zero_snr_models_need_a_scheduler_that_can_rescale():
    process = VP(VPConfig(rescale_zero_terminal_snr=True))
    assert wrapper("DDIMScheduler").supports(process) is None
    assert "zero terminal SNR" in wrapper("HeunDiscreteScheduler").supports(process)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scheduler_class": "FlowMatchEulerDiscreteScheduler"}, "no DDPM beta schedule"),
        ({"scheduler_class": "EDMEulerScheduler"}, "no DDPM beta schedule"),
        ({"scheduler_class": "RePaintScheduler"}, "RePaintScheduler is not supported"),
        ({"scheduler_class": "DDIMInverseScheduler"}, "inverts"),
        ({"scheduler_class": "DDIMSchedulr"}, "not a diffusers scheduler class"),
        ({"scheduler_class": "UNet2DModel"}, "not a diffusers scheduler class"),
        ({"scheduler_options": '{"beta_schedule": "linear"}'}, "come from the model"),
        ({"scheduler_options": '{"etaa": 1}'}, "has no option etaa"),
        ({"scheduler_options": "{eta: 1}"}, "not JSON"),
        ({"scheduler_options": "[1]"}, "JSON object"),
        ({"scheduler_options": '{"prediction_type": "flow_prediction"}'}, "flow_prediction"),
        (
            {
                "scheduler_class": "DDPMScheduler",
                "scheduler_options": '{"variance_type": "learned_range"}',
            },
            "learned",
        ),
    ],
)
def test_unsupported_classes_and_options_are_refused(options, match):
    with pytest.raises(OptionError, match=match):
        DiffusersScheduler.from_options(**options)


def test_too_many_steps_or_a_schedule_the_class_lacks_is_a_clean_error():
    with pytest.raises(UserError, match="DDIMScheduler"):
        wrapper("DDIMScheduler").plan(VP(), 1001)
    unclip = wrapper("UnCLIPScheduler")  # cosine betas only
    with pytest.raises(UserError, match="squaredcos_cap_v2"):
        unclip.plan(VP(), 10)
    assert len(unclip.plan(VP(VPConfig(beta_schedule="squaredcos_cap_v2")), 10)) == 10
    # a class that reshapes the betas (CogVideoX's SNR shift) would not match the model
    with pytest.raises(IncompatibleError, match="does not reproduce its betas"):
        wrapper("CogVideoXDDIMScheduler").plan(VP(), 10)
    assert len(wrapper("CogVideoXDDIMScheduler", {"snr_shift_scale": 1.0}).plan(VP(), 10)) == 10


def test_cli_runs_any_class_records_it_and_refuses_cleanly(tmp_path):
    out = tmp_path / "s.safetensors"
    result = run_cli(
        "run",
        "--sampler",
        "diffusers",
        "--scheduler-class",
        "DPMSolverMultistepScheduler",
        "--scheduler-options",
        '{"solver_order": 3}',
        "--model",
        "gmm-digits",
        "--steps",
        "5",
        "--num-samples",
        "2",
        "-q",
        "-o",
        str(out),
    )
    assert result.code == 0, result.err
    recipe = read_recipe(out)
    assert recipe["sampler"]["options"]["scheduler_class"] == "DPMSolverMultistepScheduler"
    assert recipe["timesteps"] == [999, 799, 599, 400, 200]
    bad = run_cli(
        "run",
        "--sampler",
        "diffusers",
        "--scheduler-class",
        "FlowMatchEulerDiscreteScheduler",
        "--model",
        "gmm-digits",
        "-o",
        str(tmp_path / "b.png"),
    )
    assert_clean_error(bad, "FlowMatchEulerDiscreteScheduler", "beta schedule")


def test_thresholding_reaches_the_scheduler_through_eps_hat(diff, noise):
    # diffplug's --threshold static clips x0_hat and re-derives eps_hat from it; a scheduler
    # given eps_hat then steps with the clipped x0_hat: diffusers' clip_sample with
    # use_clipped_model_output=True
    from diffplug import StaticThreshold

    den = model("eps")
    opts = {"clip_sample": False}
    got = sample(
        den,
        wrapper("DDIMScheduler", opts),
        steps=10,
        seeds=range(B),
        noise=noise.generator(5),
        transforms=[StaticThreshold()],
    )
    ref = {"clip_sample": True, "use_clipped_model_output": True}
    want = diffusers_loop("DDIMScheduler", ref, den, 10, seed=5)
    unclipped = diffusers_loop("DDIMScheduler", opts, den, 10, seed=5)
    assert diff(got, want) <= 1e-5
    assert diff(want, unclipped) > 1e-3  # the clip mattered


def test_the_bridge_clips_x0_only_when_asked():
    """A latent model's x0 is not in [-1, 1]: DDIMScheduler's default clip_sample is off under
    diffplug, as for diffplug's own ddim; {"clip_sample": true} turns it back on."""

    class Constant(Denoiser):
        Config = DenoiserConfig

        def forward(self, x, t, cond=None):
            return torch.full_like(x, 2.5)

    model = Constant(DenoiserConfig(size=4, prediction="x0"))
    free = sample(model, wrapper("DDIMScheduler"), steps=10, seeds=[0, 1])
    clipped = sample(model, wrapper("DDIMScheduler", {"clip_sample": True}), steps=10, seeds=[0])
    torch.testing.assert_close(free, torch.full_like(free, 2.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(clipped, torch.ones_like(clipped), rtol=0, atol=1e-5)
