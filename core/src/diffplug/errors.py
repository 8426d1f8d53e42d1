"""Error types. A ``UserError`` is the user's to fix: the CLI prints its message and exits 2."""

from __future__ import annotations


class DiffplugError(Exception):
    """Base class of every error diffplug raises on purpose."""


class UserError(DiffplugError):
    """Bad input: an unknown name, an out-of-range option, a bad file. Exit code 2."""


class UnknownComponentError(UserError):
    """A name that no installed plugin registers."""


class AmbiguousComponentError(UserError):
    """A bare name registered by two plugins: use the qualified ``dist:name``."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated, hostile, pickled or of the wrong kind."""


class OptionError(UserError):
    """An option a component lacks, or a value outside its range."""


class IncompatibleError(UserError):
    """Components that cannot run together (process, shape, conditioning)."""


class PluginError(DiffplugError):
    """A plugin failed to import or registered something invalid."""


class NonFiniteError(DiffplugError):
    """A denoiser produced NaN or Inf during sampling."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal after a clean stop (a training run's consistent checkpoint): the
    message says what was kept. Exit code 130, like any interrupt."""
