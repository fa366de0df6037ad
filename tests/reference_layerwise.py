"""A plain float64 NumPy reference for samopt's Lookahead and layer-wise optimizers, written
from the papers' formulas (and tensorlogic-train's source where it follows them), never
from samopt's code. Everything is float64 and loops over dicts: simple over fast.

Conventions as in tests/reference.py: gradients are converted to the parameter dtype, then
to float64 (`reference.to_ref_grads`), and clipping is `reference.clip_grads`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import reference as R


class RefLookahead:
    """Lookahead (Zhang et al. 2019, Algorithm 1): the slow weights φ start as the
    parameters' values before their first fast step; after every k-th inner step
    φ ← φ + α·(θ − φ) and θ ← φ. Wraps a reference optimizer, or a reference SAM (its
    first_step does not count as a step)."""

    def __init__(self, inner: Any, alpha: float, k: int) -> None:
        self.inner = inner
        self.alpha = alpha
        self.k = k
        self.slow: dict[str, np.ndarray] = {}
        self.counter = 0

    def _start(self, params: Mapping[str, np.ndarray]) -> None:
        for name, p in params.items():
            if name not in self.slow:
                self.slow[name] = np.array(p, dtype=np.float64, copy=True)

    def _advance(self, params: dict[str, np.ndarray]) -> None:
        self.counter += 1
        if self.counter % self.k == 0:
            for name in params:
                self.slow[name] = self.slow[name] + self.alpha * (params[name] - self.slow[name])
                params[name] = self.slow[name].copy()

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self._start(params)
        self.inner.step(params, grads)
        self._advance(params)

    def first_step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self._start(params)
        self.inner.first_step(params, grads)

    def second_step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.inner.second_step(params, grads)
        self._advance(params)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = dict(self.inner.state_dict())
        out["step_counter"] = np.array(self.counter, dtype=np.int64)
        out["alpha"] = np.array(self.alpha)
        out["k"] = np.array(self.k, dtype=np.int64)
        for name, s in self.slow.items():
            out["slow_" + name] = s.copy()
        return out


# ----------------------------------------------------------------------------- comparisons

PREFIXES = ("velocity_", "m_", "v_", "h_", "saved_", "slow_")
EXACT_FLOATS = ("lr", "rho", "alpha", "trust_coef")
EXACT_INTS = ("t", "k", "step_counter", "sam_calls", "steps_since_hessian_update")


def param_of(key: str, params: Mapping[str, np.ndarray]) -> str | None:
    for prefix in PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] in params:
            return key[len(prefix):]
    return None


def assert_state_matches(state: Mapping[str, np.ndarray], ref_state: Mapping[str, np.ndarray],
                         params: Mapping[str, np.ndarray], what: str, f64_tol: float,
                         scales: R.ScaleTracker) -> None:
    """The same keys (entries of size-0 parameters may be absent), scalars exactly equal
    with their dtypes, per-parameter arrays of the parameter's dtype and shape within the
    tolerance. `sam_calls`, which the reference does not count, must be 0."""
    for key in ref_state:
        if key not in state:
            name = param_of(key, params)
            assert name is not None and params[name].size == 0, f"{what}: missing {key!r}"
    for key, value in state.items():
        assert isinstance(value, np.ndarray), f"{what}: {key!r} is not an ndarray"
        if key == "sam_calls" and key not in ref_state:
            assert value.dtype == np.int64 and int(value) == 0, f"{what}: {key!r}"
            continue
        assert key in ref_state, f"{what}: unexpected state key {key!r}"
        ref = ref_state[key]
        if key in EXACT_FLOATS:
            assert value.shape == () and value.dtype == np.float64, f"{what}: {key!r}"
            assert float(value) == float(ref), f"{what}: {key!r} {float(value)} != {float(ref)}"
        elif key in EXACT_INTS:
            assert value.shape == () and value.dtype == np.int64, f"{what}: {key!r}"
            assert int(value) == int(ref), f"{what}: {key!r} {int(value)} != {int(ref)}"
        else:
            name = param_of(key, params)
            assert name is not None, f"{what}: {key!r} names no parameter"
            p = params[name]
            assert value.dtype == p.dtype and value.shape == p.shape, f"{what}: {key!r} layout"
            e = R.rel_err(value, ref, scales.get("state:" + key))
            assert e <= R.tol_for(p.dtype, f64_tol), f"{what}: state {key!r} rel err {e:.3g}"


def l2(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(np.asarray(x, dtype=np.float64) ** 2)))


def bias_names(name: str) -> bool:
    """LARS's bias rule, from its description: the last component of the name (after the
    last '.' or '/') is 'b' or 'bias' or ends in '_b' or '_bias'."""
    last = name.replace("/", ".").rsplit(".", 1)[-1]
    return last in ("b", "bias") or last.endswith(("_b", "_bias"))


def _hyper(defaults: Mapping[str, Any], groups: Mapping[str, Mapping[str, Any]],
           name: str) -> dict[str, Any]:
    return {**defaults, **groups.get(name, {})}


class RefLamb:
    """LAMB (You et al., ICLR 2020, Algorithm 2, φ = identity), clipping first (SPEC):
    t ← t+1 ; m ← b1·m + (1−b1)·g ; v ← b2·v + (1−b2)·g² ; m̂ = m/(1−b1^t) ;
    v̂ = v/(1−b2^t) ; r = m̂/(√v̂ + eps) + wd·p ; p ← p − lr·(‖p‖/‖r‖)·r per array, the
    ratio 1 when either norm is 0. `groups` maps a name to overrides of lr, beta1, beta2,
    eps, weight_decay."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 clip: float | None = None, clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.defaults = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self.lr = lr
        self.clip, self.clip_mode = clip, clip_mode
        self.groups = dict(groups or {})
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = R.clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        self.t += 1
        for name in params:
            h = _hyper(self.defaults, self.groups, name)
            p = params[name]
            m = self.m.get(name, np.zeros(p.shape))
            v = self.v.get(name, np.zeros(p.shape))
            m = h["beta1"] * m + (1 - h["beta1"]) * g[name]
            v = h["beta2"] * v + (1 - h["beta2"]) * g[name] ** 2
            m_hat = m / (1 - h["beta1"] ** self.t)
            v_hat = v / (1 - h["beta2"] ** self.t)
            r = m_hat / (np.sqrt(v_hat) + h["eps"]) + h["weight_decay"] * p
            p_norm, r_norm = l2(p), l2(r)
            trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
            params[name] = p - h["lr"] * trust * r
            self.m[name], self.v[name] = m, v

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr), "t": np.array(self.t, dtype=np.int64)}
        for name in self.m:
            out["m_" + name] = self.m[name].copy()
            out["v_" + name] = self.v[name].copy()
        return out


class RefLars:
    """LARS (You, Gitman & Ginsburg 2017, Algorithm 1), clipping first (SPEC): per array
    local_lr = lr·η·‖p‖/(‖g‖ + wd·‖p‖) (lr when either norm is 0 or the name is excluded) ;
    v ← μ·v + local_lr·(g + wd·p) ; p ← p − v. `groups` maps a name to overrides of lr,
    momentum, weight_decay."""

    def __init__(self, lr: float, momentum: float, weight_decay: float, trust_coef: float,
                 excluded: Any = None, clip: float | None = None, clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.lr = lr
        self.trust_coef = trust_coef
        self.excluded = excluded or (lambda name: False)
        self.clip, self.clip_mode = clip, clip_mode
        self.groups = dict(groups or {})
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = R.clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        for name in params:
            h = _hyper(self.defaults, self.groups, name)
            p = params[name]
            p_norm, g_norm = l2(p), l2(g[name])
            if self.excluded(name) or p_norm == 0 or g_norm == 0:
                local = h["lr"]
            else:
                local = h["lr"] * self.trust_coef * p_norm / (g_norm + h["weight_decay"] * p_norm)
            v = self.velocity.get(name, np.zeros(p.shape))
            v = h["momentum"] * v + local * (g[name] + h["weight_decay"] * p)
            params[name] = p - v
            self.velocity[name] = v

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr)}
        for name, v in self.velocity.items():
            out["velocity_" + name] = v.copy()
        return out


class RefSophia:
    """Sophia (Liu et al. 2023, Algorithm 3), clipping first (SPEC): t ← t+1 ;
    m ← b1·m + (1−b1)·g ; on a refreshing step (every `freq` steps since the last refresh
    or update_hessian) h ← b2·h + (1−b2)·g² ; p ← p − lr·wd·p − lr·clip(m/max(rho·h, eps),
    −1, 1). update_hessian(params, est): h ← b2·h + (1−b2)·est, and the count restarts.
    `groups` maps a name to overrides of lr, beta1, beta2, eps, weight_decay."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 rho: float, freq: int, clip: float | None = None, clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.defaults = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self.lr, self.rho, self.freq = lr, rho, freq
        self.clip, self.clip_mode = clip, clip_mode
        self.groups = dict(groups or {})
        self.t = self.since = 0
        self.m: dict[str, np.ndarray] = {}
        self.h: dict[str, np.ndarray] = {}

    def _state(self, name: str, shape: tuple[int, ...]) -> None:
        self.m.setdefault(name, np.zeros(shape))
        self.h.setdefault(name, np.zeros(shape))

    def update_hessian(self, params: Mapping[str, np.ndarray],
                       estimates: Mapping[str, np.ndarray]) -> None:
        for name, p in params.items():
            self._state(name, p.shape)
            b2 = _hyper(self.defaults, self.groups, name)["beta2"]
            self.h[name] = b2 * self.h[name] + (1 - b2) * np.asarray(estimates[name], np.float64)
        self.since = 0

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = R.clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        self.t += 1
        self.since += 1
        refresh = self.since >= self.freq
        for name, p in params.items():
            h = _hyper(self.defaults, self.groups, name)
            self._state(name, p.shape)
            self.m[name] = h["beta1"] * self.m[name] + (1 - h["beta1"]) * g[name]
            if refresh:
                self.h[name] = h["beta2"] * self.h[name] + (1 - h["beta2"]) * g[name] ** 2
            ratio = np.clip(self.m[name] / np.maximum(self.rho * self.h[name], h["eps"]), -1, 1)
            params[name] = p - h["lr"] * h["weight_decay"] * p - h["lr"] * ratio
        if refresh:
            self.since = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr), "t": np.array(self.t, dtype=np.int64),
               "steps_since_hessian_update": np.array(self.since, dtype=np.int64)}
        for name in self.m:
            out["m_" + name] = self.m[name].copy()
            out["h_" + name] = self.h[name].copy()
        return out
