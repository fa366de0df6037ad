"""Prodigy: Adam with a step size ``d`` estimated from the distance travelled.

A thin facade over a native engine (``samopt._core.ProdigyEngine``) like the other base
optimizers: one native call per step updates every element with the current ``d`` and, in
the same pass, sums what gives the next ``d``; it commits the state before it returns.
With SAM, the restore is fused in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from . import _core
from ._config import (
    GradClipMode,
    OptimizerConfig,
    _check_clipping,
    check_bool,
    check_learning_rate,
    check_real,
    clip_bounds_of,
)
from ._errors import OptimizerError
from ._optimizers import LoadedState, NativeOptimizer, _group_lr_key
from ._state import scalar_entry, scalar_value, state_mapping, time_step_entry

__all__ = ["ProdigyConfig", "ProdigyOptimizer"]

_STEP, _D, _D_MAX, _NUMERATOR = "step", "d", "d_max", "d_numerator"


def _check_growth_rate(value: object) -> float:
    if isinstance(value, float) and value == math.inf:
        return value
    return check_real("d_growth_rate", value, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ProdigyConfig:
    """The crate's ``ProdigyConfig`` (its names and defaults), with the authors' ``beta3``
    (``None``: ``√beta2``, the paper's). ``d0`` is the first estimate of ``d``; ``d_coef``
    scales every estimate; ``lr`` scales the step (leave it at 1 unless the steps are too
    large); ``weight_decay`` is decoupled (``− d·lr·wd·p``); ``bias_correction`` folds
    Adam's corrections into the step size; ``d_growth_rate`` bounds the estimate's growth,
    ``d_{k+1} ≤ (1 + d_growth_rate)·d_k`` (infinite: no bound). Every field is checked
    here, so a bad value fails at construction."""

    d0: float = 1e-6
    d_coef: float = 1.0
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    grad_clip_mode: GradClipMode = GradClipMode.NORM
    bias_correction: bool = True
    d_growth_rate: float = math.inf
    beta3: float | None = None

    def __post_init__(self) -> None:
        fields: dict[str, object] = {
            "d0": check_real("d0", self.d0, above=0.0),
            "d_coef": check_real("d_coef", self.d_coef, above=0.0),
            "lr": check_learning_rate(self.lr, "lr"),
            "beta1": check_real("beta1", self.beta1, minimum=0.0, below=1.0),
            "beta2": check_real("beta2", self.beta2, minimum=0.0, below=1.0),
            "eps": check_real("eps", self.eps, above=0.0),
            "weight_decay": check_real("weight_decay", self.weight_decay, minimum=0.0),
            "grad_clip": _check_clipping(self.grad_clip, self.grad_clip_mode),
            "bias_correction": check_bool("bias_correction", self.bias_correction),
            "d_growth_rate": _check_growth_rate(self.d_growth_rate),
        }
        if self.beta3 is not None:
            fields["beta3"] = check_real("beta3", self.beta3, minimum=0.0, below=1.0)
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def resolved_beta3(self) -> float:
        """``beta3``, or ``√beta2`` when it is not set."""
        return math.sqrt(self.beta2) if self.beta3 is None else self.beta3

    @property
    def clip_bounds(self) -> tuple[float | None, float | None]:
        """``(clip_value, clip_norm)`` as the kernels take them."""
        return clip_bounds_of(self.grad_clip, self.grad_clip_mode)

    def base(self) -> OptimizerConfig:
        """The fields every samopt optimizer reads, as an ``OptimizerConfig``."""
        return OptimizerConfig(
            learning_rate=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.eps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            grad_clip_mode=self.grad_clip_mode,
        )


@dataclasses.dataclass(frozen=True)
class ProdigyState(LoadedState):
    """A Prodigy state dict, checked: also the estimate ``(d, d_max, d_numerator)``."""

    estimate: tuple[float, float, float]


class ProdigyOptimizer(NativeOptimizer):
    """Prodigy (Mishchenko & Defazio, 2023, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner", Algorithm 3), the crate's ``ProdigyOptimizer::new(config)``
    with the paper's estimate of ``d`` (the crate's differs; see the README). At step
    ``k`` with ``γ = lr·√(1−β2^(k+1))/(1−β1^(k+1))`` (or ``lr`` without bias correction)
    and ``dlr = d·γ``: ``m ← β1·m + (1−β1)·d·g ; v ← β2·v + (1−β2)·d²·g² ;
    s ← β3·s + (d/d0)·dlr·g ; r ← β3·r + (d/d0)·dlr·⟨g, x0 − x⟩ ;
    p ← p − dlr·wd·p − dlr·m/(√v + d·ε)``; then ``d̂ = d_coef·r/‖s‖₁``,
    ``d ← min(max(d_max, d̂), (1 + d_growth_rate)·d)`` for the next step. A parameter
    group may set its own ``lr`` (its ``γ``; 0 leaves it out) and ``weight_decay``.
    State: ``step``, ``d``, ``d_max``, ``d_numerator``, ``exp_avg.<name>``,
    ``exp_avg_sq.<name>``, ``s.<name>``, ``p0_minus_p.<name>`` (``x0 − x``)."""

    _engine: Any  # a samopt._core.ProdigyEngine
    _kind = "prodigy"
    # Its engine keeps its own tables; stepped array by array.
    _flat_capable = False
    _non_negative = ("exp_avg_sq.",)
    _group_keys = ("lr", "weight_decay")

    def __init__(
        self, config: ProdigyConfig | None = None, *, param_groups: object = None
    ) -> None:
        if config is None:
            config = ProdigyConfig()
        if not isinstance(config, ProdigyConfig):
            raise OptimizerError(
                f"config must be a ProdigyConfig, got {type(config).__name__}", "config"
            )
        self.prodigy_config = config
        super().__init__(config.base(), param_groups=param_groups)

    def _new_engine(self) -> Any:
        config = self.prodigy_config
        clip_value, clip_norm = config.clip_bounds
        groups = [(g["lr"], g["weight_decay"]) for g in self._hyperparameters()]
        return _core.ProdigyEngine(
            groups,
            beta1=config.beta1,
            beta2=config.beta2,
            beta3=config.resolved_beta3,
            epsilon=config.eps,
            d0=config.d0,
            d_coef=config.d_coef,
            d_growth_rate=config.d_growth_rate,
            bias_correction=config.bias_correction,
            clip_value=clip_value,
            clip_norm=clip_norm,
            assign=self.param_groups.assign if len(self.param_groups) else None,
        )

    def get_d(self) -> float:
        """The current estimate ``d`` (the crate's ``get_d``)."""
        return float(self._engine.estimate[0])

    def get_step(self) -> int:
        """Steps taken (the crate's ``get_step``)."""
        return int(self._engine.steps)

    def _parse_state(
        self, state: Mapping[str, Any], ignore: tuple[list[str], list[str]] = ([], [])
    ) -> LoadedState:
        state = state_mapping(state)
        group_lrs = tuple(_group_lr_key(i) for i in range(len(self.param_groups)))
        lrs = [scalar_entry(state, key) for key in ("lr", *group_lrs)]
        step = time_step_entry(state, _STEP)
        d = scalar_entry(state, _D, positive=True)
        d_max = scalar_entry(state, _D_MAX, positive=True)
        if d_max < d:
            raise OptimizerError(f"state '{_D_MAX}' must be >= d, got {d_max!r} < {d!r}", _D_MAX)
        label = f"state '{_NUMERATOR}'"
        numerator = check_real(_NUMERATOR, scalar_value(state, _NUMERATOR), label=label)
        scalars = ["lr", *group_lrs, _STEP, _D, _D_MAX, _NUMERATOR]
        skip_keys, skip_prefixes = ignore
        entries = _core.parse_table(
            state,
            list(self._engine.slots),
            list(self._non_negative),
            [*scalars, *skip_keys],
            skip_prefixes,
        )
        return ProdigyState(lrs, step, entries, (d, d_max, numerator))

    def _install(self, loaded: LoadedState) -> None:
        assert isinstance(loaded, ProdigyState)
        with self._lock:
            self._engine.load(loaded.t, loaded.estimate, loaded.entries)
            self._engine.lrs = loaded.lrs

    def __repr__(self) -> str:
        return f"ProdigyOptimizer({self.prodigy_config!r})"
