"""Shared helpers: call arguments and state-dict entries."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._config import check_real
from ._errors import OptimizerError

__all__ = ["as_dict", "scalar_entry", "state_array", "state_mapping", "time_step_entry"]


def as_dict(mapping: object, what: str) -> dict[Any, Any]:
    """The mapping itself when it is a dict (no copy on the hot path), else a shallow dict
    of it; the arrays are the caller's either way."""
    if type(mapping) is dict:
        return mapping
    if isinstance(mapping, Mapping):
        return dict(mapping)
    raise OptimizerError(
        f"{what} must be a mapping of str to numpy.ndarray, got {type(mapping).__name__}", what
    )


def scalar_value(state: Mapping[str, Any], key: str) -> object:
    if key not in state:
        raise OptimizerError(f"state dict is missing key '{key}'", key)
    value = state[key]
    array = np.asarray(value)
    if array.shape not in ((), (1,)):
        raise OptimizerError(f"state '{key}' must be a scalar, got shape {array.shape}", key)
    return array.reshape(()).item()


def scalar_entry(state: Mapping[str, Any], key: str, *, positive: bool = False) -> float:
    """A finite, non-negative (or positive) float from a state dict."""
    value = scalar_value(state, key)
    label = f"state '{key}'"
    if positive:
        return check_real(key, value, above=0.0, label=label)
    return check_real(key, value, minimum=0.0, label=label)


LARGEST_COUNT = 2**62
"""Counters are stored as int64; no run gets near this."""


def time_step_entry(state: Mapping[str, Any], key: str) -> int:
    value = scalar_value(state, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= int(value) <= LARGEST_COUNT
    ):
        raise OptimizerError(
            f"state '{key}' must be an integer in [0, 2**62], got {value!r}", key
        )
    return int(value)


def state_array(state: Mapping[str, Any], key: str, *, non_negative: bool = False) -> NDArray[Any]:
    """A private float32/float64 copy of a per-parameter state entry, checked finite (the
    SAM family's own state, held in Python)."""
    value = state[key]
    if not isinstance(value, np.ndarray) or value.dtype not in (np.float32, np.float64):
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise OptimizerError(f"state '{key}' must be a float32 or float64 ndarray, got {kind}", key)
    if not np.isfinite(value).all():
        raise OptimizerError(f"state '{key}' contains NaN or infinity", key)
    if non_negative and (value < 0).any():
        raise OptimizerError(f"state '{key}' has negative entries", key)
    return np.array(value, copy=True, order="K")


def state_mapping(state: object) -> dict[Any, Any]:
    """A state dict as a dict (the mapping itself when it is one, else a shallow copy: an
    ``np.load`` archive reads its arrays once here)."""
    if type(state) is dict:
        return state
    if not isinstance(state, Mapping):
        raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
    return dict(state)
