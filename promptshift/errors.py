"""Typed errors. Every mistake a user can make in their input ends in one of these,
with a message that says what to do; the CLI prints the message, not a traceback."""


class PromptShiftError(Exception):
    """Base class: the CLI turns these into a one-line message and exit code 2."""


class SweepError(PromptShiftError, ValueError):
    """A sweep or prompt file is malformed; the message names the field."""


class ModelLoadError(PromptShiftError):
    """A model could not be loaded; the message says which source was tried and why."""


class TemplateError(PromptShiftError):
    """The chat template is missing or cannot be labelled exactly."""


class StoreError(PromptShiftError):
    """A store is missing, incompatible, incomplete or holds another plan."""


class ShardSpecError(PromptShiftError, ValueError):
    """`--shard I/N` was malformed."""


class ExtractError(PromptShiftError):
    """Extraction hit a problem in the data (overflow, NaN, unsupported architecture)."""


class MetricsError(PromptShiftError):
    """Metrics could not be computed from the store."""
