"""Sharpness-Aware Minimization over any base optimizer: SAM, adaptive SAM and GSAM."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._config import check_real
from ._errors import OptimizerError
from ._optimizers import GsamMix, NativeOptimizer
from ._protocol import Grads, Optimizer, Params, StateDict
from ._state import as_dict, scalar_entry, state_array, time_step_entry

__all__ = ["GradFn", "GsamOptimizer", "SamOptimizer"]

GradFn = Callable[[dict[str, NDArray[Any]]], tuple[Any, Grads]]
"""``grad_fn(params) -> (loss, grads)``: the loss and gradients at the current params."""

_SAVED = "saved_"
_CALLS = "sam_calls"


def _check_interval(interval: object) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise OptimizerError(f"interval must be an int >= 1, got {interval!r}", "interval")
    return interval


class SamOptimizer:
    """SAM (Foret et al., 2021), or adaptive SAM (Kwon et al., 2021) with ``adaptive=True``.

    ``first_step`` moves the parameters to ``p + ρ·g/(‖g‖ + eps)`` (adaptive:
    ``p + ρ·T²⊙g/(‖T⊙g‖ + eps)`` with ``T = |p| + eta``), remembering their exact values;
    ``second_step`` puts them back bit for bit and lets the base optimizer step with the
    gradient taken at the moved point. ``sam_step`` does both around a gradient function,
    and with ``interval=k`` only every k-th call (a plain base step otherwise).
    """

    # Per-parameter buffers that belong to a pending first_step, by state-dict prefix.
    _pending_buffers: tuple[tuple[str, str], ...] = ((_SAVED, "_saved"),)

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 0.0,
        interval: int = 1,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise OptimizerError(
                "base_optimizer must implement the Optimizer protocol (step, zero_grad, "
                f"get_lr, set_lr, state_dict, load_state_dict), got "
                f"{type(base_optimizer).__name__}",
                "base_optimizer",
            )
        if not isinstance(adaptive, bool):
            raise OptimizerError(f"adaptive must be a bool, got {adaptive!r}", "adaptive")
        self.base_optimizer = base_optimizer
        self._rho = check_real("rho", rho, above=0.0)
        self.adaptive = adaptive
        self.eta = check_real("eta", eta, minimum=0.0)
        self._eps = check_real("eps", eps, minimum=0.0)
        self._interval = _check_interval(interval)
        # Scratch buffers that receive the values first_step moves away from; reused across
        # steps so a step allocates nothing proportional to the parameters.
        self._saved: dict[str, NDArray[Any]] = {}
        # Names moved by the pending first_step, or None when nothing is pending.
        self._pending: frozenset[str] | None = None
        self._calls = 0
        # Kernels run without the GIL: the lock serialises concurrent calls (re-entrant so
        # that sam_step can hold it around the user's gradient function).
        self._lock = threading.RLock()
        # The last parameter names' sorted order, reused while they stay the same objects.
        self._order = _core.NameOrder()

    @property
    def rho(self) -> float:
        """The neighbourhood radius; can be changed between steps (rho schedules)."""
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_real("rho", value, above=0.0)

    @property
    def eps(self) -> float:
        """Added to the norm in the ascent ``ρ·g/(‖g‖ + eps)`` (davda54/sam uses 1e-12)."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = check_real("eps", value, minimum=0.0)

    @property
    def interval(self) -> int:
        """sam_step is a SAM step every ``interval``-th call, a plain base step otherwise."""
        return self._interval

    @interval.setter
    def interval(self, value: int) -> None:
        self._interval = _check_interval(value)

    @property
    def pending(self) -> bool:
        """Whether a first_step has moved the parameters and awaits its second_step."""
        return self._pending is not None

    def first_step(self, params: Params, grads: Grads) -> None:
        """Climbs to the worst point within radius rho; nothing moves when ‖g‖ = 0."""
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock:
            if self._pending is not None:
                raise OptimizerError(
                    "first_step called twice without second_step: the parameters are "
                    "already perturbed (call second_step, or restore to abandon the step)",
                    None,
                )
            if self._perturb(params_dict, grads_dict) > 0.0:
                self._pending = frozenset(params_dict)

    def _perturb(self, params: dict[str, Any], grads: dict[str, Any]) -> float:
        return _core.sam_perturb(
            params, self._order, grads, self._saved, None,
            self.rho, self.eps, self.adaptive, self.eta,
        )

    def second_step(self, params: Params, grads: Grads) -> None:
        """Restores the parameters exactly and steps the base optimizer with ``grads``,
        the gradients taken at the perturbed point. Without a pending first_step this is a
        plain base step."""
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock:
            if self._pending is None:
                self.base_optimizer.step(params_dict, grads_dict)
                return
            self._check_pending_names(params_dict)
            base = self.base_optimizer
            if isinstance(base, NativeOptimizer):
                base.step_from(params_dict, grads_dict, self._saved, self._gsam_mix())
            else:
                self._foreign_step(base, params_dict, grads_dict)
            self._pending = None

    def _foreign_step(
        self, base: Optimizer, params: dict[str, Any], grads: dict[str, Any]
    ) -> None:
        """Restores and steps a base optimizer written in Python. Whatever it changed
        before raising is undone: the perturbed values are kept (a copy: this path is not
        the fused one), so an error leaves everything as it was, the step still pending."""
        step_grads = self._foreign_gradients(params, grads)
        perturbed = {name: np.copy(array) for name, array in params.items()}
        _core.restore(params, self._order, self._saved)
        try:
            base.step(params, step_grads)
        except BaseException:
            for name, array in perturbed.items():
                np.copyto(params[name], array)
            raise

    def _gsam_mix(self) -> GsamMix | None:
        return None

    def _foreign_gradients(self, params: dict[str, Any], grads: dict[str, Any]) -> Grads:
        return grads

    step = second_step

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` is called at the current
        point and, on SAM calls, at the perturbed point; returns the first loss. With
        ``interval=k`` only every k-th call (the first included) is a SAM step, the others
        a plain base step with one gradient evaluation. On any error the parameters are
        left as they were."""
        params_dict = as_dict(params, "params")
        with self._lock:
            if self._pending is not None:
                raise OptimizerError(
                    "sam_step called while a first_step is pending (call second_step or "
                    "restore first)",
                    None,
                )
            loss, grads = _call(grad_fn, params_dict)
            if self._calls % self.interval != 0:
                self.base_optimizer.step(params_dict, grads)
            else:
                self.first_step(params_dict, grads)
                try:
                    _, perturbed_grads = _call(grad_fn, params_dict)
                    self.second_step(params_dict, perturbed_grads)
                except BaseException:
                    self.restore(params_dict)
                    raise
            self._calls += 1
        return loss

    def restore(self, params: Params) -> None:
        """Abandons a pending perturbation: puts the parameters back to their values before
        first_step, bit for bit (e.g. after second_step raised NonFiniteGradientError)."""
        params_dict = as_dict(params, "params")
        with self._lock:
            if self._pending is None:
                return
            self._check_pending_names(params_dict)
            _core.restore(params_dict, self._order, self._saved)
            self._pending = None

    def _check_pending_names(self, params: dict[str, Any]) -> None:
        assert self._pending is not None
        if self._pending == params.keys():
            return
        missing = sorted(self._pending - params.keys())
        extra = sorted(set(params) - self._pending, key=repr)  # keys of any type
        first = [*missing, *extra][0]
        raise OptimizerError(
            "second_step must get the same parameter names as the pending first_step: "
            f"missing {missing}, unexpected {extra}",
            first if isinstance(first, str) else repr(first),
        )

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad()

    def get_lr(self) -> float:
        return self.base_optimizer.get_lr()

    def set_lr(self, lr: float) -> None:
        self.base_optimizer.set_lr(lr)

    def _own_scalars(self) -> dict[str, NDArray[Any]]:
        return {"rho": np.array(self._rho), _CALLS: np.array(self._calls, dtype=np.int64)}

    def _pending_scalars(self) -> dict[str, NDArray[Any]]:
        return {}

    def state_dict(self) -> StateDict:
        """The base optimizer's state, ``rho``, ``sam_calls`` (for ``interval``), and for
        each parameter of a pending first_step its saved value ``saved_<name>``."""
        with self._lock:
            state = self.base_optimizer.state_dict()
            own = self._own_scalars()
            pending = self._pending_scalars() if self._pending is not None else {}
            for prefix, attribute in self._pending_buffers:
                buffers: dict[str, NDArray[Any]] = getattr(self, attribute)
                for name in sorted(self._pending or ()):
                    pending[prefix + name] = buffers[name].copy()
            clash = sorted(k for k in state if k in own or self._is_pending_key(k))
            if clash:
                raise OptimizerError(
                    f"the base optimizer's state key '{clash[0]}' clashes with "
                    f"{type(self).__name__}'s",
                    clash[0],
                )
            state.update(own)
            state.update(pending)
        return state

    def _is_pending_key(self, key: object) -> bool:
        return isinstance(key, str) and (
            key in self._pending_scalars_names()
            or any(key.startswith(prefix) for prefix, _ in self._pending_buffers)
        )

    def _pending_scalars_names(self) -> tuple[str, ...]:
        return ()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built optimizer); checks everything
        before changing anything."""
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        rho = scalar_entry(state, "rho", positive=True)
        calls = time_step_entry(state, _CALLS) if _CALLS in state else 0
        buffers: dict[str, dict[str, NDArray[Any]]] = {}
        for prefix, attribute in self._pending_buffers:
            keys = sorted(k for k in state if isinstance(k, str) and k.startswith(prefix))
            buffers[attribute] = {k[len(prefix):]: state_array(state, k) for k in keys}
        names = {attribute: set(b) for attribute, b in buffers.items()}
        pending_names = names["_saved"]
        for found in names.values():
            if found != pending_names:
                key = sorted(found ^ pending_names)[0]
                raise OptimizerError(
                    f"state dict's pending buffers disagree for parameter '{key}'", key
                )
        scalars = self._load_pending_scalars(state) if pending_names else {}
        own = {"rho", _CALLS}
        base_state = {
            k: v for k, v in state.items() if k not in own and not self._is_pending_key(k)
        }
        with self._lock:
            self.base_optimizer.load_state_dict(base_state)
            self._rho, self._calls = rho, calls
            for attribute, loaded in buffers.items():
                setattr(self, attribute, loaded)
            for attribute, value in scalars.items():
                setattr(self, attribute, value)
            self._pending = frozenset(pending_names) if pending_names else None

    def _load_pending_scalars(self, state: Mapping[str, Any]) -> dict[str, float]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"], state["_order"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._order = _core.NameOrder()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.base_optimizer!r}, rho={self._rho!r}, "
            f"adaptive={self.adaptive!r}, eta={self.eta!r}, eps={self._eps!r}, "
            f"interval={self._interval!r})"
        )


def _call(grad_fn: GradFn, params: dict[str, NDArray[Any]]) -> tuple[Any, dict[str, Any]]:
    result = grad_fn(params)
    if not isinstance(result, tuple) or len(result) != 2:
        raise OptimizerError(
            f"grad_fn must return (loss, grads), got {type(result).__name__}", "grad_fn"
        )
    loss, grads = result
    return loss, as_dict(grads, "grads")


class GsamOptimizer(SamOptimizer):
    """GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided SAM").

    The first step is SAM's and keeps the gradient g0 at w; the second steps the base with
    ``g1 − alpha·g0⊥``, where g1 is the gradient at the perturbed point and g0⊥ the part of
    g0 orthogonal to g1. With ``rho_min`` set, rho follows the base's learning rate:
    ``rho = rho_min + (rho_max − rho_min)·(lr − lr_min)/(lr_max − lr_min)``, lr_max being
    the learning rate at construction (rho_max when lr_max ≤ lr_min; clamped to
    [rho_min, rho_max]).
    """

    _pending_buffers = ((_SAVED, "_saved"), ("grad0_", "_grad0"))

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho_max: float = 0.05,
        rho_min: float | None = None,
        alpha: float = 0.4,
        *,
        lr_min: float = 0.0,
        eps: float = 0.0,
        interval: int = 1,
    ) -> None:
        rho_max = check_real("rho_max", rho_max, above=0.0)
        super().__init__(base_optimizer, rho_max, eps=eps, interval=interval)
        if rho_min is not None:
            rho_min = check_real("rho_min", rho_min, above=0.0)
            if rho_min > rho_max:
                raise OptimizerError(
                    f"rho_min must be <= rho_max, got {rho_min!r} > {rho_max!r}", "rho_min"
                )
        self.rho_min = rho_min
        self._alpha = check_real("alpha", alpha, minimum=0.0)
        self.lr_min = check_real("lr_min", lr_min, minimum=0.0)
        self.lr_max = float(base_optimizer.get_lr())
        self._grad0: dict[str, NDArray[Any]] = {}
        self._grad0_norm = 0.0
        self._direction: dict[str, NDArray[Any]] = {}

    @property
    def rho_max(self) -> float:
        return self._rho

    @property
    def alpha(self) -> float:
        """How much of g0's part orthogonal to g1 the step removes."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_real("alpha", value, minimum=0.0)

    @property
    def rho(self) -> float:
        """The radius of the next first_step: rho_max, or following the learning rate when
        rho_min is set. Assigning sets rho_max."""
        rho_max, rho_min = self._rho, self.rho_min
        if rho_min is None or self.lr_max <= self.lr_min:
            return rho_max
        fraction = (self.base_optimizer.get_lr() - self.lr_min) / (self.lr_max - self.lr_min)
        return min(rho_max, max(rho_min, rho_min + (rho_max - rho_min) * fraction))

    @rho.setter
    def rho(self, value: float) -> None:
        rho_max = check_real("rho", value, above=0.0)
        if self.rho_min is not None and rho_max < self.rho_min:
            raise OptimizerError(
                f"rho (rho_max) must be >= rho_min {self.rho_min!r}, got {rho_max!r}", "rho"
            )
        self._rho = rho_max

    def _perturb(self, params: dict[str, Any], grads: dict[str, Any]) -> float:
        norm = _core.sam_perturb(
            params, self._order, grads, self._saved, self._grad0, self.rho, self.eps, False, 0.0
        )
        self._grad0_norm = norm
        return norm

    def _gsam_mix(self) -> GsamMix:
        return (self._grad0, self.alpha, self._grad0_norm)

    def _foreign_gradients(self, params: dict[str, Any], grads: dict[str, Any]) -> Grads:
        _core.gsam_direction(
            params, self._order, grads, self._grad0, self._direction, self.alpha, self._grad0_norm
        )
        return {name: self._direction[name] for name in params}

    def _pending_scalars(self) -> dict[str, NDArray[Any]]:
        return {"grad_norm0": np.array(self._grad0_norm)}

    def _pending_scalars_names(self) -> tuple[str, ...]:
        return ("grad_norm0",)

    def _load_pending_scalars(self, state: Mapping[str, Any]) -> dict[str, float]:
        return {"_grad0_norm": scalar_entry(state, "grad_norm0", positive=True)}

    def __repr__(self) -> str:
        return (
            f"GsamOptimizer({self.base_optimizer!r}, rho_max={self._rho!r}, "
            f"rho_min={self.rho_min!r}, alpha={self.alpha!r}, lr_min={self.lr_min!r}, "
            f"eps={self.eps!r}, interval={self.interval!r})"
        )
