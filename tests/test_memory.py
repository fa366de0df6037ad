"""Memory (issue 5, point 5): long training loops do not leak.

- 100,000 SAM steps (first_step + second_step) on a small dict grow the resident set by
  under 5 MB after a warm-up (SAM over SGD and Adam, adaptive SAM, GSAM, and sam_step);
  so do 20,000 calls that raise, cycling through every error path;
- the reference counts of the caller's arrays (and dicts) are the same after steps and
  after every error path that can be triggered: samopt keeps no reference to them.
"""

from __future__ import annotations

import gc
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    GsamOptimizer,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
    compute_gradient_norm,
)

STEPS = 100_000
WARMUP = 5_000
BUDGET = 5 * 1024 * 1024  # bytes

CFG = OptimizerConfig(learning_rate=1e-3, grad_clip=1.0, grad_clip_mode=GradClipMode.NORM)


def rss() -> int:
    """Resident set size in bytes (/proc/self/statm), after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="needs /proc/self/statm (Linux)")


def small_dict(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.standard_normal((4, 3)),
        "b": rng.standard_normal(3).astype(np.float32),
        "s": np.array(0.5),
        "t": rng.standard_normal((5, 4))[::2, ::-1],  # staged (non-contiguous) path
    }
    grads = {k: np.asarray(rng.standard_normal(v.shape) * 0.1, dtype=v.dtype)
             for k, v in params.items()}
    grads["w"] = grads["w"].astype(np.float32)  # converted path
    return params, grads


def make_sam(kind: str) -> Any:
    if kind == "sam-sgd":
        return SamOptimizer(SgdOptimizer(CFG), 0.05)
    if kind == "sam-adam":
        return SamOptimizer(AdamOptimizer(CFG), 0.05)
    if kind == "asam-adamw":
        return SamOptimizer(AdamWOptimizer(CFG), 0.5, adaptive=True, eta=0.01)
    return GsamOptimizer(AdamOptimizer(CFG), 0.05, 0.01, 0.4)


# ----------------------------------------------------------------------------- RSS


@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adam", "asam-adamw", "gsam"])
def test_rss_flat_over_100k_sam_steps(kind: str) -> None:
    opt = make_sam(kind)
    params, grads = small_dict()
    g2 = {k: np.asarray(-v, dtype=v.dtype) for k, v in grads.items()}
    first, second = opt.first_step, opt.second_step
    for _ in range(WARMUP):
        first(params, grads)
        second(params, g2)
    before = rss()
    for _ in range(STEPS):
        first(params, grads)
        second(params, g2)
    grown = rss() - before
    assert grown < BUDGET, f"RSS grew by {grown / 2**20:.2f} MB over {STEPS} SAM steps"
    assert all(np.isfinite(v).all() for v in params.values())


def test_rss_flat_over_100k_sam_step_calls() -> None:
    """sam_step with a gradient function (and interval=2: SAM and plain calls)."""
    opt = SamOptimizer(AdamOptimizer(CFG), 0.05, interval=2)
    params, grads = small_dict()

    def grad_fn(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        return 0.0, grads

    for _ in range(WARMUP):
        opt.sam_step(params, grad_fn)
    before = rss()
    for _ in range(STEPS):
        opt.sam_step(params, grad_fn)
    grown = rss() - before
    assert grown < BUDGET, f"RSS grew by {grown / 2**20:.2f} MB over {STEPS} sam_step calls"


# ----------------------------------------------------------------------------- error paths
# Each builds its arguments from valid (params, grads) and makes `opt` raise. They return
# the call; every array involved is in params, grads or `extra` (checked for refcounts).


class Boom(Exception):
    pass


def _case(fn: Callable[..., Any]) -> Callable[..., Any]:
    ERROR_CASES[fn.__name__.lstrip("_")] = fn
    return fn


ERROR_CASES: dict[str, Callable[..., Any]] = {}


@_case
def _missing_grad(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = {k: v for k, v in g.items() if k != "b"}
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _shape(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, w=np.ones((3, 4)))
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _int_grad(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, b=np.ones(3, dtype=np.int64))
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _nan_grad(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, w=np.full((4, 3), np.nan))
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _float16_param(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(p, b=p["b"].astype(np.float16))
    extra.append(bad)
    return lambda: step_of(opt)(bad, g)


@_case
def _readonly_param(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    ro = p["w"].copy()
    ro.setflags(write=False)
    bad = dict(p, w=ro)
    extra.append(bad)
    return lambda: step_of(opt)(bad, g)


@_case
def _list_grad(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, b=[0.1, 0.2, 0.3])
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _same_array_twice(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad_p, bad_g = dict(p, alias=p["w"]), dict(g, alias=g["w"])
    extra += [bad_p, bad_g]
    return lambda: step_of(opt)(bad_p, bad_g)


@_case
def _own_gradient(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, w=p["w"])
    extra.append(bad)
    return lambda: step_of(opt)(p, bad)


@_case
def _params_not_mapping(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = list(p.values())
    extra.append(bad)
    return lambda: step_of(opt)(bad, g)


@_case
def _mapping_proxy_with_nan(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    proxy = types.MappingProxyType(p)  # copied into a dict inside samopt
    bad = dict(g, s=np.array(np.inf))
    extra += [bad]
    return lambda: step_of(opt)(proxy, bad)


@_case
def _first_step_twice(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    opt.first_step(p, g)
    return lambda: opt.first_step(p, g)


@_case
def _second_step_other_names(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    opt.first_step(p, g)
    sub = {k: p[k] for k in ("w", "b")}
    extra.append(sub)
    return lambda: opt.second_step(sub, g)


@_case
def _second_step_nan(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    opt.first_step(p, g)
    bad = dict(g, b=np.full(3, np.nan, np.float32))
    extra.append(bad)
    return lambda: opt.second_step(p, bad)


@_case
def _restore_other_names(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    opt.first_step(p, g)
    sub = {"w": p["w"]}
    extra.append(sub)
    return lambda: opt.restore(sub)


@_case
def _sam_step_grad_fn_raises(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    calls = []

    def grad_fn(params: dict[str, np.ndarray]) -> Any:
        calls.append(params)  # keeps a reference while sam_step runs, released after
        if len(calls) > 1:
            del calls[:]
            raise Boom("at the perturbed point")
        return 0.0, g

    return lambda: opt.sam_step(p, grad_fn)


@_case
def _sam_step_nan_at_second_point(opt: Any, p: dict, g: dict, extra: list
                                  ) -> Callable[[], Any]:
    bad = dict(g, s=np.array(np.nan))
    extra.append(bad)
    seq = [0]

    def grad_fn(params: dict[str, np.ndarray]) -> Any:
        seq[0] += 1
        return 0.0, (g if seq[0] == 1 else bad)

    def call() -> None:
        seq[0] = 0
        opt.sam_step(p, grad_fn)

    return call


@_case
def _grad_fn_bad_return(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    return lambda: opt.sam_step(p, lambda params: [0.0, g])


@_case
def _bad_state_dict(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    state = opt.state_dict()
    state["rho"] = np.array(-1.0)
    state["velocity_w"] = np.full((4, 3), np.nan)
    extra += list(state.values())
    return lambda: opt.load_state_dict(state)


@_case
def _norm_of_bad_grads(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    bad = dict(g, b=np.ones(3, dtype=complex))
    extra.append(bad)
    return lambda: compute_gradient_norm(bad)


@_case
def _set_lr_nan(opt: Any, p: dict, g: dict, extra: list) -> Callable[[], Any]:
    return lambda: opt.set_lr(float("nan"))


def step_of(opt: Any) -> Callable[..., Any]:
    return opt.first_step if isinstance(opt, SamOptimizer) else opt.step


def _arrays_in(obj: Any) -> list[Any]:
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [obj, *(a for v in obj.values() for a in _arrays_in(v))]
    if isinstance(obj, list):
        return [a for v in obj for a in _arrays_in(v)]
    return []


def _refcounts(objects: list[Any]) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


SAM_ONLY = {"first_step_twice", "second_step_other_names", "second_step_nan",
            "restore_other_names", "sam_step_grad_fn_raises", "sam_step_nan_at_second_point",
            "grad_fn_bad_return"}


@pytest.mark.parametrize("kind,case", [
    (kind, case) for kind in ("sam-sgd", "gsam", "adam") for case in ERROR_CASES
    if kind != "adam" or case not in SAM_ONLY])
def test_refcounts_unchanged_after_errors(kind: str, case: str) -> None:
    opt = AdamOptimizer(CFG) if kind == "adam" else make_sam(kind)
    params, grads = small_dict()
    step_of(opt)(params, grads)  # state exists
    if isinstance(opt, SamOptimizer):
        opt.second_step(params, grads)
    extra: list[Any] = []
    call = ERROR_CASES[case](opt, params, grads, extra)
    watched = _arrays_in(params) + _arrays_in(grads) + _arrays_in(extra)
    before = _refcounts(watched)
    for _ in range(3):
        try:
            call()
        except (TrainError, Boom):
            pass
        except BaseException as e:
            pytest.fail(f"{case}: {type(e).__module__}.{type(e).__name__}: {e}")
        else:
            pytest.fail(f"{case}: nothing raised")
    after = _refcounts(watched)
    leaks = [(i, b, a) for i, (b, a) in enumerate(zip(before, after)) if a != b]
    assert not leaks, f"{case}: reference counts changed (index, before, after): {leaks}"


@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adam", "asam-adamw", "gsam", "sgd",
                                  "adamw"])
def test_refcounts_unchanged_after_steps(kind: str) -> None:
    opt = {"sgd": lambda: SgdOptimizer(CFG), "adamw": lambda: AdamWOptimizer(CFG)}.get(
        kind, lambda: make_sam(kind))()
    params, grads = small_dict()
    proxy = types.MappingProxyType(grads)
    watched = _arrays_in(params) + _arrays_in(grads)
    before = _refcounts(watched)
    for _ in range(50):
        if isinstance(opt, SamOptimizer):
            opt.first_step(params, proxy)
            opt.second_step(params, grads)
            opt.first_step(params, grads)
            opt.restore(params)
            opt.sam_step(params, lambda p: (0.0, grads))
        else:
            opt.step(params, proxy)
        compute_gradient_norm(grads)
        opt.load_state_dict(opt.state_dict())
    after = _refcounts(watched)
    leaks = [(i, b, a) for i, (b, a) in enumerate(zip(before, after)) if a != b]
    assert not leaks, f"reference counts changed (index, before, after): {leaks}"


def test_rss_flat_over_20k_errors() -> None:
    """Every error path, over and over: raising allocates nothing that stays."""
    cases = list(ERROR_CASES)
    opt = make_sam("sam-adam")
    params, grads = small_dict()

    def one_round() -> None:
        for case in cases:
            if opt.pending:
                opt.restore(params)
            extra: list[Any] = []
            call = ERROR_CASES[case](opt, params, grads, extra)
            try:
                call()
            except (TrainError, Boom):
                pass
        if opt.pending:
            opt.restore(params)

    rounds = 20_000 // len(cases)
    for _ in range(rounds // 10):
        one_round()
    before = rss()
    for _ in range(rounds):
        one_round()
    grown = rss() - before
    assert grown < BUDGET, f"RSS grew by {grown / 2**20:.2f} MB over {rounds} rounds of errors"
