"""Registers the DDIM sampler. Imports nothing heavy: the target loads lazily."""

from diffplug import Register, hookimpl


@hookimpl
def register_schedulers(register: Register) -> None:
    register("ddim", "diffplug_ddim.scheduler:DDIM", "DDIM: eta-controlled non-Markov sampler")
