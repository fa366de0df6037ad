"""The base optimizers: SGD with momentum, Adam and AdamW over dicts of NumPy arrays."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._config import OptimizerConfig, check_learning_rate
from ._errors import OptimizerError
from ._protocol import Grads, Params, StateDict
from ._state import as_dict, scalar_entry, split_by_prefix, state_array, time_step_entry

GsamMix = tuple[dict[str, NDArray[Any]], float, float]
"""GSAM's inputs to a fused step: the kept gradients g0, alpha, and ‖g0‖."""

__all__ = [
    "AdamOptimizer",
    "AdamWOptimizer",
    "NativeOptimizer",
    "SgdOptimizer",
    "compute_gradient_norm",
]


def compute_gradient_norm(grads: Grads) -> float:
    """The global L2 norm of all gradients, accumulated in float64 in a fixed order: NaN
    when any element is NaN, infinity when any is infinite."""
    return float(_core.gradient_norm(as_dict(grads, "grads")))


class NativeOptimizer:
    """What samopt's base optimizers share: config, learning rate, a lock, pickling, and a
    step that SamOptimizer can fuse with its restore."""

    def __init__(self, config: OptimizerConfig | None = None) -> None:
        if config is None:
            config = OptimizerConfig()
        if not isinstance(config, OptimizerConfig):
            raise OptimizerError(
                f"config must be an OptimizerConfig, got {type(config).__name__}", "config"
            )
        self.config = config
        self._lr = config.learning_rate
        # Kernels run without the GIL: this lock keeps concurrent steps of one optimizer
        # from interleaving (they are serialised).
        self._lock = threading.Lock()
        # The last parameter names' sorted order, reused while they stay the same objects.
        self._order = _core.NameOrder()

    def step(self, params: Params, grads: Grads) -> None:
        """One optimizer step: updates every array of ``params`` in place."""
        self.step_from(as_dict(params, "params"), as_dict(grads, "grads"))

    def step_from(
        self,
        params: dict[str, Any],
        grads: dict[str, Any],
        saved: dict[str, NDArray[Any]] | None = None,
        gsam: GsamMix | None = None,
    ) -> None:
        """A step that starts from ``saved`` values instead of the parameters' current
        ones (SAM's restore fused into the update), and with ``gsam`` = (g0 buffers, alpha,
        ‖g0‖) steps with GSAM's ``g1 − alpha·g0⊥`` instead of ``grads``."""
        with self._lock:
            self._step(params, grads, saved, gsam)

    def _step(
        self,
        params: dict[str, Any],
        grads: dict[str, Any],
        saved: dict[str, NDArray[Any]] | None,
        gsam: GsamMix | None,
    ) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Nothing to do: gradients are the caller's arrays (kept for API parity)."""

    def get_lr(self) -> float:
        return self._lr

    def set_lr(self, lr: float) -> None:
        value = check_learning_rate(lr, "lr")
        with self._lock:
            self._lr = value

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"], state["_order"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._order = _core.NameOrder()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SgdOptimizer(NativeOptimizer):
    """SGD with momentum, the crate's formula: ``v ← μ·v + lr·g ; p ← p − v``."""

    def __init__(self, config: OptimizerConfig | None = None) -> None:
        super().__init__(config)
        self._velocity: dict[str, NDArray[Any]] = {}

    def _step(
        self,
        params: dict[str, Any],
        grads: dict[str, Any],
        saved: dict[str, NDArray[Any]] | None,
        gsam: GsamMix | None,
    ) -> None:
        clip_value, clip_norm = self.config.clip_bounds
        _core.sgd_step(
            params, self._order, grads, self._velocity, saved, gsam,
            self._lr, self.config.momentum, clip_value, clip_norm,
        )

    def state_dict(self) -> StateDict:
        with self._lock:
            state: StateDict = {"lr": np.array(self._lr)}
            for name in sorted(self._velocity):
                state[f"velocity_{name}"] = self._velocity[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = split_by_prefix(state, ("velocity_",), ("lr",))
        lr = scalar_entry(state, "lr")
        velocity = {name: state_array(state, key) for name, key in groups["velocity_"].items()}
        with self._lock:
            self._lr, self._velocity = lr, velocity


class AdamOptimizer(NativeOptimizer):
    """Adam, the crate's formula (weight_decay unused):
    ``lr_t = lr·√(1−β2^t)/(1−β1^t) ; p ← p − lr_t·m/(√v + ε)``."""

    _decoupled_decay = False

    def __init__(self, config: OptimizerConfig | None = None) -> None:
        super().__init__(config)
        self._t = 0
        self._m: dict[str, NDArray[Any]] = {}
        self._v: dict[str, NDArray[Any]] = {}

    def _step(
        self,
        params: dict[str, Any],
        grads: dict[str, Any],
        saved: dict[str, NDArray[Any]] | None,
        gsam: GsamMix | None,
    ) -> None:
        if not params:
            return
        config = self.config
        t = self._t + 1
        lr_t = self._lr * math.sqrt(1.0 - config.beta2**t) / (1.0 - config.beta1**t)
        decay = self._lr * config.weight_decay if self._decoupled_decay else 0.0
        clip_value, clip_norm = config.clip_bounds
        _core.adam_step(
            params, self._order, grads, self._m, self._v, saved, gsam,
            lr_t, config.beta1, config.beta2, config.epsilon, decay, clip_value, clip_norm,
        )
        self._t = t

    def state_dict(self) -> StateDict:
        with self._lock:
            state: StateDict = {"lr": np.array(self._lr), "t": np.array(self._t, dtype=np.int64)}
            for name in sorted(self._m):
                state[f"m_{name}"] = self._m[name].copy()
                state[f"v_{name}"] = self._v[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = split_by_prefix(state, ("m_", "v_"), ("lr", "t"))
        lr = scalar_entry(state, "lr")
        t = time_step_entry(state, "t")
        m_keys, v_keys = groups["m_"], groups["v_"]
        for name in sorted(m_keys.keys() ^ v_keys.keys()):
            key = m_keys.get(name) or v_keys[name]
            raise OptimizerError(f"state '{key}' has no matching m_/v_ partner", key)
        m = {name: state_array(state, key) for name, key in m_keys.items()}
        v = {name: state_array(state, key, non_negative=True) for name, key in v_keys.items()}
        for name in sorted(m):
            if m[name].shape != v[name].shape or m[name].dtype != v[name].dtype:
                raise OptimizerError(
                    f"state 'm_{name}' and 'v_{name}' differ in shape or dtype", f"m_{name}"
                )
        with self._lock:
            self._lr, self._t, self._m, self._v = lr, t, m, v


class AdamWOptimizer(AdamOptimizer):
    """Adam with decoupled weight decay from the step's starting value:
    ``p ← p − lr_t·m/(√v+ε) − lr·wd·p_old``."""

    _decoupled_decay = True
