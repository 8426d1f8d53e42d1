"""The diffusers bridge for diffplug: diffusers UNets under diffplug's samplers, diffusers
schedulers driving diffplug's models, and ``diffplug import-diffusers``.

Importing this package imports neither torch nor diffusers; the components load lazily.
"""
