"""Gradient accumulation over micro-batches (davda54/sam's most-asked question)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._config import check_real
from ._errors import OptimizerError, OutOfMemoryError
from ._protocol import Grads
from ._state import as_dict

__all__ = ["GradAccumulator"]


class GradAccumulator:
    """Weighted sums of gradients: ``add(grads, weight)`` is ``acc ← acc + weight·g``, one
    fused native pass over the whole dict; no allocation after the first batch.

    The sums are kept in the gradients' precision: float64 for float64 gradients, float32
    for float32 and float16 ones (float16 sums would lose the small terms). ``grads`` are
    the sums, ``mean()`` the sums divided by the total weight. A SAM step over ``k``
    micro-batches::

        acc.reset()
        for batch in batches:
            acc.add(grads_at(params, batch), 1 / k)
        sam.first_step(params, acc.grads)
        acc.reset()
        for batch in batches:
            acc.add(grads_at(params, batch), 1 / k)
        sam.second_step(params, acc.grads)
    """

    def __init__(self) -> None:
        self._sums: dict[str, NDArray[Any]] = {}
        self._means: dict[str, NDArray[Any]] = {}
        self._total = 0.0
        self._names = _core.Names()
        self._means_names = _core.Names()
        self._lock = threading.RLock()

    def add(self, grads: Grads, weight: float = 1.0) -> None:
        """Adds ``weight·g`` for every gradient. Every add after the first must give the
        same names; a NaN or infinite gradient raises NonFiniteGradientError and changes
        nothing (skip the micro-batch)."""
        value = check_real("weight", weight)
        grads_dict = as_dict(grads, "grads")
        with self._lock:
            sums = self._sums or self._zeros_like(grads_dict)
            if grads_dict.keys() != sums.keys():
                missing = sorted(sums.keys() - grads_dict.keys())
                extra = sorted(grads_dict.keys() - sums.keys(), key=repr)
                first = [*missing, *extra][0]
                raise OptimizerError(
                    "every add of one accumulation must give the same names: "
                    f"missing {missing}, unexpected {extra}",
                    first if isinstance(first, str) else repr(first),
                )
            _core.accumulate(self._names, sums, grads_dict, value)
            self._sums = sums
            self._total += value

    @staticmethod
    def _zeros_like(grads: dict[Any, Any]) -> dict[str, NDArray[Any]]:
        sums: dict[str, NDArray[Any]] = {}
        for name, grad in grads.items():
            dtype = np.float64 if np.asarray(grad).dtype == np.float64 else np.float32
            try:
                sums[name] = np.zeros(np.shape(grad), dtype=dtype)
            except MemoryError:
                size = int(np.prod(np.shape(grad))) * np.dtype(dtype).itemsize
                raise OutOfMemoryError(
                    f"not enough memory for the sums of {name!r} ({size} bytes asked for); "
                    "nothing was changed",
                    str(name),
                ) from None
        return sums

    @property
    def grads(self) -> dict[str, NDArray[Any]]:
        """The weighted sums by name (the accumulator's own arrays: read, do not write)."""
        with self._lock:
            return dict(self._sums)

    @property
    def total_weight(self) -> float:
        """The sum of the weights added since the last reset."""
        return self._total

    def mean(self) -> dict[str, NDArray[Any]]:
        """The sums divided by the total weight, in arrays of the accumulator's that are
        allocated on the first call and rewritten by each."""
        with self._lock:
            if self._total == 0.0:
                raise OptimizerError("mean() of an accumulation whose total weight is 0", None)
            if self._means.keys() != self._sums.keys():
                self._means = {k: np.empty_like(v) for k, v in self._sums.items()}
                self._means_names = _core.Names()
            _core.scale(self._means_names, self._means, self._sums, 1.0 / self._total)
            return dict(self._means)

    def reset(self) -> None:
        """Sets the sums to zero (keeping their arrays) and the total weight to 0."""
        with self._lock:
            if self._sums:
                _core.zero(self._names, self._sums)
            self._total = 0.0

    def __repr__(self) -> str:
        return f"GradAccumulator({len(self._sums)} arrays, total_weight={self._total!r})"
