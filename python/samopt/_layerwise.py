"""Layer-wise optimizers: LAMB and LARS, each array's step scaled by norms over that array.

Thin facades over a native engine (``samopt._core.LayerEngine``) like the other base
optimizers: one native call per step runs the read pass (each array's norms) and the
write pass (the update with each array's factor), and commits the state before it returns.
With SAM, the restore is fused in and both passes read the restored values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

from . import _core
from ._config import OptimizerConfig, check_real
from ._errors import OptimizerError
from ._optimizers import NativeOptimizer

__all__ = ["LambOptimizer", "LarsOptimizer", "is_bias"]

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

    _default_weight_decay = 0.01  # the crate's OptimizerConfig default, which both apply
    _trust_coef = 0.0
    _excluded: Callable[[str], bool] | None = None

    def _assign(self, name: str) -> int:
        group = self.param_groups.assign(name) if len(self.param_groups) else 0
        excluded = self._excluded is not None and bool(self._excluded(name))
        return 2 * group + int(excluded)

    def _new_engine(self) -> Any:
        clip_value, clip_norm = self.config.clip_bounds
        needs_assign = len(self.param_groups) or self._excluded is not None
        return _core.LayerEngine(
            self._kind,
            self._hyperparameters(),
            trust_coef=self._trust_coef,
            clip_value=clip_value,
            clip_norm=clip_norm,
            assign=self._assign if needs_assign else None,
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
