"""samopt's exceptions, mirroring tensorlogic-train's ``TrainError::OptimizerError``.

They live in this importable module (and are raised from Rust by their dotted path
``samopt._errors``) so that they pickle, e.g. across multiprocessing boundaries.
"""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "OptimizerError", "OutOfMemoryError", "TrainError"]


class TrainError(Exception):
    """Base class of every error samopt raises on purpose.

    ``key`` names the offending dict key or argument, when there is one.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[type[TrainError], tuple[str, str | None]]:
        return (type(self), (str(self.args[0]) if self.args else "", self.key))


class OptimizerError(TrainError, ValueError):
    """Bad input to an optimizer; nothing was changed."""


class NonFiniteGradientError(OptimizerError):
    """A gradient holds NaN or infinity; nothing was changed, so the batch can be skipped."""


class OutOfMemoryError(TrainError, MemoryError):
    """A buffer a call needed (optimizer state, SAM's saved values, a staged or converted
    copy) could not be allocated. Raised before anything was written: nothing changed.
    The message gives the bytes asked for; ``key`` names the parameter or state key."""
