"""The base optimizers over dicts of NumPy arrays: SGD with momentum, Adam and AdamW, and
tensorlogic-train's element-wise others (Adagrad, RMSprop, NAdam, AdaMax, RAdam, AdaBelief,
Lion, ScheduleFreeAdamW).

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

from . import _core
from ._config import (
    LionConfig,
    OptimizerConfig,
    ScheduleFreeConfig,
    check_bool,
    check_learning_rate,
    check_real,
    check_schedule_free_lr,
)
from ._errors import OptimizerError, TrainError
from ._flat import FLAT_KEY, FlatParams, flat_call, flat_error
from ._groups import Check, ParamGroups
from ._protocol import Grads, Params, StateDict
from ._state import as_dict, scalar_entry, scalar_value, state_mapping, time_step_entry

__all__ = [
    "AdaBeliefOptimizer",
    "AdaMaxOptimizer",
    "AdagradOptimizer",
    "AdamOptimizer",
    "AdamWOptimizer",
    "LionOptimizer",
    "NAdamOptimizer",
    "NativeOptimizer",
    "RAdamOptimizer",
    "RMSpropOptimizer",
    "ScheduleFreeAdamW",
    "SgdOptimizer",
    "compute_gradient_norm",
]


def compute_gradient_norm(grads: Grads) -> float:
    """The global L2 norm of all gradients, accumulated in float64 in a fixed order: NaN
    when any element is NaN, infinity when any is infinite."""
    return float(_core.gradient_norm(as_dict(grads, "grads")))


@dataclasses.dataclass(frozen=True)
class LoadedState:
    """A base optimizer's state dict, checked: the learning rates (the optimizer's own, then
    each parameter group's), the step count and, by parameter name, one array per slot
    (copied, in a native table)."""

    lrs: list[float]
    t: int
    entries: _core.StagedTable


def _check_unit(key: str, value: object) -> float:
    return check_real(key, value, minimum=0.0, below=1.0)


# How each hyperparameter a parameter group may override is checked.
_GROUP_CHECKS: dict[str, Check] = {
    "lr": lambda key, value: check_learning_rate(value, key),
    "momentum": lambda key, value: check_real(key, value, minimum=0.0),
    "beta1": _check_unit,
    "beta2": _check_unit,
    "epsilon": lambda key, value: check_real(key, value, above=0.0),
    "weight_decay": lambda key, value: check_real(key, value, minimum=0.0),
    "nesterov": check_bool,
}


def _group_lr_key(index: int) -> str:
    return f"param_groups.{index}.lr"


class NativeOptimizer:
    """What samopt's base optimizers share: config, parameter groups, a lock, a native
    engine that holds the state, pickling, and a step that SamOptimizer can fuse with its
    restore."""

    _kind = ""
    """The engine's optimizer kind."""
    _config_class: type[OptimizerConfig] | type[LionConfig] | type[ScheduleFreeConfig] = (
        OptimizerConfig
    )
    """The configuration the optimizer is built from."""
    _counts_steps = True
    """Whether the step count ``t`` is part of the state."""
    _non_negative: tuple[str, ...] = ()
    """State-dict prefixes whose values cannot be negative."""
    _default_weight_decay = 0.0
    """What ``weight_decay=None`` means for this optimizer."""
    _group_keys: tuple[str, ...] = ("lr", "beta1", "beta2", "epsilon", "weight_decay")
    """What a parameter group may override."""
    _group_checks: Mapping[str, Check] = _GROUP_CHECKS
    """How each of those overrides is checked."""
    _flat_capable = True
    """Whether a call over a ``flat_params`` arena may be made over its buffer as one
    array: every element-wise optimizer, not those that measure each array (layer-wise)."""
    _flat: _core.FlatArena | None = None
    """The arena whose layout the engine's state is held in (one buffer per slot)."""

    def __init__(
        self,
        config: OptimizerConfig | LionConfig | ScheduleFreeConfig | None = None,
        *,
        param_groups: object = None,
    ) -> None:
        if config is None:
            config = self._config_class()
        if not isinstance(config, self._config_class):
            expected = self._config_class.__name__
            article = "an" if expected[0] in "AEIOU" else "a"
            raise OptimizerError(
                f"config must be {article} {expected}, got {type(config).__name__}", "config"
            )
        nesterov = isinstance(config, OptimizerConfig) and config.nesterov
        if nesterov and "nesterov" not in self._group_keys:
            raise OptimizerError(
                f"nesterov applies to SgdOptimizer's momentum, not to {type(self).__name__}",
                "nesterov",
            )
        self.config = config
        checks = {key: self._group_checks[key] for key in self._group_keys}
        self.param_groups = ParamGroups.parse(param_groups, checks)
        if config.learning_rate == 0.0 and any("lr" in o for o in self.param_groups.overrides):
            raise OptimizerError(
                "a parameter group's lr keeps its ratio to the optimizer's learning_rate, "
                "which is 0",
                "lr",
            )
        # Kernels run without the GIL: the lock keeps concurrent calls of one optimizer
        # from interleaving (re-entrant, so a gradient function run inside a SAM step may
        # use the optimizer).
        self._lock = threading.RLock()
        self._engine = self._new_engine()
        self._flat = None

    def _hyperparameters(self) -> list[dict[str, Any]]:
        """The optimizer's hyperparameters, then each parameter group's."""
        config = self.config
        assert isinstance(config, OptimizerConfig)
        weight_decay = config.weight_decay
        defaults = {
            "lr": config.learning_rate,
            "momentum": config.momentum,
            "beta1": config.beta1,
            "beta2": config.beta2,
            "epsilon": config.epsilon,
            "weight_decay": self._default_weight_decay if weight_decay is None else weight_decay,
            "nesterov": config.nesterov,
        }
        return self.param_groups.resolved(defaults)

    def _new_engine(self) -> _core.Engine:
        clip_value, clip_norm = self.config.clip_bounds
        assign = self.param_groups.assign if len(self.param_groups) else None
        return _core.Engine(
            self._kind,
            self._hyperparameters(),
            clip_value=clip_value,
            clip_norm=clip_norm,
            assign=assign,
        )

    def _scaled_lrs(self, lr: float) -> list[float]:
        """Every group's learning rate for the optimizer's ``lr``: a group that sets its own
        keeps its ratio to the configured one, the others take ``lr`` itself."""
        configured = self.config.learning_rate
        lrs = [lr]
        for values in self.param_groups.overrides:
            lrs.append(values["lr"] * (lr / configured) if "lr" in values else lr)
        return lrs

    def step(self, params: Params, grads: Grads) -> None:
        """One optimizer step: updates every array of ``params`` in place."""
        with self._lock:
            arena, params_dict, grads_dict = self._route(params, grads)
            # try, not a context manager: free when nothing is raised.
            try:
                _core.step(self._engine, params_dict, grads_dict)
            except TrainError as error:
                if arena is None:
                    raise
                raise flat_error(error, arena, params_dict, grads_dict) from None

    def _route(
        self, params: object, grads: object
    ) -> tuple[_core.FlatArena | None, dict[Any, Any], dict[Any, Any]]:
        """The call's dicts: over an arena's buffers when both are intact arenas of one
        layout and the state can be held in it, else the caller's arrays, with the state
        moved to match (under the lock)."""
        if isinstance(params, FlatParams):
            call = flat_call(params, grads)
            if call is not None and self._takes_flat() and self._use_flat(call[0]):
                return call
        if self._flat is not None:
            self._use_names()
        return None, as_dict(params, "params"), as_dict(grads, "grads")

    def _takes_flat(self) -> bool:
        return self._flat_capable and not len(self.param_groups)

    def _use_flat(self, arena: _core.FlatArena) -> bool:
        """Holds the state in ``arena``'s layout, gathering what is held per name; False
        when it cannot be (a slot held for some of the arena's names but not all)."""
        if self._flat is not None and self._flat.same_layout(arena):
            return True
        gathered = self._gathered_state(arena)
        if gathered is None:
            return False
        if self._flat is not None or any(s + FLAT_KEY in gathered for s in self._engine.slots):
            self.load_state_dict(gathered)
        self._flat = arena
        return True

    def _use_names(self) -> None:
        """Holds the state per name again, cutting an arena's buffers along its ranges."""
        if self._flat is None:
            return
        state = self.state_dict()
        self.load_state_dict(state)

    def zero_grad(self) -> None:
        """Nothing to do: gradients are the caller's arrays (kept for API parity)."""

    def get_lr(self) -> float:
        """The optimizer's own learning rate (parameter groups keep their ratio to it)."""
        return self._engine.lrs[0]

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate; every parameter group's that sets its own is scaled by
        the same factor."""
        lrs = self._scaled_lrs(check_learning_rate(lr, "lr"))
        with self._lock:
            self._engine.lrs = lrs

    def _learning_rates_state(self) -> StateDict:
        lrs = self._engine.lrs
        state: StateDict = {"lr": np.array(lrs[0])}
        for index, lr in enumerate(lrs[1:]):
            state[_group_lr_key(index)] = np.array(lr)
        return state

    def state_dict(self) -> StateDict:
        with self._lock:
            state = self._learning_rates_state()
            self._engine.state_dict(state)
            if self._flat is not None:
                state = self._flat.split_state(state, FLAT_KEY)
        return state

    def _gathered_state(self, arena: _core.FlatArena) -> StateDict | None:
        """``state_dict()`` with the state of ``arena``'s names joined into its layout's
        buffers (keys ``<slot>FLAT_KEY``), made from the engine's tables without an
        array per name when the state is held per name; None when it cannot be held in
        the arena's layout (a slot held for some of its names but not all)."""
        if self._flat is not None:
            moved = arena.gather_state(self.state_dict(), list(self._engine.slots), FLAT_KEY)
            return None if moved is None else moved[0]
        state = self._learning_rates_state()
        return state if self._engine.state_dict_gathered(state, arena, FLAT_KEY) else None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built optimizer); checks everything
        before changing anything."""
        self._install(self._parse_state(state))

    def _parse_state(
        self, state: Mapping[str, Any], ignore: tuple[list[str], list[str]] = ([], [])
    ) -> LoadedState:
        """A state dict checked and copied, not yet in force. ``ignore`` holds the keys and
        key prefixes of another part of the state (a SamOptimizer's own)."""
        slots = tuple(self._engine.slots)
        counts_steps = self._counts_steps
        group_lrs = tuple(_group_lr_key(i) for i in range(len(self.param_groups)))
        scalars = ("lr", *group_lrs, "t") if counts_steps else ("lr", *group_lrs)
        state = state_mapping(state)
        lrs = [scalar_entry(state, key) for key in ("lr", *group_lrs)]
        t = time_step_entry(state, "t") if counts_steps else 0
        # One native pass over the keys: grouped by name, checked and copied.
        skip_keys, skip_prefixes = ignore
        entries = _core.parse_table(
            state, list(slots), list(self._non_negative), [*scalars, *skip_keys], skip_prefixes
        )
        return LoadedState(lrs, t, entries)

    def _install(self, loaded: LoadedState) -> None:
        with self._lock:
            self._engine.load(loaded.t, loaded.entries)
            self._engine.lrs = loaded.lrs
            self._flat = None

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
            state["_engine"] = self.state_dict()
            state["_flat"] = None
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
    """SGD with momentum, the crate's formula: ``v ← μ·v + lr·g ; p ← p − v``, with
    ``g ← g + wd·p`` for an explicit weight_decay (L2, as PyTorch's SGD); with
    ``nesterov=True``, ``p ← p − (lr·g + μ·v)`` (PyTorch's Nesterov momentum in this form)."""

    _kind = "sgd"
    _counts_steps = False
    _group_keys = ("lr", "momentum", "weight_decay", "nesterov")


class AdamOptimizer(NativeOptimizer):
    """Adam, the crate's formula: ``lr_t = lr·√(1−β2^t)/(1−β1^t) ;
    p ← p − lr_t·m/(√v + ε)``, with ``g ← g + wd·p`` for an explicit weight_decay (L2, as
    PyTorch's Adam)."""

    _kind = "adam"
    _non_negative = ("v_",)


class AdamWOptimizer(AdamOptimizer):
    """Adam with decoupled weight decay from the step's starting value:
    ``p ← p − lr_t·m/(√v+ε) − lr·wd·p_old`` (weight_decay 0.01 unless set)."""

    _kind = "adamw"
    _default_weight_decay = 0.01


class AdagradOptimizer(NativeOptimizer):
    """Adagrad (Duchi, Hazan & Singer, JMLR 2011), the crate's formula:
    ``s ← s + g² ; p ← p − lr·g/(√s + ε)``, with ``g ← g + wd·p`` for an explicit
    weight_decay (L2, as PyTorch's Adagrad). State ``sum_squared_grads_<name>``."""

    _kind = "adagrad"
    _counts_steps = False
    _non_negative = ("sum_squared_grads_",)
    _group_keys = ("lr", "epsilon", "weight_decay")


class RMSpropOptimizer(NativeOptimizer):
    """RMSprop (Tieleman & Hinton, 2012), the crate's formula with ``α = beta2``:
    ``v ← α·v + (1−α)·g² ; p ← p − lr·g/(√v + ε)``, with ``g ← g + wd·p`` for an explicit
    weight_decay (L2, as PyTorch's RMSprop). State ``v_<name>``."""

    _kind = "rmsprop"
    _counts_steps = False
    _non_negative = ("v_",)
    _group_keys = ("lr", "beta2", "epsilon", "weight_decay")


class NAdamOptimizer(NativeOptimizer):
    """NAdam (Dozat, ICLR 2016 workshop), the paper's algorithm as PyTorch writes it, with
    the momentum schedule ``μ_t = β1·(1 − ½·0.96^(t/250))`` and ``Π_t = μ_1⋯μ_t``:
    ``m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ; d = √(v/(1−β2^t)) + ε ;
    p ← p − lr·(1−μ_t)/(1−Π_t)·g/d − lr·μ_{t+1}/(1−Π_t·μ_{t+1})·m/d``, with ``g ← g + wd·p``
    for an explicit weight_decay (L2). State ``t``, ``m_<name>``, ``v_<name>``."""

    _kind = "nadam"
    _non_negative = ("v_",)


class AdaMaxOptimizer(NativeOptimizer):
    """AdaMax (Kingma & Ba, ICLR 2015, §7.1), the crate's formula:
    ``m ← β1·m + (1−β1)·g ; u ← max(β2·u, |g|) ; p ← p − lr/(1−β1^t)·m/(u + ε)``, with
    ``g ← g + wd·p`` for an explicit weight_decay (L2). State ``t``, ``m_<name>``,
    ``u_<name>``."""

    _kind = "adamax"
    _non_negative = ("u_",)


class RAdamOptimizer(NativeOptimizer):
    """RAdam (Liu et al., ICLR 2020), the crate's formula: with ``ρ∞ = 2/(1−β2) − 1`` and
    ``ρ_t = ρ∞ − 2t·β2^t/(1−β2^t)``, ``m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g²``; when
    ``ρ_t > 5``, ``p ← p − lr·r_t/(1−β1^t)·m/(√(v/(1−β2^t)) + ε)`` with
    ``r_t = √((ρ_t−4)(ρ_t−2)ρ∞/((ρ∞−4)(ρ∞−2)ρ_t))``, else ``p ← p − lr/(1−β1^t)·m``; with
    ``g ← g + wd·p`` for an explicit weight_decay (L2). State ``t``, ``m_<name>``,
    ``v_<name>``."""

    _kind = "radam"
    _non_negative = ("v_",)


class AdaBeliefOptimizer(NativeOptimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020, Algorithm 2): ``m ← β1·m + (1−β1)·g ;
    s ← β2·s + (1−β2)·(g−m)² + ε ; p ← p − lr/(1−β1^t)·m/(√(s/(1−β2^t)) + ε) − lr·wd·p_old``,
    the weight decay decoupled as in the crate (0.01 unless set). State ``t``, ``m_<name>``,
    ``s_<name>``."""

    _kind = "adabelief"
    _non_negative = ("s_",)
    _default_weight_decay = 0.01


class LionOptimizer(NativeOptimizer):
    """Lion (Chen et al., NeurIPS 2023, "Symbolic Discovery of Optimization Algorithms"),
    built from a ``LionConfig``: ``c = β1·m + (1−β1)·g ; p ← p − lr·(sign(c) + wd·p_old) ;
    m ← β2·m + (1−β2)·g``, the weight decay decoupled as in the paper. State
    ``momentum.<name>`` (the crate's key)."""

    _kind = "lion"
    _config_class = LionConfig
    _counts_steps = False
    _group_keys = ("lr", "beta1", "beta2", "weight_decay")

    def __init__(self, config: LionConfig | None = None, *, param_groups: object = None) -> None:
        super().__init__(config, param_groups=param_groups)

    def _hyperparameters(self) -> list[dict[str, Any]]:
        config = self.config
        assert isinstance(config, LionConfig)
        defaults = {
            "lr": config.learning_rate,
            "beta1": config.beta1,
            "beta2": config.beta2,
            "weight_decay": config.weight_decay,
            # What Lion does not read, for the engine's one set of hyperparameters.
            "momentum": 0.0,
            "epsilon": 1.0,
            "nesterov": False,
        }
        return self.param_groups.resolved(defaults)


@dataclasses.dataclass(frozen=True)
class ScheduleFreeState(LoadedState):
    """A Schedule-Free state dict, checked: also each group's weight sum (the optimizer's
    own first) and whether the parameters were at the average."""

    weight_sums: list[float]
    averaged: bool


def _weight_sum_key(index: int | None) -> str:
    return "weight_sum" if index is None else f"param_groups.{index}.weight_sum"


_TRAINING_MODE = "training_mode"

# β1 = 0 would leave Schedule-Free's average unrecoverable from y and z.
_SCHEDULE_FREE_CHECKS: dict[str, Check] = {
    **_GROUP_CHECKS,
    "lr": lambda key, value: check_schedule_free_lr(value, key),
    "beta1": lambda key, value: check_real(key, value, above=0.0, below=1.0),
}


class ScheduleFreeAdamW(NativeOptimizer):
    """Schedule-Free AdamW (Defazio et al., NeurIPS 2024, "The Road Less Scheduled",
    Algorithm 1), built from a ``ScheduleFreeConfig``: no learning-rate schedule; with
    ``y = (1−β1)·z + β1·x`` the point where gradients are taken,
    ``γ_t = lr·√(1−β2^t)·min(1, t/warmup_steps)``, ``v ← β2·v + (1−β2)·g² ;
    z ← z − γ_t·(g/(√v + ε) + wd·y) ; c = γ_t²/Σγ_i² ; x ← (1−c)·x + c·z``.

    The arrays in ``params`` hold ``y`` while training (the authors' code does the same):
    compute gradients there. ``eval(params)`` moves them to the average ``x``, which is what
    to evaluate, test or ship; ``train(params)`` moves them back (equal to before up to one
    rounding of each element) and must come before the next step — a step in eval mode is
    an error. State: ``t``, ``weight_sum`` (``Σγ_i²``; each parameter group's as
    ``param_groups.<i>.weight_sum``), ``training_mode`` (1 or 0), ``z_minus_y_<name>``
    (``z − y``) and ``v_<name>``. Wrapped in SamOptimizer, the perturbation is taken at
    ``y``, the point the gradients are for; call ``eval``/``train`` between SAM steps, not
    between a ``first_step`` and its ``second_step`` (SAM's ascent does not know the
    mode: a first_step in eval mode perturbs ``x``, and its second_step is refused)."""

    _kind = "schedule_free_adamw"
    # Its eval() and train() move the arrays between y and x name by name.
    _flat_capable = False
    _config_class = ScheduleFreeConfig
    _non_negative = ("v_",)
    _group_checks = _SCHEDULE_FREE_CHECKS

    def __init__(
        self, config: ScheduleFreeConfig | None = None, *, param_groups: object = None
    ) -> None:
        super().__init__(config, param_groups=param_groups)

    def _hyperparameters(self) -> list[dict[str, Any]]:
        config = self.config
        assert isinstance(config, ScheduleFreeConfig)
        defaults = {
            "lr": config.learning_rate,
            "beta1": config.beta1,
            "beta2": config.beta2,
            "epsilon": config.epsilon,
            "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup_steps,
            # What Schedule-Free does not read, for the engine's one set of hyperparameters.
            "momentum": 0.0,
            "nesterov": False,
        }
        return self.param_groups.resolved(defaults)

    @property
    def training(self) -> bool:
        """Whether the parameters are at ``y`` (train mode, the default) rather than at the
        average ``x``."""
        return not self._engine.averaged

    def eval(self, params: Params) -> None:
        """Moves every array of ``params`` in place to the average ``x``:
        ``p ← p − (1−β1)/β1·(z − y)``, each with its group's β1 (nothing if already there)."""
        params_dict = as_dict(params, "params")
        with self._lock:
            _core.schedule_free_shift(self._engine, params_dict, True)

    def train(self, params: Params) -> None:
        """Moves every array of ``params`` in place back to ``y``, where gradients are taken:
        ``p ← p + (1−β1)/β1·(z − y)`` (nothing if already there)."""
        params_dict = as_dict(params, "params")
        with self._lock:
            _core.schedule_free_shift(self._engine, params_dict, False)

    def state_dict(self) -> StateDict:
        with self._lock:
            state = super().state_dict()
            sums = self._engine.weight_sums
            for index, weight_sum in enumerate(sums):
                state[_weight_sum_key(index - 1 if index else None)] = np.array(weight_sum)
            state[_TRAINING_MODE] = np.array(0.0 if self._engine.averaged else 1.0)
        return state

    def set_lr(self, lr: float) -> None:
        """As every optimizer's, each group's rate below ``SCHEDULE_FREE_MAX_LR`` (its
        squares are summed)."""
        lrs = self._scaled_lrs(check_schedule_free_lr(lr, "lr"))
        for index, scaled in enumerate(lrs[1:]):
            check_schedule_free_lr(scaled, _group_lr_key(index))
        with self._lock:
            self._engine.lrs = lrs

    def _parse_state(
        self, state: Mapping[str, Any], ignore: tuple[list[str], list[str]] = ([], [])
    ) -> LoadedState:
        state = state_mapping(state)
        keys = [_weight_sum_key(None)]
        keys += [_weight_sum_key(i) for i in range(len(self.param_groups))]
        sums = [scalar_entry(state, key) for key in keys]
        mode = scalar_value(state, _TRAINING_MODE)
        if isinstance(mode, bool) or not isinstance(mode, (int, float, np.number)) or float(
            mode
        ) not in (0.0, 1.0):
            raise OptimizerError(
                f"state '{_TRAINING_MODE}' must be 1 (train) or 0 (eval), got {mode!r}",
                _TRAINING_MODE,
            )
        loaded = super()._parse_state(state, ([*ignore[0], *keys, _TRAINING_MODE], ignore[1]))
        for index, lr in enumerate(loaded.lrs):
            check_schedule_free_lr(lr, _group_lr_key(index - 1) if index else "lr")
        return ScheduleFreeState(loaded.lrs, loaded.t, loaded.entries, sums, float(mode) == 0.0)

    def _install(self, loaded: LoadedState) -> None:
        assert isinstance(loaded, ScheduleFreeState)
        with self._lock:
            super()._install(loaded)
            self._engine.weight_sums = loaded.weight_sums
            self._engine.averaged = loaded.averaged
