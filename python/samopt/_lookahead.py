"""Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019) over any optimizer, SAM included."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _core
from ._config import check_real
from ._errors import OptimizerError
from ._protocol import Grads, Optimizer, Params, StateDict
from ._sam import GradFn, _check_base
from ._state import as_dict, scalar_entry, state_array, time_step_entry

__all__ = ["LookaheadOptimizer"]

_SLOW = "slow_"
_COUNTER = "step_counter"
_OWN_SCALARS = (_COUNTER, "alpha", "k")


def _check_alpha(alpha: object) -> float:
    value = check_real("alpha", alpha, minimum=0.0)
    if value > 1.0:
        raise OptimizerError(f"alpha must be in [0, 1], got {value!r}", "alpha")
    return value


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= 2**62:
        raise OptimizerError(f"k must be an int >= 1, got {k!r}", "k")
    return int(k)


class LookaheadOptimizer:
    """Lookahead: the inner optimizer takes ``k`` fast steps, then the slow weights φ move
    towards the fast weights θ and the fast weights restart from them:
    ``φ ← φ + α·(θ − φ) ; θ ← φ`` (the paper's Algorithm 1; defaults α = 0.5, k = 5).

    ``inner`` is any object that satisfies the ``Optimizer`` protocol: a samopt optimizer,
    a SamOptimizer or GsamOptimizer (then ``first_step``, ``second_step``, ``sam_step`` and
    ``restore`` go through to it, and a SAM step counts as one fast step), or one written
    in Python. The slow weights of a parameter are its values before its first fast step;
    they are state (``slow_<name>``), with the step count ``step_counter``, ``alpha`` and
    ``k``. The synchronisation is one native pass over every array, reading θ and φ and
    writing both; each call is one native call around the inner optimizer's, so a step
    commits whole or not at all.
    """

    def __init__(self, inner: Optimizer, alpha: float = 0.5, k: int = 5) -> None:
        _check_base(inner)
        self.inner = inner
        self._alpha = _check_alpha(alpha)
        self._k = _check_k(k)
        self._lock = threading.RLock()
        self._engine = _core.LookaheadEngine()

    @property
    def alpha(self) -> float:
        """The slow weights' step towards the fast weights, in [0, 1]."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(value)

    @property
    def k(self) -> int:
        """Fast steps between synchronisations."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = _check_k(value)

    @property
    def step_counter(self) -> int:
        """Fast steps taken."""
        return int(self._engine.steps)

    def _inner_pending(self) -> bool:
        return bool(getattr(self.inner, "pending", False))

    def _run(self, params: Params, call: Any, advance: bool) -> Any:
        params_dict = as_dict(params, "params")
        with self._lock:
            return _core.lookahead_step(
                self._engine, params_dict, lambda: call(params_dict), self._alpha, self._k,
                advance, self._inner_pending(),
            )

    def _sam_method(self, name: str) -> Any:
        method = getattr(self.inner, name, None)
        if method is None:
            raise OptimizerError(
                f"{type(self.inner).__name__} has no {name} (LookaheadOptimizer passes it "
                "through to a SAM inner optimizer)",
                name,
            )
        return method

    def step(self, params: Params, grads: Grads) -> None:
        """One fast step of the inner optimizer; every ``k``-th also synchronises."""
        grads_dict = as_dict(grads, "grads")
        self._run(params, lambda p: self.inner.step(p, grads_dict), True)

    def first_step(self, params: Params, grads: Grads) -> None:
        """The inner SAM's first_step; the slow weights of new parameters are taken first,
        from their unperturbed values. Not a step of its own."""
        first_step = self._sam_method("first_step")
        grads_dict = as_dict(grads, "grads")
        self._run(params, lambda p: first_step(p, grads_dict), False)

    def second_step(self, params: Params, grads: Grads) -> None:
        """The inner SAM's second_step: one fast step (the same as ``step``)."""
        second_step = self._sam_method("second_step")
        grads_dict = as_dict(grads, "grads")
        self._run(params, lambda p: second_step(p, grads_dict), True)

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        """The inner SAM's sam_step, one fast step; returns its loss."""
        sam_step = self._sam_method("sam_step")
        return self._run(params, lambda p: sam_step(p, grad_fn), True)

    def restore(self, params: Params) -> None:
        """The inner SAM's restore (abandons a pending first_step)."""
        self._sam_method("restore")(params)

    @property
    def pending(self) -> bool:
        """Whether the inner optimizer has a first_step pending."""
        return self._inner_pending()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def get_lr(self) -> float:
        return self.inner.get_lr()

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    @staticmethod
    def _is_own_key(key: object) -> bool:
        return isinstance(key, str) and (key in _OWN_SCALARS or key.startswith(_SLOW))

    def state_dict(self) -> StateDict:
        """The inner optimizer's state, ``step_counter``, ``alpha``, ``k`` and the slow
        weights ``slow_<name>``."""
        with self._lock:
            state = self.inner.state_dict()
            clash = sorted(k for k in state if self._is_own_key(k))
            if clash:
                raise OptimizerError(
                    f"the inner optimizer's state key '{clash[0]}' clashes with "
                    "LookaheadOptimizer's",
                    clash[0],
                )
            state.update(self._engine.state_dict())
            state["alpha"] = np.array(self._alpha)
            state["k"] = np.array(self._k, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built optimizer); checks everything,
        the inner optimizer's part included, before changing anything."""
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        staged, alpha, k = self._stage(state)
        inner_state = {key: v for key, v in state.items() if not self._is_own_key(key)}
        with self._lock:
            self.inner.load_state_dict(inner_state)
            self._engine.install(staged)
            self._alpha, self._k = alpha, k

    def _stage(self, state: Mapping[str, Any]) -> tuple[Any, float, int]:
        counter = time_step_entry(state, _COUNTER)
        alpha = _check_alpha(scalar_entry(state, "alpha"))
        k = _check_k(time_step_entry(state, "k"))
        keys = sorted(key for key in state if isinstance(key, str) and key.startswith(_SLOW))
        entries = {key[len(_SLOW):]: (state_array(state, key),) for key in keys}
        return self._engine.stage(counter, entries), alpha, k

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
            state["_engine"] = self._engine.state_dict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        own = dict(state.pop("_engine"))
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._engine = _core.LookaheadEngine()
        own["alpha"], own["k"] = np.array(self._alpha), np.array(self._k)
        self._engine.install(self._stage(own)[0])

    def __repr__(self) -> str:
        return f"LookaheadOptimizer({self.inner!r}, alpha={self._alpha!r}, k={self._k!r})"
