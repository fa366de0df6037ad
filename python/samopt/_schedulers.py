"""Learning-rate (and rho) schedulers: tensorlogic-train's scheduler.rs, in Python.

Every scheduler counts its ``step`` calls. With ``n`` the number of calls so far, the
scheduler's value is ``value(n)``, a closed form of its hyperparameters and counters:

- ``step(optimizer)`` advances ``n`` to ``n + 1`` and sets ``value(n + 1)`` on the optimizer
  (``optimizer.set_lr(x)``, or ``optimizer.rho = x`` with ``param="rho"``), the crate's
  semantics: the counter is incremented, then the value computed from it.
- ``get_lr()`` is ``value(n)``: after a step, the value that step set; before the first
  step, ``value(0)``, the schedule's starting point (``initial_lr`` for most, 0 for the
  warmups). As in the crate, nothing touches the optimizer before the first ``step``.

So the loop is ``for batch: sched.step(opt); train(batch)``: batch k (counting from 1)
trains at ``value(k)``, and every batch gets a scheduled value. The two cyclic schedulers
start their cycle at the first step, as the crate's do (``value(1) = value(0)``, the start
of the cycle); ReduceLROnPlateauScheduler is stepped after each evaluation with
``step_with_metric(optimizer, metric)`` and sets the next epoch's value.

``state_dict()`` holds every hyperparameter and counter (NumPy arrays, so ``numpy.savez``
saves it) and nothing derived from them; ``load_state_dict`` checks all of it before it
changes anything, and restores all of it, hyperparameters included (like PyTorch's).
"""

from __future__ import annotations

import bisect
import enum
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ._config import check_real
from ._errors import OptimizerError, TrainError
from ._protocol import Optimizer, StateDict
from ._state import LARGEST_COUNT, scalar_value, time_step_entry

__all__ = [
    "CosineAnnealingLrScheduler",
    "CyclicLrMode",
    "CyclicLrScheduler",
    "ExponentialLrScheduler",
    "LrScheduler",
    "MultiStepLrScheduler",
    "NoamScheduler",
    "OneCycleLrScheduler",
    "PlateauMode",
    "PolynomialDecayLrScheduler",
    "ReduceLROnPlateauScheduler",
    "SgdrScheduler",
    "StepLrScheduler",
    "WarmupCosineLrScheduler",
    "WarmupScheduler",
]

@runtime_checkable
class LrScheduler(Protocol):
    """The crate's ``LrScheduler`` trait: what every samopt scheduler provides."""

    def step(self, optimizer: Optimizer) -> None: ...

    def get_lr(self) -> float: ...

    def state_dict(self) -> StateDict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class CyclicLrMode(enum.Enum):
    """How ``CyclicLrScheduler`` scales its triangle (the crate's ``CyclicLrMode``)."""

    TRIANGULAR = "triangular"
    """Full amplitude every cycle."""
    TRIANGULAR2 = "triangular2"
    """The amplitude halves every cycle."""
    EXP_RANGE = "exp_range"
    """The amplitude is scaled by ``gamma**it`` at iteration ``it``."""


class PlateauMode(enum.Enum):
    """Whether ``ReduceLROnPlateauScheduler``'s metric should go down or up."""

    MIN = "min"
    """Lower is better (a loss)."""
    MAX = "max"
    """Higher is better (an accuracy)."""


# --- checks shared by the constructors and load_state_dict --------------------------------
# Each takes (key, value, label) and returns the value normalised, or raises an
# OptimizerError naming ``key`` (which is the argument's name and its state-dict key).

_Check = Callable[[str, Any, str], Any]


def _rate(key: str, value: object, label: str) -> float:
    return check_real(key, value, minimum=0.0, label=label)


def _positive(key: str, value: object, label: str) -> float:
    return check_real(key, value, above=0.0, label=label)


def _open_unit(key: str, value: object, label: str) -> float:
    return check_real(key, value, above=0.0, below=1.0, label=label)


def _factor(key: str, value: object, label: str) -> float:
    return check_real(key, value, minimum=0.0, below=1.0, label=label)


def _at_least_one(key: str, value: object, label: str) -> float:
    return check_real(key, value, minimum=1.0, label=label)


def _decay_gamma(key: str, value: object, label: str) -> float:
    number = check_real(key, value, above=0.0, label=label)
    if number > 1.0:
        raise OptimizerError(f"{label} must be <= 1.0, got {number!r}", key)
    return number


def _any_real(key: str, value: object, label: str) -> float:
    """A finite float or NaN (``best_metric``: NaN means no metric seen yet)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptimizerError(f"{label} must be a real number, got {value!r}", key)
    number = float(value)
    if math.isinf(number):
        raise OptimizerError(f"{label} must be finite or NaN, got {number!r}", key)
    return number


def _at_least(minimum: int) -> _Check:
    def check(key: str, value: object, label: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or not minimum <= int(value) <= LARGEST_COUNT
        ):
            raise OptimizerError(
                f"{label} must be an int in [{minimum}, 2**62], got {value!r}", key
            )
        return int(value)

    return check


def _member(cls: type[enum.Enum]) -> _Check:
    def check(key: str, value: object, label: str) -> enum.Enum:
        if not isinstance(value, cls):
            raise OptimizerError(
                f"{label} must be a {cls.__name__} ({', '.join(m.name for m in cls)}), "
                f"got {value!r}",
                key,
            )
        return value

    return check


def _milestones(key: str, value: object, label: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise OptimizerError(f"{label} must be a sequence of ints, got {value!r}", key)
    items = list(value)
    milestones = tuple(_at_least(1)(key, item, f"{label} entry") for item in items)
    for before, after in zip(milestones, milestones[1:]):
        if after <= before:
            raise OptimizerError(
                f"{label} must be strictly increasing, got {before} then {after}", key
            )
    return milestones


def _int_array_entry(state: Mapping[str, Any], key: str) -> list[int]:
    """A state entry holding milestones: a 1-d integer array."""
    array = np.asarray(state[key])
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise OptimizerError(
            f"state '{key}' must be a 1-d integer array, got {array.dtype} of shape "
            f"{array.shape}",
            key,
        )
    return [int(item) for item in array.tolist()]


def _text_entry(state: Mapping[str, Any], key: str) -> str:
    array = np.asarray(state[key])
    if array.shape not in ((), (1,)) or array.dtype.kind != "U":
        raise OptimizerError(
            f"state '{key}' must be a str scalar, got {array.dtype} of shape {array.shape}",
            key,
        )
    return str(array.reshape(()).item())


@dataclass(frozen=True)
class _Field:
    """A hyperparameter or counter: its name (also its state key), its check, and what
    its state entry holds: a ``float`` or ``int`` scalar, ``ints`` (a 1-d int64 array) or
    the value of a member of an enum class (a str scalar)."""

    name: str
    check: _Check
    kind: type[enum.Enum] | str = "float"

    def read(self, state: Mapping[str, Any]) -> Any:
        label = f"state '{self.name}'"
        if isinstance(self.kind, type):
            text = _text_entry(state, self.name)
            try:
                member = self.kind(text)
            except ValueError:
                choices = ", ".join(repr(m.value) for m in self.kind)
                raise OptimizerError(
                    f"{label} must be one of {choices}, got {text!r}", self.name
                ) from None
            return self.check(self.name, member, label)
        if self.kind == "ints":
            return self.check(self.name, _int_array_entry(state, self.name), label)
        if self.kind == "int":
            return self.check(self.name, time_step_entry(state, self.name), label)
        return self.check(self.name, scalar_value(state, self.name), label)

    def to_array(self, value: Any) -> np.ndarray[Any, Any]:
        if isinstance(self.kind, type):
            return np.array(value.value)
        if self.kind == "ints":
            return np.array(value, dtype=np.int64).reshape(-1)
        if self.kind == "int":
            return np.array(value, dtype=np.int64)
        return np.array(value, dtype=np.float64)


def _count(name: str, minimum: int) -> _Field:
    """An int field (a step count or size) of at least ``minimum``."""
    return _Field(name, _at_least(minimum), "int")


def _pow(base: float, exponent: float) -> float:
    """``base**exponent``, inf where Python's pow would raise OverflowError."""
    try:
        return float(base**exponent)
    except OverflowError:
        return math.inf


def _times_power(scale: float, base: float, exponent: int) -> float:
    """``scale · base**exponent``; 0 when scale is 0, even where the power overflows."""
    return 0.0 if scale == 0.0 else scale * _pow(base, exponent)


def _half_cosine(progress: float) -> float:
    """``½(1 + cos(π·progress))``: 1 at progress 0, exactly 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _Scheduler:
    """What the schedulers share: argument checks, stepping, the value they drive, the
    state dict and its checked loading, pickling."""

    _hyper: ClassVar[tuple[_Field, ...]] = ()
    """The constructor's arguments, in order."""
    _counters: ClassVar[tuple[_Field, ...]] = ()
    """What ``step`` changes."""
    _param: str
    _c: dict[str, Any]
    """The counters, replaced whole by each step (never changed in place)."""
    _lock: threading.RLock

    def __init__(self, *, param: str, **hyper: Any) -> None:
        if param not in ("lr", "rho"):
            raise OptimizerError(f"param must be 'lr' or 'rho', got {param!r}", "param")
        values = {f.name: f.check(f.name, hyper[f.name], f.name) for f in self._hyper}
        self._check_hyper(values, "")
        object.__setattr__(self, "_param", param)
        object.__setattr__(self, "_lock", threading.RLock())
        self.__dict__.update(values)
        object.__setattr__(self, "_c", self._start())

    # --- what each scheduler defines ---------------------------------------------------

    def _start(self) -> dict[str, Any]:
        """The counters before the first step."""
        return {f.name: 0 for f in self._counters}

    def _advance(self, c: Mapping[str, Any]) -> dict[str, Any]:
        """The counters after one more step (default: the one counter plus one)."""
        (field,) = self._counters
        return {field.name: c[field.name] + 1}

    def _value(self, c: Mapping[str, Any]) -> float:
        """The scheduled value at counters ``c``."""
        raise NotImplementedError

    def _check_hyper(self, h: Mapping[str, Any], label: str) -> None:
        """Checks that involve several hyperparameters (``label``: "" or "state ")."""

    def _check_counters(self, c: Mapping[str, Any]) -> None:
        """Checks that a loaded state's counters are reachable."""

    # --- the public API -----------------------------------------------------------------

    @property
    def param(self) -> str:
        """What the scheduler drives: ``"lr"`` (``set_lr``) or ``"rho"`` (``.rho``)."""
        return self._param

    def get_lr(self) -> float:
        """The current value: the one the last step set, ``value(0)`` before any step."""
        with self._lock:
            return self._value(self._c)

    def step(self, optimizer: Optimizer) -> None:
        """Advances one step and sets the new value on ``optimizer``; on any error
        (including the optimizer refusing the value) the scheduler is unchanged."""
        with self._lock:
            counters = self._advance(self._c)
            self._drive(optimizer, counters, f"at step {self._steps(counters)}")

    def _drive(self, optimizer: object, counters: dict[str, Any], where: str) -> None:
        """Sets the value at ``counters`` on the optimizer, then commits the counters."""
        value = self._checked_value(counters, where)
        _set(optimizer, self.param, value)
        object.__setattr__(self, "_c", counters)

    def _steps(self, c: Mapping[str, Any]) -> int:
        return int(c[self._counters[0].name])

    def _checked_value(self, c: Mapping[str, Any], where: str, key: str | None = None) -> float:
        """The value at ``c``, or an OptimizerError (naming ``key``, default ``param``)
        when it is not finite (an exponential growth that overflowed)."""
        try:
            value = float(self._value(c))
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise OptimizerError(
                f"{type(self).__name__}'s {self.param} {where} is not finite ({value!r})",
                key or self.param,
            )
        return value

    def state_dict(self) -> StateDict:
        """Every hyperparameter and counter as a NumPy array (``param`` too), so that
        ``numpy.savez(path, **sched.state_dict())`` is a checkpoint."""
        with self._lock:
            state: StateDict = {"param": np.array(self.param)}
            for field in self._hyper:
                state[field.name] = field.to_array(self.__dict__[field.name])
            for field in self._counters:
                state[field.name] = field.to_array(self._c[field.name])
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (into a freshly built scheduler too, whatever its arguments):
        checks every entry first — no unknown or missing key, each of the right type,
        shape and range, the counters consistent — and changes nothing on an error."""
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        fields = {f.name: f for f in (*self._hyper, *self._counters)}
        for key in state:
            if not isinstance(key, str):
                raise OptimizerError(f"state dict keys must be str, got {key!r}", repr(key))
        unknown = sorted(k for k in state if k != "param" and k not in fields)
        if unknown:
            raise OptimizerError(
                f"unknown state dict key '{unknown[0]}' for {type(self).__name__}", unknown[0]
            )
        for key in ("param", *fields):
            if key not in state:
                raise OptimizerError(f"state dict is missing key '{key}'", key)
        param = _text_entry(state, "param")
        if param != self.param:
            raise OptimizerError(
                f"state 'param' is {param!r} but this scheduler drives {self.param!r}", "param"
            )
        hyper = {f.name: f.read(state) for f in self._hyper}
        self._check_hyper(hyper, "state ")
        counters = {f.name: f.read(state) for f in self._counters}
        candidate = object.__new__(type(self))
        candidate.__dict__.update(hyper, _param=self.param, _c=counters)
        candidate._check_counters(counters)
        candidate._checked_value(counters, "in the loaded state", self._counters[0].name)
        with self._lock:
            self.__dict__.update(hyper, _c=counters)

    # --- plumbing --------------------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"{type(self).__name__}.{name} cannot be set: build a new scheduler, or "
            "load_state_dict"
        )

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={self.__dict__[f.name]!r}" for f in self._hyper)
        return f"{type(self).__name__}({args}, param={self.param!r})"


def _set(optimizer: object, param: str, value: float) -> None:
    """Sets the scheduled value on the optimizer: ``set_lr(value)`` or ``.rho = value``."""
    if isinstance(optimizer, type):
        raise TrainError(
            f"step needs an optimizer instance, got the class {optimizer.__name__}", "optimizer"
        )
    name = type(optimizer).__name__
    if param == "lr":
        set_lr = getattr(optimizer, "set_lr", None)
        if not callable(set_lr):
            raise TrainError(f"{name} has no set_lr(lr) for the scheduler to call", "lr")
        set_lr(value)
        return
    if not hasattr(optimizer, "rho"):
        raise TrainError(
            f"{name} has no rho to schedule (param='rho' drives a SamOptimizer or "
            "GsamOptimizer)",
            "rho",
        )
    try:
        optimizer.rho = value
    except AttributeError as error:
        raise TrainError(f"{name}.rho cannot be set: {error}", "rho") from error


# --- the schedulers -------------------------------------------------------------------


class StepLrScheduler(_Scheduler):
    """Step decay: the value is multiplied by ``gamma`` every ``step_size`` steps.

    ``lr(n) = initial_lr · gamma^⌊n / step_size⌋``

    Source: tensorlogic-train ``StepLrScheduler`` (scheduler.rs); PyTorch ``StepLR``.
    Differs from the crate: every step sets the value (the crate calls ``set_lr`` only on
    decay steps, so until the first decay the optimizer keeps its own lr); the closed form
    instead of repeated multiplication; ``step_size`` 0 is refused (the crate never decays).
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _count("step_size", 1),
        _Field("gamma", _rate),
    )
    _counters = (_count("current_epoch", 0),)
    initial_lr: float
    step_size: int
    gamma: float

    def __init__(
        self, initial_lr: float, step_size: int, gamma: float, *, param: str = "lr"
    ) -> None:
        super().__init__(param=param, initial_lr=initial_lr, step_size=step_size, gamma=gamma)

    def _value(self, c: Mapping[str, Any]) -> float:
        epoch: int = c["current_epoch"]
        return _times_power(self.initial_lr, self.gamma, epoch // self.step_size)


class ExponentialLrScheduler(_Scheduler):
    """Exponential decay by ``gamma`` every step.

    ``lr(n) = initial_lr · gamma^n``

    Source: tensorlogic-train ``ExponentialLrScheduler`` (scheduler.rs); PyTorch
    ``ExponentialLR``. As the crate (``gamma > 1`` grows; a step whose value would overflow
    is refused).
    """

    _hyper = (_Field("initial_lr", _rate), _Field("gamma", _rate))
    _counters = (_count("current_epoch", 0),)
    initial_lr: float
    gamma: float

    def __init__(self, initial_lr: float, gamma: float, *, param: str = "lr") -> None:
        super().__init__(param=param, initial_lr=initial_lr, gamma=gamma)

    def _value(self, c: Mapping[str, Any]) -> float:
        epoch: int = c["current_epoch"]
        return _times_power(self.initial_lr, self.gamma, epoch)


class CosineAnnealingLrScheduler(_Scheduler):
    """Cosine annealing from ``initial_lr`` to ``min_lr`` over ``t_max`` steps, then
    ``min_lr``.

    ``lr(n) = min_lr + (initial_lr − min_lr) · ½(1 + cos(π · min(n, t_max) / t_max))``

    Source: tensorlogic-train ``CosineAnnealingLrScheduler`` (scheduler.rs); Loshchilov &
    Hutter, "SGDR" (ICLR 2017) without restarts. Differs from the crate: clamped after
    ``t_max`` (the crate's rises again, with period ``2·t_max``); ``t_max`` 0 is refused
    (the crate's lr is NaN).
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _Field("min_lr", _rate),
        _count("t_max", 1),
    )
    _counters = (_count("current_epoch", 0),)
    initial_lr: float
    min_lr: float
    t_max: int

    def __init__(
        self, initial_lr: float, min_lr: float, t_max: int, *, param: str = "lr"
    ) -> None:
        super().__init__(param=param, initial_lr=initial_lr, min_lr=min_lr, t_max=t_max)

    def _value(self, c: Mapping[str, Any]) -> float:
        progress = min(c["current_epoch"], self.t_max) / self.t_max
        return self.min_lr + (self.initial_lr - self.min_lr) * _half_cosine(progress)


class WarmupScheduler(_Scheduler):
    """Linear warmup from 0 to ``target_lr`` over ``warmup_steps`` steps, then constant.

    ``lr(n) = target_lr · min(n, warmup_steps) / warmup_steps``

    Source: tensorlogic-train ``WarmupScheduler`` in scheduler.rs (defined there but not
    exported by the crate; the crate root's ``WarmupScheduler`` is another API, from
    lr_scheduler.rs, that wraps an inner scheduler). As the crate, ``warmup_steps`` ≥ 1.
    """

    _hyper = (_Field("target_lr", _rate), _count("warmup_steps", 1))
    _counters = (_count("current_step", 0),)
    target_lr: float
    warmup_steps: int

    def __init__(self, target_lr: float, warmup_steps: int, *, param: str = "lr") -> None:
        super().__init__(param=param, target_lr=target_lr, warmup_steps=warmup_steps)

    def _value(self, c: Mapping[str, Any]) -> float:
        step: int = c["current_step"]
        if step < self.warmup_steps:
            return self.target_lr * step / self.warmup_steps
        return self.target_lr


class WarmupCosineLrScheduler(_Scheduler):
    """Linear warmup to ``target_lr`` over ``warmup_steps`` steps, then cosine annealing
    to ``min_lr`` at ``total_steps``, then ``min_lr``.

    ``lr(n) = target_lr · n / warmup_steps``  for ``n ≤ warmup_steps`` (and warmup ≥ 1),
    ``lr(n) = min_lr + (target_lr − min_lr) · ½(1 + cos(π · p))`` otherwise, with
    ``p = min(n − warmup_steps, total_steps − warmup_steps) / (total_steps − warmup_steps)``.

    The first step sets ``target_lr / warmup_steps``, step ``warmup_steps`` exactly
    ``target_lr`` and step ``total_steps`` exactly ``min_lr``; ``value(0)`` is 0 (or
    ``target_lr`` without warmup). Source: tensorlogic-train ``WarmupCosineLrScheduler``
    (scheduler.rs); Goyal et al. 2017 (warmup) and Loshchilov & Hutter 2017 (cosine).
    Differs from the crate: clamped after ``total_steps`` (the crate's rises again);
    ``total_steps ≤ warmup_steps`` is refused (the crate underflows or divides by 0).
    """

    _hyper = (
        _Field("target_lr", _rate),
        _Field("min_lr", _rate),
        _count("warmup_steps", 0),
        _count("total_steps", 1),
    )
    _counters = (_count("current_step", 0),)
    target_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __init__(
        self,
        target_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
        *,
        param: str = "lr",
    ) -> None:
        super().__init__(
            param=param,
            target_lr=target_lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
        )

    def _check_hyper(self, h: Mapping[str, Any], label: str) -> None:
        if h["total_steps"] <= h["warmup_steps"]:
            raise OptimizerError(
                f"{label}total_steps must be > warmup_steps, got {h['total_steps']} <= "
                f"{h['warmup_steps']}",
                "total_steps",
            )

    def _value(self, c: Mapping[str, Any]) -> float:
        step: int = c["current_step"]
        warmup = self.warmup_steps
        if warmup > 0 and step <= warmup:
            return self.target_lr * (step / warmup)
        span = self.total_steps - warmup
        progress = min(step - warmup, span) / span
        return self.min_lr + (self.target_lr - self.min_lr) * _half_cosine(progress)


class OneCycleLrScheduler(_Scheduler):
    """One cycle: linear from ``initial_lr`` up to ``max_lr`` over the first ``pct_start``
    of ``total_steps``, cosine down to ``min_lr`` at ``total_steps``, then ``min_lr``.

    With ``p = min(n, total_steps) / total_steps``:
    ``lr(n) = initial_lr + (max_lr − initial_lr) · p / pct_start``  for ``p < pct_start``,
    ``lr(n) = min_lr + (max_lr − min_lr) · ½(1 + cos(π · (p − pct_start)/(1 − pct_start)))``
    otherwise.

    Source: tensorlogic-train ``OneCycleLrScheduler`` (scheduler.rs); Smith & Topin,
    "Super-Convergence" (2017). Unlike PyTorch's ``OneCycleLR`` the rise is linear and the
    three rates are given directly (as the crate). Differs from the crate only in refusing
    ``total_steps`` 0 and ``pct_start`` outside (0, 1) (NaN in the crate).
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _Field("max_lr", _rate),
        _Field("min_lr", _rate),
        _count("total_steps", 1),
        _Field("pct_start", _open_unit),
    )
    _counters = (_count("current_step", 0),)
    initial_lr: float
    max_lr: float
    min_lr: float
    total_steps: int
    pct_start: float

    def __init__(
        self,
        initial_lr: float,
        max_lr: float,
        min_lr: float,
        total_steps: int,
        pct_start: float,
        *,
        param: str = "lr",
    ) -> None:
        super().__init__(
            param=param,
            initial_lr=initial_lr,
            max_lr=max_lr,
            min_lr=min_lr,
            total_steps=total_steps,
            pct_start=pct_start,
        )

    def _value(self, c: Mapping[str, Any]) -> float:
        step: int = c["current_step"]
        pct = min(step, self.total_steps) / self.total_steps
        if pct < self.pct_start:
            return self.initial_lr + (self.max_lr - self.initial_lr) * (pct / self.pct_start)
        phase = (pct - self.pct_start) / (1.0 - self.pct_start)
        return self.min_lr + (self.max_lr - self.min_lr) * _half_cosine(phase)


class MultiStepLrScheduler(_Scheduler):
    """Decay by ``gamma`` at each milestone step.

    ``lr(n) = initial_lr · gamma^(number of milestones ≤ n)``

    ``milestones``: strictly increasing ints ≥ 1 (steps, counted as ``step`` calls).
    Source: tensorlogic-train ``MultiStepLrScheduler`` (scheduler.rs); PyTorch
    ``MultiStepLR``. Differs from the crate: every step sets the value (the crate only on
    decay steps); the closed form (the crate applies at most one milestone per step);
    unsorted or repeated milestones are refused (the crate sorts them and decays a repeated
    one on successive steps); the milestones are in the state dict (the crate's omits them).
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _Field("milestones", _milestones, "ints"),
        _Field("gamma", _rate),
    )
    _counters = (_count("current_epoch", 0),)
    initial_lr: float
    milestones: tuple[int, ...]
    gamma: float

    def __init__(
        self, initial_lr: float, milestones: Iterable[int], gamma: float, *, param: str = "lr"
    ) -> None:
        super().__init__(param=param, initial_lr=initial_lr, milestones=milestones, gamma=gamma)

    def _value(self, c: Mapping[str, Any]) -> float:
        passed = bisect.bisect_right(self.milestones, c["current_epoch"])
        return _times_power(self.initial_lr, self.gamma, passed)


class PolynomialDecayLrScheduler(_Scheduler):
    """Polynomial decay from ``initial_lr`` to ``final_lr`` over ``decay_steps``, then
    ``final_lr``.

    ``lr(n) = (initial_lr − final_lr) · (1 − min(n, decay_steps)/decay_steps)^power + final_lr``

    Source: tensorlogic-train ``PolynomialDecayLrScheduler`` (scheduler.rs); TensorFlow's
    ``PolynomialDecay`` (without ``cycle``). Differs from the crate only in refusing
    ``decay_steps`` 0 (NaN in the crate) and ``power ≤ 0`` (never reaches ``final_lr``).
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _Field("final_lr", _rate),
        _Field("power", _positive),
        _count("decay_steps", 1),
    )
    _counters = (_count("current_step", 0),)
    initial_lr: float
    final_lr: float
    power: float
    decay_steps: int

    def __init__(
        self,
        initial_lr: float,
        final_lr: float,
        power: float,
        decay_steps: int,
        *,
        param: str = "lr",
    ) -> None:
        super().__init__(
            param=param,
            initial_lr=initial_lr,
            final_lr=final_lr,
            power=power,
            decay_steps=decay_steps,
        )

    def _value(self, c: Mapping[str, Any]) -> float:
        step = min(c["current_step"], self.decay_steps)
        decay = _pow(1.0 - step / self.decay_steps, self.power)
        return (self.initial_lr - self.final_lr) * decay + self.final_lr


class CyclicLrScheduler(_Scheduler):
    """Cyclical learning rate: a triangle between ``base_lr`` and ``max_lr``, ``step_size``
    steps up and ``step_size`` down.

    Step ``n ≥ 1`` is iteration ``it = n − 1``: with ``cycle = ⌊it / (2·step_size)⌋`` and
    ``x = (it / step_size) mod 2``,
    ``lr(n) = base_lr + (max_lr − base_lr) · (x if x ≤ 1 else 2 − x) · scale``, where
    ``scale`` is 1 (TRIANGULAR), ``2^−cycle`` (TRIANGULAR2) or ``gamma^it`` (EXP_RANGE);
    ``lr(0) = base_lr``. So step 1 sets ``base_lr``, step ``step_size + 1`` the peak and
    step ``2·step_size + 1`` ``base_lr`` again: the k-th step sets PyTorch ``CyclicLR``'s
    value for batch k (counting from 1).

    ``gamma`` defaults to the crate's 0.99994 (PyTorch's is 1.0) and only matters for
    EXP_RANGE. Source: tensorlogic-train ``CyclicLrScheduler`` (scheduler.rs); Smith,
    "Cyclical Learning Rates for Training Neural Networks" (WACV 2017). Differs from the
    crate: EXP_RANGE scales by ``gamma^it`` (the crate by ``gamma^(it+1)``, one step ahead
    of its own triangle); ``step_size`` 0 is refused (the crate panics); the mode is in the
    state dict (the crate's omits it).
    """

    _hyper = (
        _Field("base_lr", _rate),
        _Field("max_lr", _rate),
        _count("step_size", 1),
        _Field("mode", _member(CyclicLrMode), CyclicLrMode),
        _Field("gamma", _decay_gamma),
    )
    _counters = (_count("current_step", 0),)
    base_lr: float
    max_lr: float
    step_size: int
    mode: CyclicLrMode
    gamma: float

    def __init__(
        self,
        base_lr: float,
        max_lr: float,
        step_size: int,
        mode: CyclicLrMode,
        gamma: float = 0.99994,
        *,
        param: str = "lr",
    ) -> None:
        super().__init__(
            param=param,
            base_lr=base_lr,
            max_lr=max_lr,
            step_size=step_size,
            mode=mode,
            gamma=gamma,
        )

    @classmethod
    def new_exp_range(
        cls, base_lr: float, max_lr: float, step_size: int, gamma: float, *, param: str = "lr"
    ) -> CyclicLrScheduler:
        """The crate's ``CyclicLrScheduler::new_exp_range``: EXP_RANGE with this gamma."""
        return cls(base_lr, max_lr, step_size, CyclicLrMode.EXP_RANGE, gamma, param=param)

    def _value(self, c: Mapping[str, Any]) -> float:
        step: int = c["current_step"]
        if step == 0:
            return self.base_lr
        it = step - 1
        x = (it / self.step_size) % 2.0
        if self.mode is CyclicLrMode.TRIANGULAR:
            scale = 1.0
        elif self.mode is CyclicLrMode.TRIANGULAR2:
            scale = math.ldexp(1.0, -(it // (2 * self.step_size)))
        else:
            scale = _pow(self.gamma, it)
        height = x if x <= 1.0 else 2.0 - x
        return self.base_lr + (self.max_lr - self.base_lr) * height * scale


class NoamScheduler(_Scheduler):
    """The Transformer's schedule: linear warmup, then decay as the inverse square root.

    ``lr(n) = scale_factor · model_dim^−0.5 · min(n^−0.5, n · warmup_steps^−1.5)``,
    ``lr(0) = 0``; with ``warmup_steps`` 0, ``lr(n) = scale_factor · model_dim^−0.5 · n^−0.5``.
    The peak is step ``warmup_steps``.

    Source: Vaswani et al., "Attention Is All You Need" (NeurIPS 2017), eq. (3);
    tensorlogic-train ``NoamScheduler`` (scheduler.rs). Differs from the crate: step n is
    the paper's step n (the crate's n-th step uses step n + 1, so its peak comes one step
    early); before the first step ``get_lr()`` is 0 (the crate's ``scale·model_dim^−0.5``
    is no value of the schedule).
    """

    _hyper = (
        _count("model_dim", 1),
        _count("warmup_steps", 0),
        _Field("scale_factor", _positive),
    )
    _counters = (_count("current_step", 0),)
    model_dim: int
    warmup_steps: int
    scale_factor: float

    def __init__(
        self, model_dim: int, warmup_steps: int, scale_factor: float, *, param: str = "lr"
    ) -> None:
        super().__init__(
            param=param, model_dim=model_dim, warmup_steps=warmup_steps, scale_factor=scale_factor
        )

    def _value(self, c: Mapping[str, Any]) -> float:
        step: int = c["current_step"]
        if step == 0:
            return 0.0
        decay = math.pow(step, -0.5)
        if self.warmup_steps > 0:
            decay = min(decay, step * math.pow(self.warmup_steps, -1.5))
        return self.scale_factor * math.pow(self.model_dim, -0.5) * decay


class SgdrScheduler(_Scheduler):
    """SGDR: cosine annealing from ``max_lr`` towards ``min_lr`` within periods of
    ``t_0``, ``t_0·t_mult``, … steps, each starting again at ``max_lr`` (warm restarts).

    ``lr = min_lr + (max_lr − min_lr) · ½(1 + cos(π · t_cur / period))``, where step
    ``n ≥ 1`` is at position ``t_cur`` of its period: the first step sets ``max_lr``
    (``t_cur`` 0), each step after it moves ``t_cur`` on by one, and when ``t_cur`` reaches
    the period it restarts at 0 with the period ``⌊period · t_mult⌋``. ``lr(0) = max_lr``.
    With ``t_0 = 10``: ``f(0/10), …, f(9/10), f(0/20), …``; ``min_lr`` itself is never set.

    ``t_mult ≥ 1`` may be fractional (the crate truncates: 10, 15, 22, 33 for 1.5).
    Source: Loshchilov & Hutter, "SGDR" (ICLR 2017); tensorlogic-train ``SgdrScheduler``
    (scheduler.rs), whose applied sequence this keeps: the k-th step sets PyTorch
    ``CosineAnnealingWarmRestarts``' value for epoch k − 1. Differs from the crate:
    ``get_lr()`` is the value the last step set (the crate's returns the next step's — after
    a restart ``max_lr`` while the optimizer holds the period's last value); ``t_0`` 0 and
    ``t_mult < 1`` are refused (the crate's period reaches 0 and its lr is NaN for good).
    The state's ``current_step`` and ``current_period`` are the position of that value.
    """

    _hyper = (
        _Field("max_lr", _rate),
        _Field("min_lr", _rate),
        _count("t_0", 1),
        _Field("t_mult", _at_least_one),
    )
    _counters = (
        _count("current_step", 0),
        _count("current_period", 1),
        _count("total_steps", 0),
    )
    max_lr: float
    min_lr: float
    t_0: int
    t_mult: float

    def __init__(
        self, max_lr: float, min_lr: float, t_0: int, t_mult: float, *, param: str = "lr"
    ) -> None:
        super().__init__(param=param, max_lr=max_lr, min_lr=min_lr, t_0=t_0, t_mult=t_mult)

    def _start(self) -> dict[str, Any]:
        return {"current_step": 0, "current_period": self.t_0, "total_steps": 0}

    def _advance(self, c: Mapping[str, Any]) -> dict[str, Any]:
        t_cur, period, steps = c["current_step"], c["current_period"], c["total_steps"]
        if steps > 0:
            t_cur += 1
            if t_cur >= period:
                t_cur = 0
                period = min(int(period * self.t_mult), LARGEST_COUNT)
        return {"current_step": t_cur, "current_period": period, "total_steps": steps + 1}

    def _steps(self, c: Mapping[str, Any]) -> int:
        return int(c["total_steps"])

    def _check_counters(self, c: Mapping[str, Any]) -> None:
        t_cur, period, steps = c["current_step"], c["current_period"], c["total_steps"]
        if period < self.t_0 or (self.t_mult == 1.0 and period != self.t_0):
            raise OptimizerError(
                f"state 'current_period' {period} cannot follow t_0 {self.t_0} with t_mult "
                f"{self.t_mult}",
                "current_period",
            )
        if t_cur >= period or (steps == 0 and t_cur != 0) or (steps > 0 and t_cur >= steps):
            raise OptimizerError(
                f"state 'current_step' {t_cur} is not a position of step {steps} in a "
                f"period of {period}",
                "current_step",
            )
        if steps == 0 and period != self.t_0:
            raise OptimizerError(
                "state 'current_period' must be t_0 before the first step", "current_period"
            )

    def _value(self, c: Mapping[str, Any]) -> float:
        progress = c["current_step"] / c["current_period"]
        return self.min_lr + (self.max_lr - self.min_lr) * _half_cosine(progress)


class ReduceLROnPlateauScheduler(_Scheduler):
    """Reduce the value by ``factor`` when a metric has stopped improving.

    Call ``step_with_metric(optimizer, metric)`` after each evaluation (``step`` without a
    metric is an error). A metric improves on the best so far when it is below
    ``best − threshold·|best|`` (MIN) or above ``best + threshold·|best|`` (MAX); the first
    always does. After more than ``patience`` evaluations in a row without improvement,
    ``lr ← max(lr·factor, min_lr)``, then ``cooldown`` evaluations whose non-improvement is
    not counted (improvements still update the best). Each call sets the current value,
    which starts at ``initial_lr``.

    Source: tensorlogic-train ``ReduceLROnPlateauScheduler`` (scheduler.rs) with PyTorch
    ``ReduceLROnPlateau``'s counting (relative threshold). Differs from the crate:
    reduces after more than ``patience`` bad evaluations (the crate at ``patience``, so its
    patience 0 and 1 are the same); during cooldown the metric still updates the best (the
    crate ignores it); the bad count restarts after every reduction, also at ``min_lr``;
    the threshold is relative to ``|best|`` (the crate's ``best·(1∓threshold)`` turns a
    worse negative metric into an improvement, as PyTorch's does: pytorch/pytorch#47513);
    a NaN or infinite metric is refused (the crate counts NaN as bad, and a first NaN
    would be a best nothing beats); every call sets the value (the crate's only on a
    reduction); the mode is restored from the state dict.
    """

    _hyper = (
        _Field("initial_lr", _rate),
        _Field("mode", _member(PlateauMode), PlateauMode),
        _Field("factor", _factor),
        _count("patience", 0),
        _Field("threshold", _rate),
        _Field("min_lr", _rate),
        _count("cooldown", 0),
    )
    _counters = (
        _Field("current_lr", _rate),
        _Field("best_metric", _any_real),
        _count("num_bad_epochs", 0),
        _count("cooldown_counter", 0),
    )
    initial_lr: float
    mode: PlateauMode
    factor: float
    patience: int
    threshold: float
    min_lr: float
    cooldown: int

    def __init__(
        self,
        initial_lr: float,
        mode: PlateauMode,
        factor: float,
        patience: int,
        threshold: float,
        min_lr: float,
        cooldown: int,
        *,
        param: str = "lr",
    ) -> None:
        super().__init__(
            param=param,
            initial_lr=initial_lr,
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            min_lr=min_lr,
            cooldown=cooldown,
        )

    def _start(self) -> dict[str, Any]:
        return {
            "current_lr": self.initial_lr,
            "best_metric": math.nan,
            "num_bad_epochs": 0,
            "cooldown_counter": 0,
        }

    def step(self, optimizer: Optimizer) -> None:
        """Refused: this scheduler needs the metric, ``step_with_metric(optimizer, metric)``
        (the crate's ``step`` silently does nothing)."""
        raise TrainError(
            "ReduceLROnPlateauScheduler needs a metric: call step_with_metric(optimizer, "
            "metric)",
            "metric",
        )

    def step_with_metric(self, optimizer: Optimizer, metric: float) -> None:
        """Takes the metric of one evaluation and sets the resulting value on the
        optimizer; on any error nothing changes."""
        if isinstance(metric, np.ndarray) and metric.shape == ():
            metric = metric.item()
        value = check_real("metric", metric)
        with self._lock:
            self._drive(optimizer, self._observe(self._c, value), f"after metric {value!r}")

    def _observe(self, c: Mapping[str, Any], metric: float) -> dict[str, Any]:
        lr, best = c["current_lr"], c["best_metric"]
        bad, cooldown = c["num_bad_epochs"], c["cooldown_counter"]
        margin = self.threshold * abs(best)
        if self.mode is PlateauMode.MIN:
            better = math.isnan(best) or metric < best - margin
        else:
            better = math.isnan(best) or metric > best + margin
        if better:
            best, bad = metric, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown -= 1
            bad = 0
        if bad > self.patience:
            reduced = max(lr * self.factor, self.min_lr)
            if reduced < lr:
                lr = reduced
            cooldown, bad = self.cooldown, 0
        return {
            "current_lr": lr,
            "best_metric": best,
            "num_bad_epochs": bad,
            "cooldown_counter": cooldown,
        }

    def _check_counters(self, c: Mapping[str, Any]) -> None:
        lr, best = c["current_lr"], c["best_metric"]
        if not min(self.initial_lr, self.min_lr) <= lr <= self.initial_lr:
            raise OptimizerError(
                f"state 'current_lr' {lr!r} must lie in [min(initial_lr, min_lr), initial_lr]",
                "current_lr",
            )
        if c["num_bad_epochs"] > self.patience:
            raise OptimizerError(
                f"state 'num_bad_epochs' must be <= patience {self.patience}", "num_bad_epochs"
            )
        if c["cooldown_counter"] > self.cooldown:
            raise OptimizerError(
                f"state 'cooldown_counter' must be <= cooldown {self.cooldown}",
                "cooldown_counter",
            )
        if c["cooldown_counter"] > 0 and c["num_bad_epochs"] > 0:
            raise OptimizerError(
                "state 'num_bad_epochs' must be 0 during cooldown", "num_bad_epochs"
            )
        if math.isnan(best) and (
            lr != self.initial_lr or c["num_bad_epochs"] or c["cooldown_counter"]
        ):
            raise OptimizerError(
                "state 'best_metric' is NaN (no metric yet) but the counters have moved",
                "best_metric",
            )

    def _value(self, c: Mapping[str, Any]) -> float:
        return float(c["current_lr"])
