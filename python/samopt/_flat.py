"""Flat parameters: many arrays as views of one buffer, stepped as one array.

``flat_params({name: shape}, dtype)`` returns ``FlatParams``, a dict of C-contiguous
views into one zero-filled buffer, each name's elements a range of it (in name order, the
order every call walks arrays in). A call whose ``params`` and ``grads`` are both intact
``FlatParams`` of one layout — the very views they were made with, under their own keys,
none replaced, reshaped or made read-only — is made over the two buffers as one array
each: the checks, memory claims and state lookups a call makes per array are made once,
so a step over a million small arrays costs what touching their elements costs. Any other
call is made array by array, as without an arena.

The optimizer keeps its state as the call was made: for an arena, one buffer per slot
(under the key ``FLAT_KEY``); switching between an arena and separate arrays moves the
state once (a state dict cut along the ranges or gathered into them, in native code).
State dicts always have the per-name keys of the crate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import _core
from ._errors import NonFiniteGradientError, OptimizerError, TrainError

__all__ = ["FLAT_KEY", "FlatParams", "flat_call", "flat_error", "flat_errors", "flat_params"]

FLAT_KEY = "\x00flat_params"
"""The name under which the native engines hold an arena's buffers: no str a caller
would give as a parameter name (it starts with a NUL)."""


class FlatParams(dict[str, NDArray[Any]]):
    """A dict of views into one buffer (see ``flat_params``). ``flat`` is the buffer:
    ``grads.flat.fill(0)`` zeroes every gradient at once. Replacing an entry is allowed
    (the next call is then made array by array, the replacement included)."""

    __slots__ = ("_arena",)

    def __init__(self, arena: _core.FlatArena) -> None:
        super().__init__(zip(arena.keys, arena.views))
        self._arena = arena

    @property
    def flat(self) -> NDArray[Any]:
        """The buffer: every view's elements, name after name in name order."""
        return self._arena.buffer

    def zeros_like(self, dtype: DTypeLike | None = None) -> FlatParams:
        """A new zero-filled arena of the same names and shapes (e.g. for the gradients),
        of this one's dtype unless ``dtype`` says otherwise."""
        double = _is_double(self.flat.dtype if dtype is None else dtype)
        return FlatParams(self._arena.like(double))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as a new arena holding a copy of the buffer; once an entry has been
        replaced, as the plain dict of its arrays (the arena no longer describes it)."""
        if not self._arena.intact(self):
            return (dict, (dict(self),))
        shapes = {name: view.shape for name, view in self.items()}
        return (_rebuilt, (shapes, self.flat.dtype.str, self.flat.copy()))


def _rebuilt(shapes: dict[str, tuple[int, ...]], dtype: str, buffer: NDArray[Any]) -> FlatParams:
    params = flat_params(shapes, dtype)
    params.flat[...] = buffer
    return params


def _is_double(dtype: DTypeLike) -> bool:
    kind = np.dtype(dtype)
    if kind not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise OptimizerError(f"flat_params' dtype must be float32 or float64, got {kind}", "dtype")
    return kind == np.dtype(np.float64)


def _shape(name: object, shape: object) -> list[int]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise OptimizerError(
            f"the shape of '{name}' must be a tuple of non-negative ints, got {shape!r}",
            str(name),
        )
    return [int(n) for n in shape]


def flat_params(shapes: Mapping[str, Any], dtype: DTypeLike = np.float64) -> FlatParams:
    """One zero-filled buffer of ``dtype`` (float32 or float64) and a dict of views into
    it, one per name, shaped as ``shapes`` says, in ``shapes``' order. Make the gradients'
    with ``params.zeros_like()`` (or another ``flat_params`` call with the same shapes)
    and write each gradient into its view; then every phase of every element-wise
    optimizer, and of SAM and GSAM over them, runs over the buffer as one array."""
    if not isinstance(shapes, Mapping):
        raise OptimizerError(
            f"shapes must be a mapping of str to shape, got {type(shapes).__name__}", "shapes"
        )
    names = list(shapes)
    for name in names:
        if type(name) is not str:
            raise OptimizerError(f"parameter names must be str, got {name!r}", str(name))
        if name.startswith("\x00"):
            raise OptimizerError(
                f"parameter name {name!r} starts with a NUL, which samopt keeps for itself", name
            )
    dims = [_shape(name, shapes[name]) for name in names]
    return FlatParams(_core.FlatArena(names, dims, _is_double(dtype)))


def flat_call(
    params: object, grads: object
) -> tuple[_core.FlatArena, dict[str, Any], dict[str, Any]] | None:
    """When ``params`` and ``grads`` are both intact arenas of one layout: the params'
    arena, and the call's dicts over the two buffers. A pointer comparison and a few field
    reads per view."""
    if not (isinstance(params, FlatParams) and isinstance(grads, FlatParams)):
        return None
    arena, grads_arena = params._arena, grads._arena
    intact = arena.same_layout(grads_arena) and arena.intact(params) and grads_arena.intact(grads)
    if not intact:
        return None
    return arena, {FLAT_KEY: arena.buffer}, {FLAT_KEY: grads_arena.buffer}


# Shared by every call over separate arrays: entering a generator-based context manager
# costs about a microsecond, which is what a whole step over one small array costs.
_NOTHING_TO_RENAME = contextlib.nullcontext()


def flat_errors(
    arena: _core.FlatArena | None, params: Mapping[str, Any], grads: Mapping[str, Any] | None
) -> contextlib.AbstractContextManager[None]:
    """Raises the errors of a call made over ``arena``'s buffers as ``flat_error`` says."""
    if arena is None:
        return _NOTHING_TO_RENAME
    return _renaming(arena, params, grads)


@contextlib.contextmanager
def _renaming(
    arena: _core.FlatArena, params: Mapping[str, Any], grads: Mapping[str, Any] | None
) -> Iterator[None]:
    try:
        yield
    except TrainError as error:
        raise flat_error(error, arena, params, grads) from None


def flat_error(
    error: TrainError,
    arena: _core.FlatArena,
    params: Mapping[str, Any],
    grads: Mapping[str, Any] | None,
) -> TrainError:
    """``error`` of a call made over ``arena``'s buffers as the call array by array would
    have raised it: naming the parameter whose gradient (or, for ASAM, value) is not
    finite, else the flat parameters."""
    if error.key != FLAT_KEY:
        return error
    source = grads if isinstance(error, NonFiniteGradientError) and grads else params
    return _renamed(error, arena, source[FLAT_KEY])


def _renamed(error: TrainError, arena: _core.FlatArena, buffer: NDArray[Any]) -> TrainError:
    text = str(error)
    name = None
    if "NaN or infinity" in text:
        # A buffer-sized temporary, on the error path only.
        bad = ~np.isfinite(buffer)
        if bad.any():
            name = arena.owner(int(bad.argmax()))
    if name is not None:
        return type(error)(text.replace(f"'{FLAT_KEY}'", f"'{name}'"), name)
    text = text.replace(f"parameter '{FLAT_KEY}'", "the arena of flat parameters")
    return type(error)(text.replace(f"'{FLAT_KEY}'", "the arena of flat parameters"), None)
