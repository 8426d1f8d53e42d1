"""Entry point module: registers the sampler by name with a lazy import target."""

from diffplug import Register, hookimpl


@hookimpl
def register_schedulers(register: Register) -> None:
    register("example-dpmpp-2m", "diffplug_dpmsolver.sampler:DPMSolver2M",
             "DPM-Solver++(2M), the plugin guide's worked example")  # fmt: skip
