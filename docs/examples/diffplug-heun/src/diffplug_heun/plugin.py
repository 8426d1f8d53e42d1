"""Entry point module: registers the sampler by name with a lazy import target."""

from diffplug import Register, hookimpl


@hookimpl
def register_schedulers(register: Register) -> None:
    register("example-heun", "diffplug_heun.sampler:Heun",
             "Heun's 2nd-order method, the plugin guide's worked example")  # fmt: skip
