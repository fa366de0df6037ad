"""The base optimizers: SGD with momentum, Adam and AdamW over dicts of NumPy arrays.

Each is a thin facade over a native engine (``samopt._core.Engine``) that holds the
optimizer's state — its per-parameter slots and step count — and commits every step inside
the one native call that makes it.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class LoadedState:
    """A base optimizer's state dict, checked: the learning rate, the step count and, by
    parameter name, one array per slot."""

    lr: float
    t: int
    entries: dict[str, tuple[NDArray[Any], ...]]


class NativeOptimizer:
    """What samopt's base optimizers share: config, a lock, a native engine that holds the
    state, pickling, and a step that SamOptimizer can fuse with its restore."""

    _kind = ""
    """The engine's optimizer kind."""
    _non_negative: tuple[str, ...] = ()
    """State-dict prefixes whose values cannot be negative."""

    def __init__(self, config: OptimizerConfig | None = None) -> None:
        if config is None:
            config = OptimizerConfig()
        if not isinstance(config, OptimizerConfig):
            raise OptimizerError(
                f"config must be an OptimizerConfig, got {type(config).__name__}", "config"
            )
        self.config = config
        # Kernels run without the GIL: the lock keeps concurrent calls of one optimizer
        # from interleaving (re-entrant, so a gradient function run inside a SAM step may
        # use the optimizer).
        self._lock = threading.RLock()
        self._engine = self._new_engine()

    def _new_engine(self) -> _core.Engine:
        config = self.config
        clip_value, clip_norm = config.clip_bounds
        return _core.Engine(
            self._kind,
            lr=config.learning_rate,
            momentum=config.momentum,
            beta1=config.beta1,
            beta2=config.beta2,
            epsilon=config.epsilon,
            weight_decay=config.weight_decay,
            clip_value=clip_value,
            clip_norm=clip_norm,
        )

    def step(self, params: Params, grads: Grads) -> None:
        """One optimizer step: updates every array of ``params`` in place."""
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock:
            _core.step(self._engine, params_dict, grads_dict)

    def zero_grad(self) -> None:
        """Nothing to do: gradients are the caller's arrays (kept for API parity)."""

    def get_lr(self) -> float:
        return self._engine.lr

    def set_lr(self, lr: float) -> None:
        value = check_learning_rate(lr, "lr")
        with self._lock:
            self._engine.lr = value

    def state_dict(self) -> StateDict:
        with self._lock:
            state: StateDict = {"lr": np.array(self._engine.lr)}
            state.update(self._engine.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built optimizer); checks everything
        before changing anything."""
        self._install(self._parse_state(state))

    def _parse_state(self, state: Mapping[str, Any]) -> LoadedState:
        """A state dict checked and copied, not yet in force."""
        slots = tuple(self._engine.slots)
        counts_steps = self._kind != "sgd"
        scalars = ("lr", "t") if counts_steps else ("lr",)
        groups = split_by_prefix(state, slots, scalars)
        lr = scalar_entry(state, "lr")
        t = time_step_entry(state, "t") if counts_steps else 0
        names = sorted(set().union(*(groups[prefix].keys() for prefix in slots)))
        entries: dict[str, tuple[NDArray[Any], ...]] = {}
        for name in names:
            missing = [prefix for prefix in slots if name not in groups[prefix]]
            if missing:
                key = next(groups[p][name] for p in slots if name in groups[p])
                raise OptimizerError(
                    f"state '{key}' has no matching {'/'.join(missing)} partner", key
                )
            arrays = tuple(
                state_array(state, prefix + name, non_negative=prefix in self._non_negative)
                for prefix in slots
            )
            if any(a.shape != arrays[0].shape or a.dtype != arrays[0].dtype for a in arrays):
                keys = " and ".join(f"'{prefix}{name}'" for prefix in slots)
                raise OptimizerError(f"state {keys} differ in shape or dtype", slots[0] + name)
            entries[name] = arrays
        return LoadedState(lr, t, entries)

    def _install(self, loaded: LoadedState) -> None:
        with self._lock:
            self._engine.load(loaded.t, loaded.entries)
            self._engine.lr = loaded.lr

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
            state["_engine"] = self.state_dict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_engine")
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._engine = self._new_engine()
        self.load_state_dict(saved)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SgdOptimizer(NativeOptimizer):
    """SGD with momentum, the crate's formula: ``v ← μ·v + lr·g ; p ← p − v``."""

    _kind = "sgd"


class AdamOptimizer(NativeOptimizer):
    """Adam, the crate's formula (weight_decay unused):
    ``lr_t = lr·√(1−β2^t)/(1−β1^t) ; p ← p − lr_t·m/(√v + ε)``."""

    _kind = "adam"
    _non_negative = ("v_",)


class AdamWOptimizer(AdamOptimizer):
    """Adam with decoupled weight decay from the step's starting value:
    ``p ← p − lr_t·m/(√v+ε) − lr·wd·p_old``."""

    _kind = "adamw"
