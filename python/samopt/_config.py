"""Optimizer hyperparameters and their validation."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass

from ._errors import OptimizerError

__all__ = ["GradClipMode", "LionConfig", "OptimizerConfig", "ScheduleFreeConfig"]


class GradClipMode(enum.Enum):
    """How ``OptimizerConfig.grad_clip`` limits gradients."""

    VALUE = "value"
    """Clamp every element to ``[-grad_clip, grad_clip]``."""
    NORM = "norm"
    """Scale all gradients by ``grad_clip / norm`` when their global norm exceeds it."""


def check_real(
    key: str,
    value: object,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    label: str | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, else an OptimizerError whose
    key is ``key`` and whose message calls the value ``label`` (default: the key)."""
    what = label or key
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptimizerError(f"{what} must be a real number, got {value!r}", key)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf  # an integer beyond float's range
    if not math.isfinite(number):
        raise OptimizerError(f"{what} must be finite, got {number!r}", key)
    if minimum is not None and number < minimum:
        raise OptimizerError(f"{what} must be >= {minimum}, got {number!r}", key)
    if above is not None and number <= above:
        raise OptimizerError(f"{what} must be > {above}, got {number!r}", key)
    if below is not None and number >= below:
        raise OptimizerError(f"{what} must be < {below}, got {number!r}", key)
    return number


def check_learning_rate(value: object, key: str = "learning_rate") -> float:
    return check_real(key, value, minimum=0.0)


SCHEDULE_FREE_MAX_LR = 1e100
"""Schedule-Free's average weighs steps by ``γ_t²/Σγ_i²``: below this bound the sum of
squared learning rates stays finite over any number of steps (2⁶⁴ of them at 1e100 make
2e219), above about 1e154 a single square overflows and the weights become NaN."""


def check_schedule_free_lr(value: object, key: str = "learning_rate") -> float:
    return check_real(key, value, minimum=0.0, below=SCHEDULE_FREE_MAX_LR)


def clip_bounds_of(
    grad_clip: float | None, mode: GradClipMode
) -> tuple[float | None, float | None]:
    """``(clip_value, clip_norm)`` as the kernels take them."""
    if grad_clip is None:
        return (None, None)
    if mode is GradClipMode.VALUE:
        return (grad_clip, None)
    return (None, grad_clip)


def _check_clipping(grad_clip: float | None, mode: object) -> float | None:
    checked = None if grad_clip is None else check_real("grad_clip", grad_clip, above=0.0)
    if not isinstance(mode, GradClipMode):
        raise OptimizerError(
            f"grad_clip_mode must be a GradClipMode, got {mode!r}", "grad_clip_mode"
        )
    return checked


def check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise OptimizerError(f"{key} must be a bool, got {value!r}", key)
    return value


@dataclass(frozen=True)
class OptimizerConfig:
    """Hyperparameters shared by the base optimizers (the crate's ``OptimizerConfig``).

    SGD uses learning_rate, momentum, weight_decay and nesterov; Adam and AdamW
    learning_rate, beta1, beta2, epsilon and weight_decay. ``weight_decay=None`` means the
    optimizer's own default (0 for SGD and Adam, 0.01 for AdamW); an explicit value is
    always applied: as L2 (``g ← g + wd·p``) by SGD and Adam, decoupled by AdamW. Every
    field is checked here, so a bad value fails at construction.
    """

    learning_rate: float = 1e-3
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float | None = None
    grad_clip: float | None = None
    grad_clip_mode: GradClipMode = GradClipMode.VALUE
    nesterov: bool = False

    def __post_init__(self) -> None:
        fields: dict[str, object] = {
            "learning_rate": check_learning_rate(self.learning_rate),
            "momentum": check_real("momentum", self.momentum, minimum=0.0),
            "beta1": check_real("beta1", self.beta1, minimum=0.0, below=1.0),
            "beta2": check_real("beta2", self.beta2, minimum=0.0, below=1.0),
            "epsilon": check_real("epsilon", self.epsilon, above=0.0),
            "nesterov": check_bool("nesterov", self.nesterov),
        }
        if self.weight_decay is not None:
            fields["weight_decay"] = check_real("weight_decay", self.weight_decay, minimum=0.0)
        fields["grad_clip"] = _check_clipping(self.grad_clip, self.grad_clip_mode)
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def clip_bounds(self) -> tuple[float | None, float | None]:
        """``(clip_value, clip_norm)`` as the kernels take them."""
        return clip_bounds_of(self.grad_clip, self.grad_clip_mode)


@dataclass(frozen=True)
class LionConfig:
    """Lion's hyperparameters (the crate's ``LionConfig``, its defaults), with the
    clipping every samopt optimizer has: ``beta1`` interpolates the update direction,
    ``beta2`` the momentum; ``weight_decay`` is decoupled (``− lr·wd·p``). Every field is
    checked here, so a bad value fails at construction."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float | None = None
    grad_clip_mode: GradClipMode = GradClipMode.VALUE

    def __post_init__(self) -> None:
        fields: dict[str, object] = {
            "learning_rate": check_learning_rate(self.learning_rate),
            "beta1": check_real("beta1", self.beta1, minimum=0.0, below=1.0),
            "beta2": check_real("beta2", self.beta2, minimum=0.0, below=1.0),
            "weight_decay": check_real("weight_decay", self.weight_decay, minimum=0.0),
            "grad_clip": _check_clipping(self.grad_clip, self.grad_clip_mode),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def clip_bounds(self) -> tuple[float | None, float | None]:
        """``(clip_value, clip_norm)`` as the kernels take them."""
        return clip_bounds_of(self.grad_clip, self.grad_clip_mode)


@dataclass(frozen=True)
class ScheduleFreeConfig:
    """Schedule-Free AdamW's hyperparameters (the crate's ``ScheduleFreeConfig``, its
    defaults; the crate's ``lr`` and ``eps`` are ``learning_rate`` and ``epsilon`` here, as
    in every samopt config). ``beta1`` interpolates between the iterate ``z`` and its
    average ``x`` (it must be > 0: at 0 the average cannot be recovered), ``beta2`` is
    Adam's; ``weight_decay`` is decoupled and taken at the gradient point ``y``;
    ``warmup_steps`` ramps the learning rate linearly. The crate's ``gamma`` has no
    counterpart: the average's weights are the paper's (README, difference 19). Every
    field is checked here, so a bad value fails at construction."""

    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_clip_mode: GradClipMode = GradClipMode.NORM

    def __post_init__(self) -> None:
        steps = self.warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 2**62:
            raise OptimizerError(
                f"warmup_steps must be an int >= 0, got {steps!r}", "warmup_steps"
            )
        fields: dict[str, object] = {
            "learning_rate": check_schedule_free_lr(self.learning_rate),
            "beta1": check_real("beta1", self.beta1, above=0.0, below=1.0),
            "beta2": check_real("beta2", self.beta2, minimum=0.0, below=1.0),
            "epsilon": check_real("epsilon", self.epsilon, above=0.0),
            "weight_decay": check_real("weight_decay", self.weight_decay, minimum=0.0),
            "grad_clip": _check_clipping(self.grad_clip, self.grad_clip_mode),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def clip_bounds(self) -> tuple[float | None, float | None]:
        """``(clip_value, clip_norm)`` as the kernels take them."""
        return clip_bounds_of(self.grad_clip, self.grad_clip_mode)
