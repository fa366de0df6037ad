"""Sharpness-Aware Minimization over any base optimizer."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._config import check_real
from ._errors import OptimizerError
from ._optimizers import NativeOptimizer
from ._protocol import Grads, Optimizer, Params, StateDict
from ._state import as_dict, scalar_entry, state_array

__all__ = ["SamOptimizer"]

_SAVED = "saved_"


class SamOptimizer:
    """SAM (Foret et al., 2021), or adaptive SAM (Kwon et al., 2021) with ``adaptive=True``.

    ``first_step`` moves the parameters to ``p + ρ·g/‖g‖`` (adaptive: ``p + ρ·T²⊙g/‖T⊙g‖``
    with ``T = |p| + eta``), remembering their exact values; ``second_step`` puts them back
    bit for bit and lets the base optimizer step with the gradient taken at the moved point.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
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
        # Scratch buffers that receive the values first_step moves away from; reused across
        # steps so a step allocates nothing proportional to the parameters.
        self._saved: dict[str, NDArray[Any]] = {}
        # Names moved by the pending first_step, or None when nothing is pending.
        self._pending: frozenset[str] | None = None
        self._lock = threading.Lock()

    @property
    def rho(self) -> float:
        """The neighbourhood radius; can be changed between steps (rho schedules)."""
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_real("rho", value, above=0.0)

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
            moved = _core.sam_perturb(
                params_dict, grads_dict, self._saved, self._rho, self.adaptive, self.eta
            )
            if moved:
                self._pending = frozenset(params_dict)

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
                base.step_from(params_dict, grads_dict, self._saved)
            else:
                # A foreign optimizer sees the restored parameters; swapping (rather than
                # copying) keeps the perturbed values, so a failing step can be undone.
                _core.restore(params_dict, self._saved, True)
                try:
                    base.step(params_dict, grads_dict)
                except BaseException:
                    _core.restore(params_dict, self._saved, True)
                    raise
            self._pending = None

    step = second_step

    def restore(self, params: Params) -> None:
        """Abandons a pending perturbation: puts the parameters back to their values before
        first_step, bit for bit (e.g. after second_step raised NonFiniteGradientError)."""
        params_dict = as_dict(params, "params")
        with self._lock:
            if self._pending is None:
                return
            self._check_pending_names(params_dict)
            _core.restore(params_dict, self._saved, False)
            self._pending = None

    def _check_pending_names(self, params: dict[str, Any]) -> None:
        assert self._pending is not None
        if self._pending == params.keys():
            return
        missing = sorted(self._pending - params.keys())
        extra = sorted(set(params) - self._pending)
        key = (missing + extra)[0]
        raise OptimizerError(
            "second_step must get the same parameter names as the pending first_step: "
            f"missing {missing}, unexpected {extra}",
            key,
        )

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad()

    def get_lr(self) -> float:
        return self.base_optimizer.get_lr()

    def set_lr(self, lr: float) -> None:
        self.base_optimizer.set_lr(lr)

    def state_dict(self) -> StateDict:
        """The base optimizer's state, ``rho``, and ``saved_<name>`` for each parameter of
        a pending first_step."""
        with self._lock:
            state = self.base_optimizer.state_dict()
            clash = sorted(k for k in state if k == "rho" or k.startswith(_SAVED))
            if clash:
                raise OptimizerError(
                    f"the base optimizer's state key '{clash[0]}' clashes with SamOptimizer's",
                    clash[0],
                )
            state["rho"] = np.array(self._rho)
            for name in sorted(self._pending or ()):
                state[_SAVED + name] = self._saved[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built SamOptimizer); checks everything
        before changing anything."""
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        rho = scalar_entry(state, "rho", positive=True)
        saved_keys = {k for k in state if isinstance(k, str) and k.startswith(_SAVED)}
        saved = {key[len(_SAVED):]: state_array(state, key) for key in sorted(saved_keys)}
        base_state = {k: v for k, v in state.items() if k != "rho" and k not in saved_keys}
        with self._lock:
            self.base_optimizer.load_state_dict(base_state)
            self._rho = rho
            self._saved = saved
            self._pending = frozenset(saved) if saved else None

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"SamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, "
            f"adaptive={self.adaptive!r}, eta={self.eta!r})"
        )
