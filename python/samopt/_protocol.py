"""The ``Optimizer`` protocol (the crate's ``Optimizer`` trait)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = ["Grads", "Optimizer", "Params", "StateDict"]

Params = Mapping[str, NDArray[np.floating[Any]]]
"""Parameters by name; optimizers update the arrays in place."""
Grads = Mapping[str, NDArray[np.floating[Any]]]
"""Gradients by name; never modified."""
StateDict = dict[str, NDArray[Any]]


@runtime_checkable
class Optimizer(Protocol):
    """What SamOptimizer needs of a base optimizer; samopt's own satisfy it, and so can a
    plain Python class."""

    def step(self, params: Params, grads: Grads) -> None: ...

    def zero_grad(self) -> None: ...

    def get_lr(self) -> float: ...

    def set_lr(self, lr: float) -> None: ...

    def state_dict(self) -> StateDict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
