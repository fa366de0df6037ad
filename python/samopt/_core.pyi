# Hand-written stub of the Rust extension (checked by `python -m mypy.stubtest samopt._core`).
# Every function validates the whole call before writing and raises samopt's OptimizerError
# (NonFiniteGradientError for NaN/inf gradients) naming the offending key.
from typing import Any, final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "NameOrder",
    "adam_step",
    "gradient_norm",
    "gsam_direction",
    "restore",
    "sam_perturb",
    "sgd_step",
]

_Arrays = dict[str, NDArray[Any]]
_State = dict[str, NDArray[np.floating[Any]]]

@final
class NameOrder:
    """The sorted order of the last parameter names a call saw (one per optimizer): a
    call with the same key objects in the same dict order skips sorting them again."""

    def __init__(self) -> None: ...

def sgd_step(
    params: _Arrays,
    order: NameOrder | None,
    grads: _Arrays,
    velocity: _State,
    saved: _State | None,
    gsam: tuple[_State, float, float] | None,
    lr: float,
    momentum: float,
    clip_value: float | None,
    clip_norm: float | None,
) -> None: ...
def adam_step(
    params: _Arrays,
    order: NameOrder | None,
    grads: _Arrays,
    m: _State,
    v: _State,
    saved: _State | None,
    gsam: tuple[_State, float, float] | None,
    lr_t: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    decay: float,
    clip_value: float | None,
    clip_norm: float | None,
) -> None: ...
def sam_perturb(
    params: _Arrays,
    order: NameOrder | None,
    grads: _Arrays,
    saved: _State,
    grad0: _State | None,
    rho: float,
    eps: float,
    adaptive: bool,
    eta: float,
) -> float: ...
def gsam_direction(
    params: _Arrays,
    order: NameOrder | None,
    grads: _Arrays,
    grad0: _State,
    out: _State,
    alpha: float,
    grad0_norm: float,
) -> None: ...
def restore(params: _Arrays, order: NameOrder | None, saved: _State) -> None: ...
def gradient_norm(grads: _Arrays) -> float: ...
