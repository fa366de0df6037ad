"""Buffers shaped like the parameters, into which the SAM family's native calls write a
variant's direction (or its kept gradients): allocated once per set of parameters and
rewritten by every step, so a step allocates nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._errors import OutOfMemoryError

__all__ = ["Buffers"]


def _layout(value: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """A buffer's shape and dtype for a parameter: its own when it is a float32 or float64
    array (anything else gets float64, and is refused by the phase that checks it)."""
    if isinstance(value, np.ndarray) and value.dtype in (np.float32, np.float64):
        return value.shape, value.dtype
    return tuple(np.shape(value)), np.dtype(np.float64)


class Buffers:
    """One C-ordered buffer per parameter, of its shape and dtype, with the sorted order of
    their names kept for the native calls."""

    def __init__(self) -> None:
        self.arrays: dict[str, NDArray[Any]] = {}
        self.names = _core.Names()

    def __getstate__(self) -> dict[str, NDArray[Any]]:
        return self.arrays

    def __setstate__(self, arrays: dict[str, NDArray[Any]]) -> None:
        self.arrays = arrays
        self.names = _core.Names()

    def like(self, params: dict[Any, Any]) -> dict[str, NDArray[Any]]:
        """The buffers for ``params``, reallocated only when its names, shapes or dtypes
        changed."""
        arrays = self.arrays
        fits = arrays.keys() == params.keys() and all(
            (arrays[name].shape, arrays[name].dtype) == _layout(value)
            for name, value in params.items()
        )
        if not fits:
            made: dict[str, NDArray[Any]] = {}
            for name, value in params.items():
                shape, dtype = _layout(value)
                try:
                    made[name] = np.zeros(shape, dtype=dtype)
                except MemoryError:
                    size = int(np.prod(shape)) * dtype.itemsize
                    raise OutOfMemoryError(
                        f"not enough memory for a direction buffer of {name!r} ({size} bytes "
                        "asked for); nothing was changed",
                        str(name),
                    ) from None
            self.arrays = made
            self.names = _core.Names()
        return self.arrays
