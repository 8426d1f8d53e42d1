"""Registers k-diffusion's samplers. Imports nothing heavy: the targets load lazily."""

from diffplug import Register, hookimpl

#: registered name -> (class in diffplug_ksamplers.samplers, description); kept here, not
#: imported from the samplers module, so that registering imports no torch
SAMPLERS = {
    "euler": ("Euler", "Euler on the probability-flow ODE (Karras 2022), optional churn"),
    "euler-ancestral": ("EulerAncestral", "Euler ancestral: Euler to sigma_down, then noise"),
    "heun": ("Heun", "Heun's 2nd-order method (Karras 2022, Alg. 2)"),
    "dpm2": ("DPM2", "DPM-Solver-2 in Karras' form, 2nd order"),
    "dpm2-ancestral": ("DPM2Ancestral", "DPM2 ancestral: DPM2 to sigma_down, then noise"),
    "lms": ("LMS", "linear multistep (k-diffusion), up to 4 past slopes"),
    "dpmpp-2s-ancestral": ("DPMpp2SAncestral", "DPM-Solver++(2S) ancestral"),
    "dpmpp-sde": ("DPMppSDE", "DPM-Solver++ SDE, two stochastic stages per step"),
    "dpmpp-2m": ("DPMpp2M", "DPM-Solver++(2M) on noise levels (k-diffusion), 2nd order"),
    "dpmpp-2m-sde": ("DPMpp2MSDE", "DPM-Solver++(2M) SDE, midpoint or heun correction"),
    "dpmpp-3m-sde": ("DPMpp3MSDE", "DPM-Solver++(3M) SDE, 3rd order"),
}


@hookimpl
def register_schedulers(register: Register) -> None:
    for name, (cls, description) in SAMPLERS.items():
        register(name, f"diffplug_ksamplers.samplers:{cls}", description)
