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

PREFIXES = ("velocity_", "m_", "v_", "saved_", "slow_")
EXACT_FLOATS = ("lr", "rho", "alpha", "trust_coef")
EXACT_INTS = ("t", "k", "step_counter", "sam_calls")


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
