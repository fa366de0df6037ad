"""Bitwise determinism: whatever RAYON_NUM_THREADS (read at process start: tested in
subprocesses), over separate arrays and over a flat_params arena, and whatever the
insertion order of the params and grads dicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    compute_gradient_norm,
)

SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import samopt
from samopt import (AdamOptimizer, AdamWOptimizer, GradClipMode, OptimizerConfig,
                    SamOptimizer, SgdOptimizer, compute_gradient_norm)

rng = np.random.default_rng(2024)
specs = []
for i in range(20):
    n = int(rng.integers(1, 300_000)) if i % 4 else int(rng.integers(1, 50))
    specs.append((f"p{i:02d}", n, [np.float32, np.float64][i % 2], i % 3))
def make_params():
    r = np.random.default_rng(7)
    out = {}
    for name, n, dt, layout in specs:
        v = r.standard_normal(n)
        if layout == 1 and n % 2 == 0:
            a = np.asfortranarray(v.astype(dt).reshape(2, -1))
        elif layout == 2:
            big = np.zeros(2 * n, dt)
            a = big[::2]
            a[...] = v
        else:
            a = v.astype(dt)
        out[name] = a
    return out
def make_grads(params, seed):
    r = np.random.default_rng(seed)
    gd = [np.float16, np.float32, np.float64]
    return {k: (r.standard_normal(p.shape) * 3).astype(gd[j % 3])
            for j, (k, p) in enumerate(params.items())}
def digest(params, opt):
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode()); h.update(np.ascontiguousarray(params[k]).tobytes())
    sd = opt.state_dict()
    for k in sorted(sd):
        h.update(k.encode()); h.update(np.ascontiguousarray(sd[k]).tobytes())
    return h.hexdigest()
def cfg(mode):
    return OptimizerConfig(learning_rate=0.01, grad_clip=50.0,
                           grad_clip_mode=GradClipMode.NORM if mode == "norm"
                           else GradClipMode.VALUE)
makers = {
    "sgd_norm": lambda: SgdOptimizer(cfg("norm")),
    "adam_value": lambda: AdamOptimizer(cfg("value")),
    "adamw_norm": lambda: AdamWOptimizer(cfg("norm")),
    "sam_adam": lambda: SamOptimizer(AdamOptimizer(cfg("norm")), 0.05),
    "asam_sgd": lambda: SamOptimizer(SgdOptimizer(cfg("norm")), 0.5, adaptive=True),
    "asam_adamw_eta": lambda: SamOptimizer(AdamWOptimizer(cfg("value")), 0.5,
                                           adaptive=True, eta=0.01),
}
out = {"threads_env": __import__("os").environ.get("RAYON_NUM_THREADS")}
start = make_params()
out["start"] = digest(start, SgdOptimizer())
for name, mk in makers.items():
    params = make_params()
    opt = mk()
    for s in range(3):
        if isinstance(opt, SamOptimizer):
            opt.first_step(params, make_grads(params, 100 + s))
            if s == 2:
                out[name + "_perturbed"] = digest(params, opt)
        opt.step(params, make_grads(params, 200 + s))
    out[name] = digest(params, opt)
# An arena big enough to be split between threads, its arrays of many sizes.
sizes = np.random.default_rng(3).integers(1, 20_000, 200)
shapes = {f"f{i:03d}": (int(n),) for i, n in enumerate(sizes)}
def make_flat():
    params = samopt.flat_params(shapes)
    params.flat[...] = np.random.default_rng(8).standard_normal(params.flat.size)
    return params
out["flat_start"] = digest(make_flat(), SgdOptimizer())
for name in ("sam_adam", "asam_sgd"):
    params = make_flat()
    grads = params.zeros_like()
    opt = makers[name]()
    for s in range(3):
        grads.flat[...] = np.random.default_rng(300 + s).standard_normal(grads.flat.size) * 3
        opt.first_step(params, grads)
        opt.step(params, grads)
    assert opt._flat is not None, "the arena was stepped array by array"
    out["flat_" + name] = digest(params, opt)
g = make_grads(make_params(), 5)
g["huge"] = np.full(1000, 1e200)
g["tiny"] = np.full(1000, 1e-200, np.float64)
out["norm"] = compute_gradient_norm(g).hex()
out["norm32"] = compute_gradient_norm({k: v.astype(np.float32)
                                       for k, v in make_grads(make_params(), 6).items()}).hex()
print(json.dumps(out))
"""


def _run(threads: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = threads
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("threads_env") == threads
    return out


def test_bitwise_identical_across_thread_counts() -> None:
    runs = {t: _run(t) for t in ("1", "2", "3")}
    one = runs["1"]
    # sanity: every optimizer moved the parameters
    for k, v in one.items():
        if k not in ("start", "flat_start", "norm", "norm32"):
            assert v != one["flat_start" if k.startswith("flat_") else "start"], k
    for t, r in runs.items():
        diff = sorted(k for k in one if r[k] != one[k])
        assert not diff, f"RAYON_NUM_THREADS={t} differs from 1 on {diff}"


# ----------------------------------------------------------------------------- dict order


def _makers() -> dict[str, Any]:
    def cfg(mode: str) -> OptimizerConfig:
        return OptimizerConfig(learning_rate=0.02, grad_clip=10.0,
                               grad_clip_mode=GradClipMode.NORM if mode == "norm"
                               else GradClipMode.VALUE)
    return {
        "sgd": lambda: SgdOptimizer(cfg("norm")),
        "adam": lambda: AdamOptimizer(cfg("norm")),
        "adamw": lambda: AdamWOptimizer(cfg("value")),
        "sam": lambda: SamOptimizer(AdamWOptimizer(cfg("norm")), 0.05),
        "asam": lambda: SamOptimizer(SgdOptimizer(cfg("norm")), 0.3, adaptive=True,
                                     eta=0.01),
    }


NAMES = [f"layer{i}.{w}" for i in range(4) for w in ("w", "b")]


def _params(order: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    vals = {}
    for i, k in enumerate(NAMES):
        n = int(rng.integers(1, 150_000))
        vals[k] = R.make_array(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3),
                               [np.float32, np.float64][i % 2],
                               ["C", "strided", "reversed"][i % 3]).array
    return {k: vals[k] for k in order}


def _grads(params: dict[str, np.ndarray], order: list[str], seed: int
           ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = {k: (rng.standard_normal(params[k].shape) * 5).astype(
        [np.float16, np.float32, np.float64][i % 3]) for i, k in enumerate(NAMES)}
    return {k: g[k] for k in order}


@pytest.mark.parametrize("kind", list(_makers()))
def test_bitwise_identical_for_any_insertion_order(kind: str) -> None:
    rng = np.random.default_rng(0)
    orders = [NAMES, NAMES[::-1], list(rng.permutation(NAMES)), list(rng.permutation(NAMES))]
    results = []
    for i, order in enumerate(orders):
        gorder = orders[(i + 1) % len(orders)]  # grads in yet another order
        params = _params(order)
        opt = _makers()[kind]()
        for s in range(3):
            if isinstance(opt, SamOptimizer):
                opt.first_step(params, _grads(params, gorder, 10 + s))
            opt.step(params, _grads(params, gorder, 20 + s))
        results.append(({k: params[k].tobytes() for k in NAMES},
                        R.state_snapshot(opt.state_dict())))
    for p, s in results[1:]:
        for k in NAMES:
            assert p[k] == results[0][0][k], f"{k!r} depends on insertion order"
        assert s == results[0][1], "state depends on insertion order"


def test_gradient_norm_insertion_order_large() -> None:
    params = _params(NAMES)
    g = _grads(params, NAMES, 1)
    r = compute_gradient_norm(g)
    for order in (NAMES[::-1], sorted(NAMES, key=lambda k: k[::-1])):
        assert compute_gradient_norm({k: g[k] for k in order}) == r


@pytest.mark.parametrize("kind", list(_makers()))
def test_one_optimizer_given_its_names_in_changing_orders(kind: str) -> None:
    """An optimizer remembers the sorted order of the last names it saw (a cache keyed on
    the key objects and their dict order): reordering the dict, rebuilding it with equal
    but new key objects, or dropping and re-adding a name between steps must not change a
    bit against a run that always passes the same dict."""
    rng = np.random.default_rng(3)
    steady_params, moved_params = _params(NAMES), _params(NAMES)
    steady, moved = _makers()[kind](), _makers()[kind]()
    sam = isinstance(steady, SamOptimizer)
    for s in range(6):
        if s % 3 == 0:
            order = list(rng.permutation(NAMES))
        elif s % 3 == 1:
            order = ["".join(list(k)) for k in NAMES[::-1]]  # equal str, new objects
        else:
            order = list(NAMES)
        view = {k: moved_params[k] for k in order}
        if s == 4:
            del view[order[0]]  # one parameter sits this step out, in both runs
        steady_view = {k: steady_params[k] for k in NAMES if k in view}
        first, second = _grads(steady_params, NAMES, 10 + s), _grads(steady_params, NAMES, 20 + s)
        for opt, p in ((steady, steady_view), (moved, view)):
            if sam:
                opt.first_step(p, {k: first[k] for k in p})
            opt.step(p, {k: second[k] for k in p})
    for k in NAMES:
        assert moved_params[k].tobytes() == steady_params[k].tobytes(), k
    assert R.state_snapshot(moved.state_dict()) == R.state_snapshot(steady.state_dict())
