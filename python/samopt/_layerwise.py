"""Layer-wise optimizers: LAMB, LARS and AdamP, each array's step scaled by sums over that
array.

Thin facades over a native engine (``samopt._core.LayerEngine``) like the other base
optimizers: one native call per step runs the read pass (each array's norms) and the
write pass (the update with each array's factor), and commits the state before it returns.
With SAM, the restore is fused in and both passes read the restored values.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any, Union

from . import _core
from ._config import OptimizerConfig, check_bool, check_real
from ._errors import OptimizerError
from ._optimizers import LoadedState, NativeOptimizer
from ._protocol import Grads, Params
from ._state import as_dict, time_step_entry

__all__ = [
    "AdamPOptimizer",
    "LambOptimizer",
    "LarsOptimizer",
    "SophiaConfig",
    "SophiaOptimizer",
    "SophiaVariant",
    "is_bias",
]

_BIAS = re.compile(r"(?:.*[./])?(?:b|bias|\w*_b|\w*_bias)")


def is_bias(name: str) -> bool:
    """LARS's default ``exclude_bias`` test: the name's last component (after the last
    ``.`` or ``/``) is ``b`` or ``bias`` or ends in ``_b`` or ``_bias`` (``"bias"``,
    ``"fc1.bias"``, ``"layer/b"``, ``"out_bias"``), unlike the crate's
    ``name.contains("b")``, which excludes ``"embedding"`` or ``"lambda"`` as well."""
    return _BIAS.fullmatch(name) is not None


class _LayerwiseOptimizer(NativeOptimizer):
    """What LAMB and LARS share: a ``LayerEngine`` whose groups also say which parameters
    are left out of the layer-wise adaptation."""

    # Each array is measured on its own: an arena's buffer is not one layer.
    _flat_capable = False

    _engine: Any  # a samopt._core.LayerEngine
    _default_weight_decay = 0.01  # the crate's OptimizerConfig default, which they apply
    _trust_coef = 0.0
    _excluded: Callable[[str], bool] | None = None

    def _assign(self, name: str) -> int:
        group = self.param_groups.assign(name) if len(self.param_groups) else 0
        excluded = self._excluded is not None and bool(self._excluded(name))
        return 2 * group + int(excluded)

    def _engine_options(self) -> dict[str, Any]:
        return {"trust_coef": self._trust_coef}

    def _new_engine(self) -> Any:
        clip_value, clip_norm = self.config.clip_bounds
        needs_assign = len(self.param_groups) or self._excluded is not None
        return _core.LayerEngine(
            self._kind,
            self._hyperparameters(),
            clip_value=clip_value,
            clip_norm=clip_norm,
            assign=self._assign if needs_assign else None,
            **self._engine_options(),
        )


class LambOptimizer(_LayerwiseOptimizer):
    """LAMB (You et al., ICLR 2020, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes"), the crate's ``LambOptimizer``:
    ``m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ;
    r = m̂/(√v̂ + ε) + wd·p`` with ``m̂ = m/(1−β1^t)``, ``v̂ = v/(1−β2^t)`` ;
    ``p ← p − lr·(‖p‖/‖r‖)·r``, norms over each array, the trust ratio 1 when either is 0.
    Weight decay is decoupled (inside ``r``, as in the paper; 0.01 unless set, the
    crate's default). State: ``t``, ``m_<name>``, ``v_<name>``."""

    _kind = "lamb"
    _non_negative = ("v_",)


class AdamPOptimizer(_LayerwiseOptimizer):
    """AdamP (Heo et al., ICLR 2021, "AdamP: Slowing Down the Slowdown for Momentum
    Optimizers on Scale-invariant Weights"), the crate's
    ``AdamPOptimizer::with_params(config, nesterov, delta, wd_ratio)`` with the paper's
    formula (the authors' code), per array: ``m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ;
    u = m_n/(√v/√(1−β2^t) + ε)``, ``m_n = β1·m + (1−β1)·g`` with ``nesterov`` else ``m``;
    an array of two or more axes whose every slice ``p[c]`` of the first axis has
    ``|cos(g[c], p[c])| < delta/√(size/shape[0])`` (the paper's channel view) loses the
    radial part of each slice's update, ``u_c ← u_c − p̂_c·(p̂_c·u_c)`` with
    ``p̂_c = p_c/(‖p_c‖ + ε)``; failing that, one with ``|cos(g, p)| < delta/√size`` (over
    the whole array, the layer view) loses that of its whole update, ``u ← u − p̂·(p̂·u)``
    with ``p̂ = p/(‖p‖ + ε)``; a projected array's weight decay is scaled by ``wd_ratio``;
    ``p ← p·(1 − lr·wd·r) − lr/(1−β1^t)·u`` (``r`` = ``wd_ratio`` or 1). Weight decay is
    decoupled (0.01 unless set, the crate's default). The defaults are the crate's
    ``new(config)``: Nesterov on, δ = 0.1, ``wd_ratio`` = 1 (the authors' code: off, 0.1,
    0.1). State: ``t``, ``m_<name>``, ``v_<name>``."""

    _kind = "adamp"
    _non_negative = ("v_",)
    _group_keys = ("lr", "beta1", "beta2", "epsilon", "weight_decay", "nesterov")

    def __init__(
        self,
        config: OptimizerConfig | None = None,
        nesterov: bool = True,
        delta: float = 0.1,
        wd_ratio: float = 1.0,
        *,
        param_groups: object = None,
    ) -> None:
        if isinstance(config, OptimizerConfig) and config.nesterov:
            raise OptimizerError(
                "AdamPOptimizer takes nesterov as its own argument, not from the config",
                "nesterov",
            )
        self._nesterov = check_bool("nesterov", nesterov)
        self._delta = check_real("delta", delta, minimum=0.0)
        self._wd_ratio = check_real("wd_ratio", wd_ratio, minimum=0.0)
        super().__init__(config, param_groups=param_groups)

    def _hyperparameters(self) -> list[dict[str, Any]]:
        # A group that does not set its own nesterov takes the optimizer's.
        groups = super()._hyperparameters()
        for group, overrides in zip(groups, ({}, *self.param_groups.overrides)):
            if "nesterov" not in overrides:
                group["nesterov"] = self._nesterov
        return groups

    def _engine_options(self) -> dict[str, Any]:
        return {"adamp_delta": self._delta, "adamp_wd_ratio": self._wd_ratio}

    @property
    def nesterov(self) -> bool:
        return self._nesterov

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def wd_ratio(self) -> float:
        return self._wd_ratio

    def __repr__(self) -> str:
        return (
            f"AdamPOptimizer({self.config!r}, nesterov={self._nesterov!r}, "
            f"delta={self._delta!r}, wd_ratio={self._wd_ratio!r})"
        )


ExcludeBias = Union[bool, Callable[[str], bool]]


class LarsOptimizer(_LayerwiseOptimizer):
    """LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional
    Networks"), the crate's ``LarsOptimizer::new(config, trust_coef, exclude_bias)``:
    the local learning rate ``lr·η·‖p‖/(‖g‖ + wd·‖p‖)`` per array (η = ``trust_coef``;
    ``lr`` when either norm is 0 or the parameter is excluded),
    ``v ← μ·v + local_lr·(g + wd·p) ; p ← p − v``. Weight decay is L2, inside the
    momentum (0.01 unless set, the crate's default). ``exclude_bias``: ``True`` leaves
    the names :func:`is_bias` accepts out of the adaptation (they step with ``lr``),
    ``False`` none, or a callable ``name -> bool`` chooses. State: ``velocity_<name>``."""

    _kind = "lars"
    _counts_steps = False
    _group_keys = ("lr", "momentum", "weight_decay")

    def __init__(
        self,
        config: OptimizerConfig | None = None,
        trust_coef: float = 0.001,
        exclude_bias: ExcludeBias = True,
        *,
        param_groups: object = None,
    ) -> None:
        self._trust_coef = check_real("trust_coef", trust_coef, above=0.0)
        if exclude_bias is True:
            self._excluded = is_bias
        elif exclude_bias is False:
            self._excluded = None
        elif callable(exclude_bias):
            self._excluded = exclude_bias
        else:
            raise OptimizerError(
                f"exclude_bias must be a bool or a callable name -> bool, got {exclude_bias!r}",
                "exclude_bias",
            )
        super().__init__(config, param_groups=param_groups)

    @property
    def trust_coef(self) -> float:
        return self._trust_coef

    def __repr__(self) -> str:
        return f"LarsOptimizer({self.config!r}, trust_coef={self._trust_coef!r})"


class SophiaVariant(enum.Enum):
    """Which Hessian-diagonal estimate a SophiaOptimizer is fed (the crate's
    ``SophiaVariant``); samopt takes either through ``update_hessian``."""

    GAUSS_NEWTON_BARTLETT = "gauss_newton_bartlett"
    """Sophia-G: ``ĥ = B·ĝ⊙ĝ``, ĝ the mini-batch gradient of the loss with labels sampled
    from the model's own predictions, B the batch size."""
    HUTCHINSON = "hutchinson"
    """Sophia-H: ``ĥ = u⊙(H·u)``, u a Rademacher vector and H·u a Hessian-vector product."""


def _sophia_base() -> OptimizerConfig:
    return OptimizerConfig(
        learning_rate=2e-4, beta1=0.965, beta2=0.99, epsilon=1e-8, weight_decay=0.01
    )


@dataclasses.dataclass(frozen=True)
class SophiaConfig:
    """The crate's ``SophiaConfig``: the base config (its defaults: lr 2e-4, β1 0.965,
    β2 0.99, ε 1e-8, weight_decay 0.01), ``rho`` (the paper's γ), how many steps pass
    before a step refreshes the Hessian estimate from its own gradient when
    ``update_hessian`` was not called, and the estimator's variant."""

    base: OptimizerConfig = dataclasses.field(default_factory=_sophia_base)
    rho: float = 0.04
    hessian_update_freq: int = 10
    variant: SophiaVariant = SophiaVariant.GAUSS_NEWTON_BARTLETT

    def __post_init__(self) -> None:
        if not isinstance(self.base, OptimizerConfig):
            raise OptimizerError(
                f"base must be an OptimizerConfig, got {type(self.base).__name__}", "base"
            )
        object.__setattr__(self, "rho", check_real("rho", self.rho, above=0.0))
        freq = self.hessian_update_freq
        if isinstance(freq, bool) or not isinstance(freq, int) or not 1 <= freq <= 2**62:
            raise OptimizerError(
                f"hessian_update_freq must be an int >= 1, got {freq!r}", "hessian_update_freq"
            )
        if not isinstance(self.variant, SophiaVariant):
            raise OptimizerError(
                f"variant must be a SophiaVariant, got {self.variant!r}", "variant"
            )


@dataclasses.dataclass(frozen=True)
class SophiaState(LoadedState):
    """A Sophia state dict, checked: also the steps since the Hessian's last refresh."""

    since_hessian: int


class SophiaOptimizer(_LayerwiseOptimizer):
    """Sophia (Liu, Li, Hall, Liang & Ma, 2023, "Sophia: A Scalable Stochastic
    Second-order Optimizer for Language Model Pre-training", Algorithm 3), the crate's
    ``SophiaOptimizer::with_sophia_config``:
    ``m ← β1·m + (1−β1)·g ; p ← p − lr·wd·p − lr·clip(m/max(ρ·h, ε), −1, 1)``, with
    decoupled weight decay and ``h`` the EMA of Hessian-diagonal estimates:
    ``update_hessian(params, estimates)`` sets ``h ← β2·h + (1−β2)·ĥ`` (every k steps, as
    the paper does, from a Gauss-Newton-Bartlett or Hutchinson estimate you compute). A
    step that comes ``hessian_update_freq`` steps after the last refresh without one
    refreshes ``h`` from its own gradient, ``ĥ = g⊙g`` (the crate's estimate). State:
    ``t``, ``steps_since_hessian_update``, ``m_<name>``, ``h_<name>``."""

    _kind = "sophia"
    _non_negative = ()

    def __init__(
        self, config: SophiaConfig | OptimizerConfig | None = None, *, param_groups: object = None
    ) -> None:
        if config is None:
            config = SophiaConfig()
        elif isinstance(config, OptimizerConfig):
            config = SophiaConfig(base=config)  # the crate's SophiaOptimizer::new(config)
        if not isinstance(config, SophiaConfig):
            raise OptimizerError(
                f"config must be a SophiaConfig or an OptimizerConfig, got "
                f"{type(config).__name__}",
                "config",
            )
        self.sophia_config = config
        super().__init__(config.base, param_groups=param_groups)

    def _engine_options(self) -> dict[str, Any]:
        return {
            "sophia_rho": self.sophia_config.rho,
            "hessian_update_freq": self.sophia_config.hessian_update_freq,
        }

    def update_hessian(self, params: Params, estimates: Grads) -> None:
        """``h ← β2·h + (1−β2)·ĥ`` for every parameter of ``params``; ``estimates`` holds
        one array of Hessian-diagonal estimates per name, shaped like it (checked like
        gradients: finite, any float dtype). Restarts the count to the next refresh."""
        params_dict, estimates_dict = as_dict(params, "params"), as_dict(estimates, "estimates")
        with self._lock:
            _core.update_hessian(self._engine, params_dict, estimates_dict)

    def _parse_state(
        self, state: Mapping[str, Any], ignore: tuple[list[str], list[str]] = ([], [])
    ) -> LoadedState:
        key = "steps_since_hessian_update"
        if not isinstance(state, Mapping) or key not in state:
            raise OptimizerError(f"state dict is missing key '{key}'", key)
        loaded = super()._parse_state(state, ([*ignore[0], key], ignore[1]))
        return SophiaState(loaded.lrs, loaded.t, loaded.entries, time_step_entry(state, key))

    def _install(self, loaded: LoadedState) -> None:
        assert isinstance(loaded, SophiaState)
        with self._lock:
            self._engine.load(loaded.t, loaded.entries, loaded.since_hessian)
            self._engine.lrs = loaded.lrs

    def __repr__(self) -> str:
        return f"SophiaOptimizer({self.sophia_config!r})"
