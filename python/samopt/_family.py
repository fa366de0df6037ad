"""The SAM family beyond SAM, ASAM, GSAM and GCSAM: variants that change SAM's ascent or
its descent, built on SamOptimizer's native engine.

Every variant keeps SamOptimizer's guarantees: exact restores, errors that change
nothing, state dicts that resume bit-exactly (random draws included: a counter-based
generator keyed by seed, draw number, parameter name and element index), parameter groups
(``rho`` and ``perturb``) and ``sam_step``. The element-wise work is native
(``samopt._core``: ``mask``, ``cosine``, ``scale``, ``accumulate``); the Python layer only
chooses scalars and which call comes next. A phase made of several native calls and
Python updates runs under an ``InterruptHold``, so that Ctrl-C finds it done whole or not
at all, as a single native call is; the user's gradient function stays interruptible, and
an interrupt inside it puts the parameters back as they were.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._config import check_real
from ._directions import Buffers
from ._errors import OptimizerError
from ._groups import Check, ParamGroups
from ._protocol import Grads, Optimizer, Params, StateDict
from ._sam import GradFn, SamOptimizer, _evaluate
from ._signals import InterruptHold
from ._state import as_dict, scalar_entry, state_array, time_step_entry

__all__ = [
    "BsamOptimizer",
    "EsamOptimizer",
    "FisherSamOptimizer",
    "FriendlySamOptimizer",
    "LookSamOptimizer",
    "RandomizedSam",
    "WsamOptimizer",
]

_MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser, as ``crate::family::mix64``."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _uniform(seed: int, draw: int) -> float:
    """Draw number ``draw`` of the generator seeded ``seed``, in [0, 1): the family's
    counter-based generator (``crate::family::uniform``) at name key 0, element 0."""
    key = _mix64(_mix64(seed ^ _mix64(draw)) ^ 0)
    bits = _mix64((key + 0x9E3779B97F4A7C15) & _MASK)
    return (bits >> 11) * 2.0**-53


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise OptimizerError(f"seed must be an int in [0, 2**63), got {seed!r}", "seed")
    return int(seed)


def _seed_entry(state: Mapping[str, Any], key: str) -> int:
    if key not in state:
        raise OptimizerError(f"state dict is missing key '{key}'", key)
    value = np.asarray(state[key])
    if value.shape != () or value.dtype.kind not in "iu" or not 0 <= int(value) < 2**63:
        raise OptimizerError(f"state '{key}' must be an integer in [0, 2**63)", key)
    return int(value)


class _FamilyStep(SamOptimizer):
    """sam_step made of the variant's own phases: the gradient at w, the variant's
    first_step, the gradient at the perturbed point, its second step, which commits the
    step and its call count in one native call. On any error — in grad_fn too — the
    parameters go back to where they were and nothing is pending."""

    # Each variant keeps arrays of its own by name: stepped array by array.
    _flat_capable = False

    _group_keys = ("rho", "perturb")

    def _base_step(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        """SAM's second phase (a plain base step when nothing is pending)."""
        base, base_lock = self._base()
        with base_lock:
            _core.second_step(self._engine, base, params, grads, None, count)

    def _between(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        """The step of a call that is not a SAM step (``interval``): a plain base step."""
        self._base_step(params, grads, count)

    def _finish(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        """The second phase of a SAM step."""
        self._base_step(params, grads, count)

    def second_step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            self._finish(params_dict, grads_dict, False)

    step = second_step

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        params_dict = as_dict(params, "params")
        with self._lock:
            if self.pending:
                raise OptimizerError(
                    "sam_step called while a first_step is pending (call second_step or "
                    "restore first)",
                    None,
                )
            loss, grads = _evaluate(grad_fn, params_dict)
            if self._engine.calls % self._interval != 0:
                with InterruptHold():
                    self._between(params_dict, grads, True)
                return loss
            # first_step inside the try: a Ctrl-C it defers to its end is raised with the
            # parameters perturbed, and must find them restored.
            try:
                self.first_step(params_dict, grads)
                _, grads = _evaluate(grad_fn, params_dict)
                with InterruptHold():
                    self._finish(params_dict, grads, True)
            except BaseException:
                with InterruptHold():
                    self.restore(params_dict)
                raise
            return loss

    def _perturbed(self, arrays: dict[Any, Any]) -> dict[Any, Any]:
        """The entries of the parameters the ascent moves (groups with ``perturb=False``
        left out), for the norms the ascent scales by."""
        if not len(self.param_groups):
            return arrays
        overrides = self.param_groups.overrides
        kept = {}
        for name, value in arrays.items():
            group = self.param_groups.assign(name)
            if group == 0 or overrides[group - 1].get("perturb", True):
                kept[name] = value
        return kept


class EsamOptimizer(_FamilyStep):
    """ESAM's stochastic weight perturbation (Du et al., ICLR 2022, "Efficient
    Sharpness-aware Minimization"): the ascent moves a random fraction ``beta`` of the
    weights, rescaled so the perturbation stays unbiased,
    ``ε = (ρ/β)·m⊙g/(‖g‖ + eps)`` with ``m_i ~ Bernoulli(β)`` drawn afresh at each
    first_step. The draws come from a counter-based generator keyed by ``seed``, the draw
    number (``esam_draws`` in the state dict), the parameter's name and the element's index,
    so they do not depend on threads or dict order and resume exactly. Two gradient
    evaluations per step (the paper's saving comes from skipping the backward pass of the
    unperturbed weights, which a NumPy gradient function does not do).
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        beta: float = 0.6,
        seed: int = 0,
        eps: float = 0.0,
        interval: int = 1,
        param_groups: object = None,
    ) -> None:
        super().__init__(base_optimizer, rho, eps=eps, interval=interval, param_groups=param_groups)
        self._beta = check_real("beta", beta, above=0.0)
        if self._beta > 1.0:
            raise OptimizerError(f"beta must be in (0, 1], got {beta!r}", "beta")
        self._seed = _check_seed(seed)
        self._draws = 0
        self._masked = Buffers()

    @property
    def beta(self) -> float:
        """The fraction of the weights each ascent perturbs."""
        return self._beta

    @property
    def seed(self) -> int:
        return self._seed

    def first_step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            if self.pending:
                _core.first_step(self._engine, params_dict, grads_dict, self.rho, self._eps)
            masked = self._masked.like(params_dict)
            _core.mask(self._masked.names, masked, grads_dict, self._seed, self._draws, self._beta)
            _, masked_norm, norm = _core.cosine(self._perturbed(masked), grads_dict)
            # SAM's ascent follows m⊙g with radius ρ_eff/‖m⊙g‖: ρ_eff makes it (ρ/β)/‖g‖.
            rho = self.rho * masked_norm / (self._beta * (norm + self._eps)) if norm else self.rho
            _core.first_step(self._engine, params_dict, masked, rho, 0.0)
            self._draws += 1

    def restore(self, params: Params) -> None:
        """Abandons a pending perturbation, and the draw of its mask with it."""
        with self._lock, InterruptHold():
            pending = self.pending
            super().restore(params)
            if pending:
                self._draws -= 1

    def sam_step_splits(self, params: Params, grad_fns: Iterable[GradFn]) -> list[Any]:
        """m-sharpness: each sub-batch's ascent draws its own mask (none is kept if the
        step fails)."""
        with self._lock:
            draws, calls = self._draws, self._engine.calls
            try:
                return super().sam_step_splits(params, grad_fns)
            except BaseException:
                # A Ctrl-C raised as the base step returns finds the step (and its draws)
                # taken: only a step not taken gives its draws back.
                if self._engine.calls == calls:
                    self._draws = draws
                raise

    def _own_keys(self) -> tuple[list[str], list[str]]:
        exact, prefixes = super()._own_keys()
        return [*exact, "esam_seed", "esam_draws"], prefixes

    def state_dict(self) -> StateDict:
        """SamOptimizer's state, the generator's ``esam_seed`` and ``esam_draws``."""
        with self._lock:
            state = super().state_dict()
            state["esam_seed"] = np.array(self._seed, dtype=np.int64)
            state["esam_draws"] = np.array(self._draws, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        seed = _seed_entry(state, "esam_seed")
        draws = time_step_entry(state, "esam_draws")
        with self._lock, InterruptHold():
            super().load_state_dict(state)
            self._seed, self._draws = seed, draws

    def __repr__(self) -> str:
        return (
            f"EsamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, beta={self._beta!r}, "
            f"seed={self._seed!r}, eps={self._eps!r}, interval={self._interval!r})"
        )


_GV = "looksam_gv_"
_GRAD0 = "looksam_grad0_"


class LookSamOptimizer(_FamilyStep):
    """LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization"): SAM's gradient every ``k``-th step, and its part orthogonal to the
    plain gradient reused in between, so a step costs ``1 + 1/k`` gradients.

    On a SAM step (``first_step``/``second_step``, or every k-th ``sam_step`` from the
    first): ``g_s = ∇L(w + ρ·g/‖g‖)``, ``g_v = g_s − (g·g_s/‖g‖²)·g`` is kept (``g_v = g_s``
    when ``g = 0``) and the base steps with ``g_s``. In between (``step`` with nothing
    pending, or the other sam_step calls): the base steps with
    ``g + α·(‖g‖/‖g_v‖)·g_v`` (just ``g`` before the first SAM step, or when ``g_v = 0``).
    Norms and dot products are over the whole model, as in the paper's Algorithm 1
    (pytorch_optimizer takes them per array).
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        k: int = 5,
        alpha: float = 0.7,
        eps: float = 0.0,
        param_groups: object = None,
    ) -> None:
        super().__init__(base_optimizer, rho, eps=eps, interval=k, param_groups=param_groups)
        self._look_alpha = check_real("alpha", alpha, minimum=0.0)
        self._grad0 = Buffers()
        self._kept = Buffers()
        self._spare = Buffers()
        self._direction = Buffers()

    @property
    def k(self) -> int:
        """sam_step takes SAM's gradient every k-th call."""
        return self._interval

    @property
    def alpha(self) -> float:
        """How much of the kept orthogonal part, relative to ‖g‖, a step in between adds."""
        return self._look_alpha

    def first_step(self, params: Params, grads: Grads) -> None:
        """SAM's ascent, keeping g (converted to the parameters' dtypes) for g_v."""
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            if self.pending:
                _core.first_step(self._engine, params_dict, grads_dict, self.rho, self._eps)
            grad0 = self._grad0.like(params_dict)
            _core.scale(self._grad0.names, grad0, grads_dict, 1.0)
            _core.first_step(self._engine, params_dict, grad0, self.rho, self._eps)

    def _finish(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        if not self.pending:
            self._between(params, grads, count)
            return
        grad0 = self._grad0.arrays
        cos, norm0, norm = _core.cosine(grad0, grads)
        kept = self._spare.like(params)
        along = -cos * norm / norm0 if norm0 > 0.0 else 0.0
        _core.combine((self._spare.names, self._grad0.names), kept, grads, 1.0, grad0, along)
        self._base_step(params, grads, count)
        self._kept, self._spare = self._spare, self._kept

    def _between(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        kept = self._kept.arrays
        if not kept:
            self._base_step(params, grads, count)
            return
        if kept.keys() != params.keys():
            differing = sorted(kept.keys() ^ params.keys(), key=repr)[0]
            raise OptimizerError(
                "LookSAM's kept g_v is for other parameters than this step's (take a SAM "
                f"step first): '{differing}' differs",
                str(differing),
            )
        _, kept_norm, norm = _core.cosine(kept, grads)
        direction = self._direction.like(params)
        factor = self._look_alpha * norm / kept_norm if kept_norm > 0.0 else 0.0
        _core.combine(
            (self._direction.names, self._kept.names), direction, grads, 1.0, kept, factor
        )
        self._base_step(params, direction, count)

    def step(self, params: Params, grads: Grads) -> None:
        """With a first_step pending its second step; otherwise the step in between, with
        the gradient at w."""
        self.second_step(params, grads)

    def sam_step_splits(self, params: Params, grad_fns: Iterable[GradFn]) -> list[Any]:
        """Not defined for LookSAM (which g_v would the splits keep?)."""
        raise OptimizerError("LookSamOptimizer has no sam_step_splits", None)

    def _own_keys(self) -> tuple[list[str], list[str]]:
        exact, prefixes = super()._own_keys()
        return exact, [*prefixes, "looksam_gv_", "looksam_grad0_"]

    def state_dict(self) -> StateDict:
        """SamOptimizer's state, the kept orthogonal part ``looksam_gv_<name>`` and, while
        a first_step is pending, the gradient it kept, ``looksam_grad0_<name>``."""
        with self._lock:
            state = super().state_dict()
            for name in sorted(self._kept.arrays):
                state[_GV + name] = self._kept.arrays[name].copy()
            if self.pending:
                for name in sorted(self._grad0.arrays):
                    state[_GRAD0 + name] = self._grad0.arrays[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        keys = [k for k in state if isinstance(k, str)]
        kept = {k[len(_GV):]: state_array(state, k) for k in sorted(keys) if k.startswith(_GV)}
        grad0 = {
            k[len(_GRAD0):]: state_array(state, k) for k in sorted(keys) if k.startswith(_GRAD0)
        }
        saved = {k[len("saved_"):]: state[k] for k in keys if k.startswith("saved_")}
        if grad0.keys() != saved.keys():
            key = sorted(grad0.keys() ^ saved.keys())[0]
            raise OptimizerError(
                f"state dict's pending LookSAM gradient and saved values disagree for '{key}'",
                _GRAD0 + key,
            )
        for name, array in grad0.items():
            other = np.asarray(saved[name])
            if (array.dtype, array.shape) != (other.dtype, other.shape):
                raise OptimizerError(
                    f"state '{_GRAD0}{name}' has dtype {array.dtype} and shape {array.shape} "
                    f"but 'saved_{name}' has dtype {other.dtype} and shape {other.shape}",
                    _GRAD0 + name,
                )
        with self._lock, InterruptHold():
            super().load_state_dict(state)
            self._kept = Buffers()
            self._kept.arrays = {name: np.array(a, order="C") for name, a in kept.items()}
            self._grad0 = Buffers()
            self._grad0.arrays = {name: np.array(a, order="C") for name, a in grad0.items()}

    def __repr__(self) -> str:
        return (
            f"LookSamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, k={self._interval!r}, "
            f"alpha={self._look_alpha!r}, eps={self._eps!r})"
        )


Probability = Union[float, Callable[[int], float]]
"""A probability, or a schedule: ``p(call) -> probability`` for call 0, 1, 2, ..."""


class RandomizedSam:
    """Randomized sharpness-aware training: each ``sam_step`` is a SAM step of ``sam``
    with probability ``p`` (a float, or a schedule ``p(call)``), otherwise one base step
    with the gradient at w, so a step costs ``1 + p`` gradients on average. The draws come
    from the family's counter-based generator keyed by ``seed`` and the call number, both
    in the state dict (``randomized_seed``, ``randomized_calls``).

    ``first_step``, ``second_step``, ``step``, ``restore``, ``rho``, the learning rate and
    the base state are ``sam``'s.
    """

    def __init__(self, sam: SamOptimizer, p: Probability = 0.5, *, seed: int = 0) -> None:
        if not isinstance(sam, SamOptimizer):
            raise OptimizerError(
                f"sam must be a SamOptimizer (or a variant), got {type(sam).__name__}", "sam"
            )
        if not callable(p):
            p = _check_probability("p", p)
        self.sam = sam
        self._p = p
        self._seed = _check_seed(seed)
        self._calls = 0
        self._lock = threading.RLock()

    @property
    def p(self) -> Probability:
        return self._p

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rho(self) -> float:
        return self.sam.rho

    @rho.setter
    def rho(self, value: float) -> None:
        self.sam.rho = value

    @property
    def pending(self) -> bool:
        return self.sam.pending

    def _probability(self) -> float:
        p = self._p
        return _check_probability("p", p(self._calls) if callable(p) else p)

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        params_dict = as_dict(params, "params")
        with self._lock:
            if self.sam.pending:
                raise OptimizerError(
                    "sam_step called while a first_step is pending (call second_step or "
                    "restore first)",
                    None,
                )
            probability = self._probability()
            # The step and its count commit together: Ctrl-C is held from the draw to the
            # count, except inside grad_fn, where the step in progress handles it as any
            # error of grad_fn (and a Ctrl-C held before is raised as grad_fn starts).
            with InterruptHold() as hold:

                def interruptible(at: dict[str, NDArray[Any]]) -> tuple[Any, Grads]:
                    with hold.released():
                        return grad_fn(at)

                if _uniform(self._seed, self._calls) < probability:
                    loss = self.sam.sam_step(params_dict, interruptible)
                else:
                    loss, grads = _evaluate(interruptible, params_dict)
                    self.sam.second_step(params_dict, grads)
                self._calls += 1
            return loss

    def first_step(self, params: Params, grads: Grads) -> None:
        self.sam.first_step(params, grads)

    def second_step(self, params: Params, grads: Grads) -> None:
        self.sam.second_step(params, grads)

    step = second_step

    def restore(self, params: Params) -> None:
        self.sam.restore(params)

    def zero_grad(self) -> None:
        self.sam.zero_grad()

    def get_lr(self) -> float:
        return self.sam.get_lr()

    def set_lr(self, lr: float) -> None:
        self.sam.set_lr(lr)

    def state_dict(self) -> StateDict:
        """``sam``'s state, ``randomized_seed`` and ``randomized_calls``."""
        with self._lock:
            state = self.sam.state_dict()
            state["randomized_seed"] = np.array(self._seed, dtype=np.int64)
            state["randomized_calls"] = np.array(self._calls, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        seed = _seed_entry(state, "randomized_seed")
        calls = time_step_entry(state, "randomized_calls")
        own = ("randomized_seed", "randomized_calls")
        with self._lock, InterruptHold():
            self.sam.load_state_dict({k: v for k, v in state.items() if k not in own})
            self._seed, self._calls = seed, calls

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RandomizedSam({self.sam!r}, p={self._p!r}, seed={self._seed!r})"


def _check_probability(key: str, value: object) -> float:
    p = check_real(key, value, minimum=0.0)
    if p > 1.0:
        raise OptimizerError(f"{key} must be in [0, 1], got {value!r}", key)
    return p



def _load_kept_gradient(state: Mapping[str, Any], prefix: str) -> dict[str, NDArray[Any]]:
    """A pending step's kept gradient, ``prefix<name>``: one for each ``saved_<name>``, of
    its dtype and shape."""
    keys = [k for k in state if isinstance(k, str)]
    kept = {k[len(prefix):]: state_array(state, k) for k in sorted(keys) if k.startswith(prefix)}
    saved = {k[len("saved_"):]: state[k] for k in keys if k.startswith("saved_")}
    if kept.keys() != saved.keys():
        key = sorted(kept.keys() ^ saved.keys())[0]
        raise OptimizerError(
            f"state dict's pending gradient and saved values disagree for '{key}'", prefix + key
        )
    for name, array in kept.items():
        other = np.asarray(saved[name])
        if (array.dtype, array.shape) != (other.dtype, other.shape):
            raise OptimizerError(
                f"state '{prefix}{name}' has dtype {array.dtype} and shape {array.shape} "
                f"but 'saved_{name}' has dtype {other.dtype} and shape {other.shape}",
                prefix + name,
            )
    return {name: np.array(a, order="C") for name, a in kept.items()}


def _check_decay(key: str, value: object) -> float:
    decay = check_real(key, value, minimum=0.0)
    if decay >= 1.0:
        raise OptimizerError(f"{key} must be in [0, 1), got {value!r}", key)
    return decay


_BSAM_GROUP_CHECKS: dict[str, Check] = {
    "lr": lambda key, value: check_real(key, value, minimum=0.0),
    "beta1": _check_decay,
    "beta2": _check_decay,
    "prior_precision": lambda key, value: check_real(key, value, minimum=0.0),
    "rho": lambda key, value: check_real(key, value, minimum=0.0),
    "damping": lambda key, value: check_real(key, value, minimum=0.0),
}


def _buffers_of(arrays: Mapping[str, NDArray[Any]]) -> Buffers:
    made = Buffers()
    made.arrays = dict(arrays)
    return made


class WsamOptimizer(_FamilyStep):
    """WSAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term"): minimises ``L(w) + α·(L(w + ε) − L(w))`` with
    ``α = γ/(1 − γ)``, ε SAM's ascent. With ``decouple=True`` (the paper's Algorithm 1)
    the base steps with the gradient g at w and the sharpness term is a separate step,
    ``w ← w − lr·α·(g̃ − g)`` (lr each parameter group's, g̃ the gradient at w + ε);
    with ``decouple=False`` the base steps with ``(1 − α)·g + α·g̃``. γ = 1/2 is SAM.
    The first step keeps g (``wsam_grad0_<name>`` in a state dict taken between the
    phases).
    """

    _grad0_prefix = "wsam_grad0_"

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        gamma: float = 0.9,
        decouple: bool = True,
        eps: float = 0.0,
        interval: int = 1,
        param_groups: object = None,
    ) -> None:
        super().__init__(base_optimizer, rho, eps=eps, interval=interval, param_groups=param_groups)
        self._gamma = check_real("gamma", gamma, minimum=0.0)
        if self._gamma >= 1.0:
            raise OptimizerError(f"gamma must be in [0, 1), got {gamma!r}", "gamma")
        if not isinstance(decouple, bool):
            raise OptimizerError(f"decouple must be a bool, got {decouple!r}", "decouple")
        self._decouple = decouple
        self._grad0 = Buffers()
        self._direction = Buffers()
        self._by_lr = Buffers()  # only its names' order, for the decoupled steps' calls

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def decouple(self) -> bool:
        return self._decouple

    @property
    def weight(self) -> float:
        """α = γ/(1 − γ), the sharpness term's weight."""
        return self._gamma / (1.0 - self._gamma)

    def first_step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            if self.pending:
                _core.first_step(self._engine, params_dict, grads_dict, self.rho, self._eps)
            grad0 = self._grad0.like(params_dict)
            _core.scale(self._grad0.names, grad0, grads_dict, 1.0)
            _core.first_step(self._engine, params_dict, grad0, self.rho, self._eps)

    def _lrs(self, params: dict[Any, Any]) -> dict[float, dict[Any, Any]]:
        """The parameters by the learning rate of their base parameter group."""
        base = self.base_optimizer
        lrs = getattr(getattr(base, "_engine", None), "lrs", None)
        groups = getattr(base, "param_groups", None)
        if lrs is None or groups is None or not len(groups):
            return {float(base.get_lr()): params}
        by_lr: dict[float, dict[Any, Any]] = {}
        for name, value in params.items():
            by_lr.setdefault(float(lrs[groups.assign(name)]), {})[name] = value
        return by_lr

    def _finish(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        if not self.pending:
            self._base_step(params, grads, count)
            return
        grad0 = self._grad0.arrays
        _core.cosine(grad0, grads)  # g̃ checked finite before anything is written
        direction = self._direction.like(params)
        names = self._direction.names
        alpha = self.weight
        if not self._decouple:
            _core.combine((names, self._grad0.names), direction, grads, alpha, grad0, 1.0 - alpha)
            self._base_step(params, direction, count)
            return
        _core.combine((names, self._grad0.names), direction, grads, 1.0, grad0, -1.0)
        by_lr = self._lrs(params)
        self._base_step(params, grad0, count)
        for lr, group in by_lr.items():
            if lr and alpha:
                _core.accumulate(self._by_lr.names, group, direction, -lr * alpha)

    def _own_keys(self) -> tuple[list[str], list[str]]:
        exact, prefixes = super()._own_keys()
        return exact, [*prefixes, self._grad0_prefix]

    def state_dict(self) -> StateDict:
        with self._lock:
            state = super().state_dict()
            if self.pending:
                for name in sorted(self._grad0.arrays):
                    state[self._grad0_prefix + name] = self._grad0.arrays[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        grad0 = _load_kept_gradient(state, self._grad0_prefix)
        with self._lock, InterruptHold():
            super().load_state_dict(state)
            self._grad0 = _buffers_of(grad0)

    def __repr__(self) -> str:
        return (
            f"WsamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, gamma={self._gamma!r}, "
            f"decouple={self._decouple!r}, eps={self._eps!r}, interval={self._interval!r})"
        )


class FisherSamOptimizer(_FamilyStep):
    """Fisher SAM (Kim et al., ICML 2022, "Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation"): the ascent within a Fisher ellipsoid instead of a Euclidean ball,
    ``ε = ρ·f⁻¹g/√(gᵀf⁻¹g)`` with the diagonal Fisher ``f = 1 + η·g²`` estimated from the
    mini-batch gradient's squares. η = 0 is SAM. Stateless beyond SAM's.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        eta: float = 1.0,
        eps: float = 0.0,
        interval: int = 1,
        param_groups: object = None,
    ) -> None:
        super().__init__(base_optimizer, rho, eps=eps, interval=interval, param_groups=param_groups)
        self._fisher_eta = check_real("eta", eta, minimum=0.0)
        self._direction = Buffers()

    @property
    def eta(self) -> float:
        """The Fisher's weight: ``f = 1 + η·g²`` (not ASAM's eta)."""
        return self._fisher_eta

    @eta.setter
    def eta(self, value: float) -> None:
        with self._lock:
            self._fisher_eta = check_real("eta", value, minimum=0.0)

    def first_step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            if self.pending:
                _core.first_step(self._engine, params_dict, grads_dict, self.rho, self._eps)
            direction = self._direction.like(params_dict)
            _core.fisher(self._direction.names, direction, grads_dict, self._fisher_eta)
            cos, direction_norm, norm = _core.cosine(self._perturbed(direction), grads_dict)
            # SAM's ascent follows f⁻¹g with radius ρ_eff/‖f⁻¹g‖; ρ_eff makes it 1/√(gᵀf⁻¹g).
            metric_norm = float(np.sqrt(max(cos, 0.0) * direction_norm * norm))
            rho = self.rho * direction_norm / (metric_norm + self._eps) if metric_norm else self.rho
            _core.first_step(self._engine, params_dict, direction, rho, 0.0)

    def __repr__(self) -> str:
        return (
            f"FisherSamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, "
            f"eta={self._fisher_eta!r}, eps={self._eps!r}, interval={self._interval!r})"
        )


_EMA = "friendly_ema_"


class FriendlySamOptimizer(_FamilyStep):
    """F-SAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization"): the ascent
    follows the batch-specific part of the gradient, the full-gradient part estimated by an
    EMA and removed: ``m ← λ·m + (1 − λ)·g ; d = g − σ·m ; ε = ρ·d/‖d‖`` (m starts at 0;
    the paper's equations, which update m before using it). The EMA is
    ``friendly_ema_<name>`` in the state dict; it starts again from 0 when the parameters'
    names change. ``restore`` after a ``first_step`` of this process also undoes its EMA
    update.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.6,
        eps: float = 0.0,
        interval: int = 1,
        param_groups: object = None,
    ) -> None:
        super().__init__(base_optimizer, rho, eps=eps, interval=interval, param_groups=param_groups)
        self._sigma = check_real("sigma", sigma, minimum=0.0)
        self._lmbda = check_real("lmbda", lmbda, minimum=0.0)
        if self._lmbda >= 1.0:
            raise OptimizerError(f"lmbda must be in [0, 1), got {lmbda!r}", "lmbda")
        self._ema = Buffers()
        self._spare = Buffers()
        self._direction = Buffers()
        self._undoable = False

    @property
    def sigma(self) -> float:
        return self._sigma

    @property
    def lmbda(self) -> float:
        return self._lmbda

    def first_step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            if self.pending:
                _core.first_step(self._engine, params_dict, grads_dict, self.rho, self._eps)
            ema = self._spare.like(params_dict)
            names = self._spare.names
            if self._ema.arrays.keys() == params_dict.keys():
                _core.combine(
                    (names, self._ema.names),
                    ema,
                    grads_dict,
                    1.0 - self._lmbda,
                    self._ema.arrays,
                    self._lmbda,
                )
            else:
                _core.scale(names, ema, grads_dict, 1.0 - self._lmbda)
            direction = self._direction.like(params_dict)
            _core.combine(
                (self._direction.names, names), direction, grads_dict, 1.0, ema, -self._sigma
            )
            _core.first_step(self._engine, params_dict, direction, self.rho, self._eps)
            self._ema, self._spare = self._spare, self._ema
            self._undoable = self.pending

    def _finish(self, params: dict[Any, Any], grads: dict[Any, Any], count: bool) -> None:
        self._base_step(params, grads, count)
        self._undoable = False

    def restore(self, params: Params) -> None:
        with self._lock, InterruptHold():
            undo = self._undoable and self.pending
            super().restore(params)
            if undo:
                self._ema, self._spare = self._spare, self._ema
            self._undoable = False

    def sam_step_splits(self, params: Params, grad_fns: Iterable[GradFn]) -> list[Any]:
        """m-sharpness: each sub-batch's ascent updates the EMA in turn. A failed step
        (Ctrl-C included) leaves the EMA as it was, from a copy taken as the step starts:
        the swap that ``restore`` undoes goes back one update only."""
        with self._lock:
            ema = {name: array.copy() for name, array in self._ema.arrays.items()}
            calls = self._engine.calls
            try:
                return super().sam_step_splits(params, grad_fns)
            except BaseException:
                if self._engine.calls == calls:  # the step was not taken (as ESAM's)
                    with InterruptHold():
                        self._ema, self._undoable = _buffers_of(ema), False
                raise

    def _own_keys(self) -> tuple[list[str], list[str]]:
        exact, prefixes = super()._own_keys()
        return exact, [*prefixes, _EMA]

    def state_dict(self) -> StateDict:
        with self._lock:
            state = super().state_dict()
            for name in sorted(self._ema.arrays):
                state[_EMA + name] = self._ema.arrays[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        keys = sorted(k for k in state if isinstance(k, str) and k.startswith(_EMA))
        ema = {k[len(_EMA):]: np.array(state_array(state, k), order="C") for k in keys}
        with self._lock, InterruptHold():
            super().load_state_dict(state)
            self._ema = _buffers_of(ema)
            self._undoable = False

    def __repr__(self) -> str:
        return (
            f"FriendlySamOptimizer({self.base_optimizer!r}, rho={self._rho!r}, "
            f"sigma={self._sigma!r}, lmbda={self._lmbda!r}, eps={self._eps!r}, "
            f"interval={self._interval!r})"
        )


class BsamOptimizer:
    """bSAM (Möllenhoff & Khan, ICLR 2023, "SAM as an Optimal Relaxation of Bayes"): SAM
    as a variational Bayes method, a full optimizer with a Gaussian posterior
    ``N(w, 1/(N·s))`` over the weights. Each ``sam_step``, as the authors' code does
    (m-sharpness with one split)::

        ε ~ N(0, 1/(N·s))             g   = ∇L(w + ε)      (a posterior sample)
        e = ρ·g/s                      g_e = ∇L(w + e)      (the ascent, from w)
        m ← β1·m + (1 − β1)·(g_e + δ·w)
        w ← w − α·m/s
        s ← β2·s + (1 − β2)·(√s·|g| + γ + δ)

    with ``δ = prior_precision/num_data`` (the weight decay), ``γ = damping``, m starting
    at 0 and s at ``s_init``. The noise comes from the family's counter-based generator
    (Box–Muller), keyed by ``seed`` and the step count (``bsam_seed``, ``bsam_draws`` in
    the state dict). Two gradient evaluations per step; returns the loss at the sample.
    ``step(params, grads)`` is the update with ``grads`` as both gradients (no sample, no
    ascent).

    ``param_groups=[{"params": selector, **overrides}]`` may override ``lr``, ``beta1``,
    ``beta2``, ``prior_precision``, ``rho`` and ``damping`` (the posterior's ``num_data``
    and ``s_init`` are the model's). A group's ``lr`` and ``rho`` keep their ratio to the
    optimizer's when ``set_lr`` or the ``rho`` setter changes it, as in SamOptimizer and
    the base optimizers; the state dict holds each group's ``param_groups.<i>.lr``.
    """

    def __init__(
        self,
        num_data: int,
        lr: float = 0.5,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        prior_precision: float = 40.0,
        rho: float = 0.01,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int = 0,
        param_groups: object = None,
    ) -> None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise OptimizerError(f"num_data must be an int >= 1, got {num_data!r}", "num_data")
        self.num_data = num_data
        own_lr = check_real("lr", lr, minimum=0.0)
        self.beta1, self.beta2 = _check_decay("beta1", beta1), _check_decay("beta2", beta2)
        self.prior_precision = check_real("prior_precision", prior_precision, minimum=0.0)
        self._rho = check_real("rho", rho, minimum=0.0)
        self.damping = check_real("damping", damping, minimum=0.0)
        self.s_init = check_real("s_init", s_init, above=0.0)
        self._seed = _check_seed(seed)
        self.param_groups = ParamGroups.parse(param_groups, _BSAM_GROUP_CHECKS)
        for key, own in (("lr", own_lr), ("rho", self._rho)):
            if own == 0.0 and any(key in o for o in self.param_groups.overrides):
                raise OptimizerError(
                    f"a parameter group's {key} keeps its ratio to the optimizer's, which is 0",
                    key,
                )
        self._configured = (own_lr, self._rho)
        self._lrs = self._scaled_lrs(own_lr)
        self._group_of: dict[Any, int] = {}
        self._draws = 0
        self._momentum = Buffers()
        self._precision = Buffers()
        self._direction = Buffers()
        self._lock = threading.RLock()
        self._new_engines()

    def _new_engines(self) -> None:
        """The posterior sample moves every parameter as drawn (one engine, no groups); the
        ascent moves each by its group's rho (another, each group's rho as a multiple of
        the optimizer's)."""
        self._engine = _core.SamEngine(False, [(1.0, False, 0.0, True)], None)
        ascents = [(1.0, False, 0.0, True)]
        for values in self.param_groups.overrides:
            ratio = values["rho"] / self._configured[1] if "rho" in values else 1.0
            ascents.append((ratio, False, 0.0, True))
        assign = self.param_groups.assign if len(self.param_groups) else None
        self._ascent_engine = _core.SamEngine(False, ascents, assign)

    def _scaled_lrs(self, lr: float) -> list[float]:
        configured = self._configured[0]
        return [lr] + [
            values["lr"] * (lr / configured) if "lr" in values else lr
            for values in self.param_groups.overrides
        ]

    def _hypers(self) -> list[tuple[float, float, float, float, float]]:
        """Each group's ``(lr, beta1, beta2, delta, damping)``, the optimizer's own first."""
        own = {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "prior_precision": self.prior_precision,
            "damping": self.damping,
        }
        return [
            (lr, v["beta1"], v["beta2"], v["prior_precision"] / self.num_data, v["damping"])
            for lr, v in zip(self._lrs, self.param_groups.resolved(own))
        ]

    def _groups_for(self, params: dict[Any, Any]) -> dict[Any, int]:
        """Each parameter's group, asked of the groups once per set of names."""
        if not len(self.param_groups):
            return {}
        if self._group_of.keys() != params.keys():
            self._group_of = {name: self.param_groups.assign(name) for name in params}
        return self._group_of

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_real("rho", value, minimum=0.0)

    @property
    def pending(self) -> bool:
        return False

    def get_lr(self) -> float:
        return self._lrs[0]

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate; every parameter group's that sets its own is scaled by
        the same factor."""
        lrs = self._scaled_lrs(check_real("lr", lr, minimum=0.0))
        with self._lock:
            self._lrs = lrs

    def zero_grad(self) -> None:
        """Nothing: the gradients are the caller's arrays."""

    def _state_for(self, params: dict[Any, Any]) -> tuple[Buffers, Buffers]:
        """m and s for ``params``: the optimizer's own, or new ones (m = 0, s = s_init)
        that become its own only when the step succeeds."""
        momentum, precision = self._momentum, self._precision
        fits = momentum.arrays.keys() == params.keys() and all(
            momentum.arrays[k].shape == np.shape(v) for k, v in params.items()
        )
        if fits:
            return momentum, precision
        momentum, precision = Buffers(), Buffers()
        momentum.like(params)
        for array in precision.like(params).values():
            array[...] = self.s_init
        return momentum, precision

    def _update(
        self,
        params: dict[Any, Any],
        ascended: dict[Any, Any],
        sampled: dict[Any, Any],
        state: tuple[Buffers, Buffers],
    ) -> None:
        momentum, precision = state
        weights = self._direction  # only its names' order
        _core.bsam_update(
            (weights.names, momentum.names, precision.names),
            params, ascended, momentum.arrays, sampled, precision.arrays, self._hypers(),
            self._groups_for(params),
        )
        self._momentum, self._precision = momentum, precision

    def _moved(self, engine: _core.SamEngine, params: dict[Any, Any],
               direction: dict[Any, Any], radius: float,
               grad_fn: GradFn) -> tuple[Any, dict[Any, Any]]:
        """The loss and gradients at ``w + radius·d`` (each group's radius under the ascent
        engine; at w when d = 0); w is put back exactly whatever happens."""
        if not radius:
            return _evaluate(grad_fn, params)
        norm = _core.gradient_norm(direction)
        try:
            _core.first_step(engine, params, direction, radius * norm, 0.0)
            return _evaluate(grad_fn, params)
        finally:
            _core.restore(engine, params)

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        params_dict = as_dict(params, "params")
        with self._lock:
            state = self._state_for(params_dict)
            precision = state[1]
            direction = self._direction.like(params_dict)
            names = self._direction.names
            _core.noise(names, direction, precision.arrays, self._seed, self._draws,
                        float(self.num_data))
            loss, sampled = self._moved(self._engine, params_dict, direction, 1.0, grad_fn)
            _core.divide((names, precision.names), direction, sampled, precision.arrays)
            _, ascended = self._moved(
                self._ascent_engine, params_dict, direction, self._rho, grad_fn
            )
            with InterruptHold():
                self._update(params_dict, ascended, sampled, state)
                self._draws += 1
            return loss

    def step(self, params: Params, grads: Grads) -> None:
        params_dict, grads_dict = as_dict(params, "params"), as_dict(grads, "grads")
        with self._lock, InterruptHold():
            self._update(params_dict, grads_dict, grads_dict, self._state_for(params_dict))

    def state_dict(self) -> StateDict:
        """``lr``, ``bsam_seed``, ``bsam_draws``, and per parameter ``m_<name>`` and
        ``s_<name>``."""
        with self._lock:
            state: StateDict = {
                "lr": np.array(self._lrs[0]),
                "bsam_seed": np.array(self._seed, dtype=np.int64),
                "bsam_draws": np.array(self._draws, dtype=np.int64),
            }
            for index, lr in enumerate(self._lrs[1:]):
                state[f"param_groups.{index}.lr"] = np.array(lr)
            for name in sorted(self._momentum.arrays):
                state["m_" + name] = self._momentum.arrays[name].copy()
                state["s_" + name] = self._precision.arrays[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state must be a mapping, got {type(state).__name__}", None)
        group_lrs = [f"param_groups.{i}.lr" for i in range(len(self.param_groups))]
        for key in state:
            known = key in ("lr", "bsam_seed", "bsam_draws", *group_lrs) or (
                isinstance(key, str) and key.startswith(("m_", "s_"))
            )
            if not known:
                raise OptimizerError(f"unknown state dict key {key!r}", str(key))
        lrs = [scalar_entry(state, key) for key in ("lr", *group_lrs)]
        seed = _seed_entry(state, "bsam_seed")
        draws = time_step_entry(state, "bsam_draws")
        keys = sorted(k for k in state if isinstance(k, str))
        momentum = {k[2:]: state_array(state, k) for k in keys if k.startswith("m_")}
        precision = {
            k[2:]: state_array(state, k, non_negative=True) for k in keys if k.startswith("s_")
        }
        if momentum.keys() != precision.keys():
            name = sorted(momentum.keys() ^ precision.keys())[0]
            prefix = "s_" if name in momentum else "m_"
            raise OptimizerError(f"state dict is missing key '{prefix}{name}'", prefix + name)
        for name in momentum:
            m, s = momentum[name], precision[name]
            if (m.dtype, m.shape) != (s.dtype, s.shape):
                raise OptimizerError(
                    f"state 's_{name}' has dtype {s.dtype} and shape {s.shape} but 'm_{name}' "
                    f"has dtype {m.dtype} and shape {m.shape}",
                    "s_" + name,
                )
            if not (s > 0).all():
                raise OptimizerError(f"state 's_{name}' must be positive", "s_" + name)
        loaded_momentum = _buffers_of({k: np.array(v, order="C") for k, v in momentum.items()})
        loaded_precision = _buffers_of({k: np.array(v, order="C") for k, v in precision.items()})
        with self._lock, InterruptHold():
            self._lrs, self._seed, self._draws = lrs, seed, draws
            self._momentum, self._precision = loaded_momentum, loaded_precision

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"], state["_engine"], state["_ascent_engine"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._new_engines()

    def __repr__(self) -> str:
        return (
            f"BsamOptimizer({self.num_data!r}, lr={self._lrs[0]!r}, beta1={self.beta1!r}, "
            f"beta2={self.beta2!r}, prior_precision={self.prior_precision!r}, "
            f"rho={self._rho!r}, damping={self.damping!r}, s_init={self.s_init!r}, "
            f"seed={self._seed!r})"
        )
