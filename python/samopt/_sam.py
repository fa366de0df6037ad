"""Sharpness-Aware Minimization over any base optimizer: SAM, adaptive SAM and GSAM."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core
from ._accumulate import GradAccumulator
from ._config import check_bool, check_real
from ._directions import Buffers
from ._errors import OptimizerError, TrainError
from ._flat import FLAT_KEY, FlatParams, flat_call, flat_error, flat_errors
from ._groups import Check, ParamGroups
from ._optimizers import LoadedState, NativeOptimizer
from ._protocol import Grads, Optimizer, Params, StateDict
from ._signals import InterruptHold
from ._state import as_dict, scalar_entry, state_mapping, time_step_entry

__all__ = ["GradFn", "GsamOptimizer", "SamOptimizer"]

GradFn = Callable[[dict[str, NDArray[Any]]], tuple[Any, Grads]]
"""``grad_fn(params) -> (loss, grads)``: the loss and gradients at the current params."""

_SAVED = "saved_"
_CALLS = "sam_calls"


# How each value a SAM parameter group may override is checked.
_GROUP_CHECKS: dict[str, Check] = {
    "rho": lambda key, value: check_real(key, value, above=0.0),
    "adaptive": check_bool,
    "eta": lambda key, value: check_real(key, value, minimum=0.0),
    "perturb": check_bool,
}


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

    The saved values, what is pending and the call count live in a native engine
    (``samopt._core.SamEngine``) that each phase's native call updates before it returns.
    """

    # State-dict prefixes of the per-parameter buffers of a pending first_step, and the
    # scalars it keeps.
    _pending_prefixes: tuple[str, ...] = (_SAVED,)
    _pending_scalars_names: tuple[str, ...] = ()
    # What a parameter group may override.
    _group_keys: tuple[str, ...] = ("rho", "adaptive", "eta", "perturb")
    # Whether calls over a flat_params arena may be made over its buffer (SAM and GSAM:
    # every formula element-wise but the global norms; not the variants, which keep
    # arrays of their own by name).
    _flat_capable = True
    # The arena whose layout the engine's pending state is held in.
    _flat: _core.FlatArena | None = None

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 0.0,
        interval: int = 1,
        gradient_centralization: bool = False,
        param_groups: object = None,
    ) -> None:
        _check_base(base_optimizer)
        self.base_optimizer = base_optimizer
        self._rho = check_real("rho", rho, above=0.0)
        self._configured_rho = self._rho
        self._adaptive = check_bool("adaptive", adaptive)
        self._eta = check_real("eta", eta, minimum=0.0)
        self._eps = check_real("eps", eps, minimum=0.0)
        self._interval = _check_interval(interval)
        self._centralize = check_bool("gradient_centralization", gradient_centralization)
        self._centred = Buffers()
        checks = {key: _GROUP_CHECKS[key] for key in self._group_keys}
        self.param_groups = ParamGroups.parse(param_groups, checks)
        # Kernels run without the GIL: the lock serialises concurrent calls (re-entrant so
        # that sam_step can hold it around the user's gradient function).
        self._lock = threading.RLock()
        self._engine = self._new_engine()

    def _new_engine(self) -> _core.SamEngine:
        assign = self.param_groups.assign if len(self.param_groups) else None
        return _core.SamEngine(len(self._pending_prefixes) > 1, self._ascents(), assign)

    def _ascents(self) -> list[tuple[float, bool, float, bool]]:
        """The engine's ascent per group, the optimizer's own first: ``(rho as a multiple
        of the optimizer's, adaptive, eta, perturb)``. A group's own rho keeps its ratio to
        the configured one when rho changes (a rho schedule scales every group)."""
        own = (1.0, self._adaptive, self._eta, True)
        ascents = [own]
        for values in self.param_groups.overrides:
            ratio = values["rho"] / self._configured_rho if "rho" in values else 1.0
            adaptive = values.get("adaptive", self._adaptive)
            eta = values.get("eta", self._eta)
            ascents.append((ratio, adaptive, eta, values.get("perturb", True)))
        return ascents

    @property
    def adaptive(self) -> bool:
        """Adaptive SAM (ASAM): the ascent weighted by ``|p| + eta``."""
        return self._adaptive

    @adaptive.setter
    def adaptive(self, value: bool) -> None:
        with self._lock:
            self._adaptive = check_bool("adaptive", value)
            self._engine.set_groups(self._ascents())

    @property
    def eta(self) -> float:
        """ASAM's ``T = |p| + eta``."""
        return self._eta

    @eta.setter
    def eta(self, value: float) -> None:
        with self._lock:
            self._eta = check_real("eta", value, minimum=0.0)
            self._engine.set_groups(self._ascents())

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
    def gradient_centralization(self) -> bool:
        """GCSAM (Hassan et al., 2025): the ascent follows the centralised gradient."""
        return self._centralize

    @property
    def pending(self) -> bool:
        """Whether a first_step has moved the parameters and awaits its second_step."""
        return bool(self._engine.pending)

    def _mix_alpha(self) -> float | None:
        """GSAM's alpha, which mixes g0 into the second step; None for SAM."""
        return None

    def _base(self, flat: bool = False) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
        """What the second phase steps — the base's native engine, so that the restore is
        fused into its update, or the base itself when it is written in Python (or
        overrides ``step``) — and the lock to hold while it does. Unless the call is made
        over an arena's buffer (``flat``, which ``_route`` has set the base up for), the
        base's state is held per name first."""
        base = self.base_optimizer
        if isinstance(base, NativeOptimizer) and type(base).step is NativeOptimizer.step:
            # Read outside the lock first: taking it costs what a small step costs, and
            # _use_names looks again under it.
            if not flat and base._flat is not None:
                with base._lock:
                    base._use_names()
            return base._engine, base._lock
        return base, contextlib.nullcontext()

    def _takes_flat(self) -> bool:
        base = self.base_optimizer
        return (
            self._flat_capable
            and not self._centralize
            and not len(self.param_groups)
            and isinstance(base, NativeOptimizer)
            and type(base).step is NativeOptimizer.step
            and base._takes_flat()
        )

    def _route(
        self, params: object, grads: object
    ) -> tuple[_core.FlatArena | None, dict[Any, Any], dict[Any, Any]]:
        """The call's dicts: over an arena's buffers when both are intact arenas of one
        layout and the state (the base's and the pending step's) can be held in it, else
        the caller's arrays, with the state moved to match (under the lock)."""
        # Checked inline: on a step over a few small arrays each call here shows.
        if isinstance(params, FlatParams):
            call = flat_call(params, grads)
            if call is not None and self._takes_flat() and self._use_flat(call[0]):
                return call
        if self._flat is not None or getattr(self.base_optimizer, "_flat", None) is not None:
            self._use_names()
        return None, as_dict(params, "params"), as_dict(grads, "grads")

    def _flat_held(self, arena: _core.FlatArena) -> bool:
        base = self.base_optimizer
        assert isinstance(base, NativeOptimizer)
        held = [self._flat, base._flat]
        return all(flat is not None and flat.same_layout(arena) for flat in held)

    def _use_flat(self, arena: _core.FlatArena) -> bool:
        """Holds the base's state and the pending step's in ``arena``'s layout, gathering
        what is held per name; False when it cannot be (a slot held for some of the
        arena's names but not all)."""
        if self._flat_held(arena):
            return True
        base = self.base_optimizer
        assert isinstance(base, NativeOptimizer)
        prefixes = [*base._engine.slots, *self._pending_prefixes]
        if self._flat is not None or base._flat is not None:
            moved = arena.gather_state(self.state_dict(), prefixes, FLAT_KEY)
            gathered = None if moved is None else moved[0]
        else:
            gathered = base._gathered_state(arena)
            if gathered is not None:
                self._add_own_state(gathered)
                if not self._engine.state_dict_gathered(gathered, arena, FLAT_KEY):
                    gathered = None
        if gathered is None:
            return False
        held = self._flat is not None or base._flat is not None
        if held or any(prefix + FLAT_KEY in gathered for prefix in prefixes):
            self.load_state_dict(gathered)
        self._flat = base._flat = arena
        return True

    def _use_names(self) -> None:
        """Holds the state per name again, cutting an arena's buffers along its ranges."""
        base = self.base_optimizer
        if self._flat is None and getattr(base, "_flat", None) is None:
            return
        self.load_state_dict(self.state_dict())

    def _ascent_gradients(self, params: dict[Any, Any], grads: dict[Any, Any]) -> dict[Any, Any]:
        """What the ascent follows: ``grads``, or with gradient centralisation (GCSAM) each
        array of two or more dimensions with the mean of every slice along its first axis
        removed, ``g − mean(g[r, ...])`` (Yong et al., 2020's operator)."""
        if not self._centralize:
            return grads
        centred = self._centred.like(params)
        _core.centralize(self._centred.names, centred, grads)
        return centred

    def first_step(self, params: Params, grads: Grads) -> None:
        """Climbs to the worst point within radius rho; nothing moves when ‖g‖ = 0. With
        ``gradient_centralization`` the ascent is ``ρ·g_c/‖g_c‖``, g_c the centralised
        gradient."""
        with self._lock:
            arena, params_dict, grads_dict = self._route(params, grads)
            ascent = self._ascent_gradients(params_dict, grads_dict)
            try:
                _core.first_step(self._engine, params_dict, ascent, self.rho, self._eps)
            except TrainError as error:
                if arena is None:
                    raise
                raise flat_error(error, arena, params_dict, grads_dict) from None

    def second_step(self, params: Params, grads: Grads) -> None:
        """Restores the parameters exactly and steps the base optimizer with ``grads``,
        the gradients taken at the perturbed point. Without a pending first_step this is a
        plain base step."""
        with self._lock:
            arena, params_dict, grads_dict = self._route(params, grads)
            base, base_lock = self._base(flat=arena is not None)
            try:
                with base_lock:
                    _core.second_step(
                        self._engine, base, params_dict, grads_dict, self._mix_alpha()
                    )
            except TrainError as error:
                if arena is None:
                    raise
                raise flat_error(error, arena, params_dict, grads_dict) from None

    step = second_step

    def sam_step(self, params: Params, grad_fn: GradFn) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` is called at the current
        point and, on SAM calls, at the perturbed point; returns the first loss. With
        ``interval=k`` only every k-th call (the first included) is a SAM step, the others
        a plain base step with one gradient evaluation. The step is one native call: on
        any error — in ``grad_fn`` too, Ctrl-C included — the parameters are left as they
        were and nothing is pending; when it returns, the step is complete."""
        with self._lock:
            if isinstance(params, FlatParams) and self._takes_flat():
                done, outcome = self._flat_sam_step(params, grad_fn)
                if done:
                    return outcome
                grad_fn = outcome
            params_dict = as_dict(params, "params")
            if self._centralize and self._engine.calls % self._interval == 0:
                grad_fn = self._centring_first(params_dict, grad_fn)
            self._use_names()
            base, base_lock = self._base()
            with base_lock:
                return _core.sam_step(
                    self._engine, base, params_dict, grad_fn,
                    self.rho, self._eps, self._mix_alpha(), self._interval,
                )

    def _flat_sam_step(self, params: FlatParams, grad_fn: GradFn) -> tuple[bool, Any]:
        """``sam_step`` over the arena's buffers: ``(True, loss)``. When the arena is not
        intact, or the first gradients ``grad_fn`` returns are not an intact arena of the
        same layout, ``(False, f)``: ``f`` is the gradient function for the step made
        array by array, which gives that first evaluation back before calling
        ``grad_fn`` again (the aborted call changed nothing)."""
        arena = params._arena
        if not (arena.intact(params) and self._use_flat(arena)):
            return False, grad_fn
        flat_params = {FLAT_KEY: arena.buffer}
        seen: dict[str, Any] = {}

        def flat_grad_fn(_: object) -> tuple[Any, Grads]:
            loss, grads = grad_fn(params)  # the caller's own views, which see the buffer
            if isinstance(grads, FlatParams):
                grads_arena = grads._arena
                if arena.same_layout(grads_arena) and grads_arena.intact(grads):
                    seen[FLAT_KEY] = grads_arena.buffer
                    return loss, {FLAT_KEY: grads_arena.buffer}
            if not seen:
                raise _PlainGradients(loss, grads)
            raise OptimizerError(
                "grad_fn returned a flat_params arena's gradients at the first point and "
                "other gradients at the perturbed point; return the same kind both times",
                "grads",
            )

        base, base_lock = self._base(flat=True)
        try:
            with base_lock, flat_errors(arena, flat_params, seen):
                return True, _core.sam_step(
                    self._engine, base, flat_params, flat_grad_fn,
                    self.rho, self._eps, self._mix_alpha(), self._interval,
                )
        except _PlainGradients as plain:
            first = [(plain.loss, plain.grads)]

            def replaying(at: dict[str, NDArray[Any]]) -> tuple[Any, Grads]:
                return first.pop() if first else grad_fn(at)

            return False, replaying

    def _centring_first(self, params: dict[Any, Any], grad_fn: GradFn) -> GradFn:
        """``grad_fn`` whose first call's gradients (those the ascent follows) come back
        centralised."""
        first = [True]

        def centring(at: dict[str, NDArray[Any]]) -> tuple[Any, Grads]:
            loss, grads = grad_fn(at)
            if first[0]:
                first[0] = False
                return loss, self._ascent_gradients(params, as_dict(grads, "grads"))
            return loss, grads

        return centring

    def sam_step_splits(self, params: Params, grad_fns: Iterable[GradFn]) -> list[Any]:
        """m-sharpness on one machine (Foret et al., 2021, section 4.1): with one gradient
        function per sub-batch, each sub-batch's ascent starts from w, its gradient is taken
        at its own perturbed point ``w + ρ·g_i/‖g_i‖``, and one base step takes the mean of
        those gradients. Two gradient evaluations per sub-batch; returns the sub-batches'
        losses at w. One split is exactly ``sam_step``. Calls that ``interval`` makes plain
        steps take the mean of the sub-batches' gradients at w. On any error the
        parameters go back to where they were and nothing else changes."""
        params_dict = as_dict(params, "params")
        functions = list(grad_fns)
        if not functions or not all(callable(f) for f in functions):
            raise OptimizerError(
                "grad_fns must be a non-empty sequence of gradient functions", "grad_fns"
            )
        with self._lock:
            # Its sub-batches' gradients are averaged name by name.
            self._use_names()
            if self.pending:
                raise OptimizerError(
                    "sam_step_splits called while a first_step is pending (call second_step "
                    "or restore first)",
                    None,
                )
            sam_call = self._engine.calls % self._interval == 0
            mean = GradAccumulator()
            weight = 1.0 / len(functions)
            losses = []
            for grad_fn in functions:
                loss, grads = _evaluate(grad_fn, params_dict)
                losses.append(loss)
                if sam_call:
                    # first_step inside the try: a variant's first_step holds Ctrl-C to its
                    # end, and raises it with the parameters perturbed.
                    try:
                        self.first_step(params_dict, grads)
                        _, grads = _evaluate(grad_fn, params_dict)
                    finally:
                        # The native restore: a variant's own (ESAM's) also undoes its draw.
                        _core.restore(self._engine, params_dict)
                mean.add(grads, weight)
            base, base_lock = self._base()
            with base_lock:
                _core.second_step(
                    self._engine, base, params_dict, mean.grads, self._mix_alpha(), True
                )
            return losses

    def restore(self, params: Params) -> None:
        """Abandons a pending perturbation: puts the parameters back to their values before
        first_step, bit for bit (e.g. after second_step raised NonFiniteGradientError)."""
        with self._lock:
            arena, params_dict, _ = self._route(params, params)
            with flat_errors(arena, params_dict, None):
                _core.restore(self._engine, params_dict)

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad()

    def get_lr(self) -> float:
        return self.base_optimizer.get_lr()

    def set_lr(self, lr: float) -> None:
        self.base_optimizer.set_lr(lr)

    def _own_keys(self) -> tuple[list[str], list[str]]:
        """The state-dict keys this optimizer owns: exact keys, and key prefixes."""
        return ["rho", _CALLS, *self._pending_scalars_names], list(self._pending_prefixes)

    def _add_own_state(self, state: StateDict) -> None:
        """``rho`` into the base's ``state``, refused when one of the base's keys is one
        of SAM's own."""
        clash = _core.owned_keys(state, *self._own_keys())
        if clash:
            raise OptimizerError(
                f"the base optimizer's state key '{clash[0]}' clashes with "
                f"{type(self).__name__}'s",
                clash[0],
            )
        state["rho"] = np.array(self._rho)

    def state_dict(self) -> StateDict:
        """The base optimizer's state, ``rho``, ``sam_calls`` (for ``interval``), and for
        each parameter of a pending first_step its saved value ``saved_<name>``."""
        with self._lock:
            state = self.base_optimizer.state_dict()
            self._add_own_state(state)
            if self._flat is not None:
                state.update(self._flat.split_state(self._engine.state_dict(), FLAT_KEY))
            elif type(state) is dict:
                self._engine.state_dict(state)
            else:
                state.update(self._engine.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads a state_dict (also into a freshly built optimizer); checks everything
        before changing anything: a pending first_step loads only when it fits the base's
        state, so a loaded state is always usable."""
        state = state_mapping(state)
        rho = scalar_entry(state, "rho", positive=True)
        base = self.base_optimizer
        if isinstance(base, NativeOptimizer):
            loaded = base._parse_state(state, ignore=self._own_keys())
            staged = self._stage(state, loaded)
            with self._lock, InterruptHold():
                base._install(loaded)
                self._rho = rho
                self._engine.install(staged)
                self._flat = None
            return
        _, base_state = _core.partition_state(state, *self._own_keys())
        staged = self._stage(state, None)
        with self._lock, InterruptHold() as hold:
            with hold.released():  # the base's own code, interruptible
                base.load_state_dict(base_state)
            self._rho = rho
            self._engine.install(staged)
            self._flat = None

    def _stage(self, state: dict[str, Any], base: LoadedState | None) -> _core.StagedSamState:
        """The SAM part of ``state`` checked and copied, not yet in force.
        With the base's loaded state, a pending first_step must fit its per-parameter
        state: each name one the base has state for (when it has any), of that state's
        dtype and shape. A corrupt or mismatched checkpoint is so refused whole instead of
        loading into an optimizer whose second_step and restore then fail on every call. (A
        parameter whose very first step is the pending one is refused too: checkpoint after
        its second_step.)"""
        calls = time_step_entry(state, _CALLS) if _CALLS in state else 0
        exact, _ = self._own_keys()
        prefixes = list(self._pending_prefixes)
        pending = _core.parse_table(state, prefixes, [], exact, strict=False, same_layouts=False)
        if base is not None:
            assert isinstance(self.base_optimizer, NativeOptimizer)
            base_prefix = self.base_optimizer._engine.slots[0]
            pending.check_fits(base.entries, _SAVED, base_prefix)
        pending.check_layouts(prefixes)
        scalars = self._load_pending_scalars(state) if len(pending) else 0.0
        return self._engine.stage(calls, pending, scalars)

    def _load_pending_scalars(self, state: Mapping[str, Any]) -> float:
        return 0.0

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
            own = self._engine.state_dict()
            state["_engine"] = own if self._flat is None else self._flat.split_state(own, FLAT_KEY)
            state["_flat"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        own = state.pop("_engine")
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._engine = self._new_engine()
        self._engine.install(self._stage(own, None))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.base_optimizer!r}, rho={self._rho!r}, "
            f"adaptive={self.adaptive!r}, eta={self.eta!r}, eps={self._eps!r}, "
            f"interval={self._interval!r}, "
            f"gradient_centralization={self._centralize!r})"
        )


class _PlainGradients(Exception):
    """A flat sam_step's first gradients were not an arena: the step is made array by
    array instead, starting from this evaluation."""

    def __init__(self, loss: Any, grads: Grads) -> None:
        super().__init__()
        self.loss = loss
        self.grads = grads


def _evaluate(grad_fn: GradFn, params: dict[Any, Any]) -> tuple[Any, dict[Any, Any]]:
    """``grad_fn(params)`` checked to return ``(loss, grads)``."""
    result = grad_fn(params)
    if not isinstance(result, tuple) or len(result) != 2:
        raise OptimizerError(
            f"grad_fn must return (loss, grads), got {type(result).__name__}", "grad_fn"
        )
    return result[0], as_dict(result[1], "grads")


def _check_base(base_optimizer: object) -> None:
    if isinstance(base_optimizer, type):
        raise OptimizerError(
            "base_optimizer must be an optimizer instance, got the class "
            f"{base_optimizer.__name__} (build one: {base_optimizer.__name__}(...))",
            "base_optimizer",
        )
    if not isinstance(base_optimizer, Optimizer):
        raise OptimizerError(
            "base_optimizer must implement the Optimizer protocol (step, zero_grad, "
            f"get_lr, set_lr, state_dict, load_state_dict), got "
            f"{type(base_optimizer).__name__}",
            "base_optimizer",
        )


class GsamOptimizer(SamOptimizer):
    """GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided SAM").

    The first step is SAM's and keeps the gradient g0 at w; the second steps the base with
    ``g1 − alpha·g0⊥``, where g1 is the gradient at the perturbed point and g0⊥ the part of
    g0 orthogonal to g1. With ``rho_min`` set, rho follows the base's learning rate:
    ``rho = rho_min + (rho_max − rho_min)·(lr − lr_min)/(lr_max − lr_min)``, lr_max being
    the learning rate at construction (rho_max when lr_max ≤ lr_min; clamped to
    [rho_min, rho_max]).
    """

    _pending_prefixes = (_SAVED, "grad0_")
    _pending_scalars_names = ("grad_norm0",)
    _group_keys = ("rho", "perturb")

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
        param_groups: object = None,
    ) -> None:
        rho_max = check_real("rho_max", rho_max, above=0.0)
        super().__init__(
            base_optimizer, rho_max, eps=eps, interval=interval, param_groups=param_groups
        )
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

    def _mix_alpha(self) -> float:
        return self._alpha

    def sam_step_splits(self, params: Params, grad_fns: Iterable[GradFn]) -> list[Any]:
        """Not defined for GSAM: its mix needs one g0 and one perturbed gradient."""
        raise OptimizerError("GsamOptimizer has no sam_step_splits (use SamOptimizer)", None)

    def _load_pending_scalars(self, state: Mapping[str, Any]) -> float:
        return scalar_entry(state, "grad_norm0", positive=True)

    def __repr__(self) -> str:
        return (
            f"GsamOptimizer({self.base_optimizer!r}, rho_max={self._rho!r}, "
            f"rho_min={self.rho_min!r}, alpha={self.alpha!r}, lr_min={self.lr_min!r}, "
            f"eps={self.eps!r}, interval={self.interval!r})"
        )
