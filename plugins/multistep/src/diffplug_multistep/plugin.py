"""Registers the multistep solvers. Imports nothing heavy: the targets load lazily."""

from diffplug import Register, hookimpl

#: registered name -> (class in diffplug_multistep.samplers, description); kept here, not
#: imported from the samplers module, so that registering imports no torch
SAMPLERS = {
    "unipc": ("UniPC", "UniPC predictor-corrector (bh1 or bh2), up to 4th order, 1 call/step"),
    "deis": ("DEIS", "DEIS exponential-integrator multistep (tAB), up to 4th order"),
    "ipndm": ("IPNDM", "improved PNDM: Adams-Bashforth on the level, fixed 4th-order weights"),
    "ipndm-v": ("IPNDMv", "improved PNDM with variable-step weights, up to 4th order"),
    "res-multistep": ("ResMultistep", "RES 2nd-order exponential multistep, optional eta"),
    "res-multistep-ancestral": (
        "ResMultistepAncestral",
        "res-multistep with ancestral noise (eta 1)",
    ),
    "er-sde": ("ERSDE", "extended reverse-time SDE solver, up to 3 stages"),
    "lcm": ("LCM", "latent-consistency sampling: denoise, then renoise to the next level"),
}


@hookimpl
def register_schedulers(register: Register) -> None:
    for name, (cls, description) in SAMPLERS.items():
        register(name, f"diffplug_multistep.samplers:{cls}", description)
