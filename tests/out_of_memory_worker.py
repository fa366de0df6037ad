"""Subprocess worker of tests/test_out_of_memory.py (issue 12): one samopt call whose one
large allocation cannot be satisfied under RLIMIT_AS.

Usage: python out_of_memory_worker.py <site>

Everything lazily initialised is started first (numpy, samopt, one tiny call of every
optimizer so that samopt's worker threads and their allocator arenas exist). Then the site
builds its arrays and optimizer, the soft RLIMIT_AS is lowered to the current virtual size
plus a margin smaller than the allocation under test (but ample for the call's bookkeeping),
the call is made, the limit is raised back, and the worker reports on stdout, as one JSON
object: what was raised (type, MRO, message, key), whether params, grads, state_dict() and
pending are bitwise unchanged, whether the exception survives pickling, and whether the
same call then succeeds and gives bitwise the result of a twin that never hit the limit.
A Rust abort kills the worker (the test sees the return code).
"""

from __future__ import annotations

import gc
import json
import pickle
import resource
import sys
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import samopt

NAME = "layer.w"
N = 25_000_000  # float64 elements: 200 MB per array
NBYTES = N * 8
# Room left under the limit: ample for a call's bookkeeping (and an allocator arena or two),
# well short of the 200 MB allocation under test.
MARGIN = NBYTES * 3 // 4


def warm_up() -> None:
    """One tiny call of everything, over every code path (contiguous, strided, converted)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(8)

    def small() -> dict[str, np.ndarray]:
        return {"a": rng.standard_normal((3, 2)), "b": base.copy()[::2],
                "c": rng.standard_normal(3).astype(np.float32), "d": np.array(0.5)}

    def grads(p: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.full(v.shape, 0.1, v.dtype) for k, v in p.items()}
        out["a"] = out["a"].astype(np.float32)  # converted
        out["c"] = out["c"].astype(np.float16)
        return out

    for make in (samopt.SgdOptimizer, samopt.AdamOptimizer, samopt.AdamWOptimizer):
        p = small()
        make().step(p, grads(p))
        p = small()
        sam = samopt.SamOptimizer(make(), 0.05)
        sam.first_step(p, grads(p))
        sam.second_step(p, grads(p))
        sam.sam_step(p, lambda q: (0.0, grads(q)))
        asam = samopt.SamOptimizer(make(), 0.05, adaptive=True, eta=0.01)
        asam.first_step(p, grads(p))
        asam.second_step(p, grads(p))
        gsam = samopt.GsamOptimizer(make(), 0.05)
        gsam.first_step(p, grads(p))
        gsam.second_step(p, grads(p))
        gsam.state_dict()
    samopt.compute_gradient_norm(grads(small()))


# ----------------------------------------------------------------------------- sites
# Each returns (make the optimizer at its starting point, params, grads, call, margin,
# accepted keys, accepted byte counts). `make` is also used to build the twin.


def contiguous(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N)


def site_sam_saved() -> Any:
    params = {NAME: contiguous(1)}
    grads = {NAME: contiguous(2)}

    def make() -> Any:
        return samopt.SamOptimizer(samopt.SgdOptimizer(), 0.05)

    return (make, params, grads, lambda o, p, g: o.first_step(p, g), MARGIN,
            {NAME, "saved_" + NAME}, {NBYTES})


def site_sgd_velocity() -> Any:
    params = {NAME: contiguous(1)}
    grads = {NAME: contiguous(2)}
    return (samopt.SgdOptimizer, params, grads, lambda o, p, g: o.step(p, g), MARGIN,
            {NAME, "velocity_" + NAME}, {NBYTES})


def site_adam_moments(margin: int) -> Callable[[], Any]:
    def site() -> Any:
        params = {NAME: contiguous(1)}
        grads = {NAME: contiguous(2)}
        return (samopt.AdamOptimizer, params, grads, lambda o, p, g: o.step(p, g), margin,
                {NAME, "m_" + NAME, "v_" + NAME}, {NBYTES, 2 * NBYTES})
    return site


def warmed(make: Callable[[], Any], params: Mapping[str, np.ndarray],
           grads: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    """`make` with its state already created (one step on same-shape copies)."""
    def build() -> Any:
        opt = make()
        opt.step({k: np.zeros_like(v) for k, v in params.items()},
                 {k: np.zeros(v.shape, v.dtype) for k, v in params.items()})
        return opt
    return build


def site_strided_param() -> Any:
    backing = np.random.default_rng(1).standard_normal(2 * N)
    params = {NAME: backing[::2]}  # staged: a contiguous copy of N float64
    grads = {NAME: contiguous(2)}
    return (warmed(samopt.SgdOptimizer, params, grads), params, grads,
            lambda o, p, g: o.step(p, g), MARGIN, {NAME}, {NBYTES})


def site_converted_grad() -> Any:
    params = {NAME: contiguous(1)}
    grads = {NAME: contiguous(2).astype(np.float32)}  # converted to N float64
    return (warmed(samopt.SgdOptimizer, params, grads), params, grads,
            lambda o, p, g: o.step(p, g), MARGIN, {NAME}, {NBYTES})


SITES: dict[str, Callable[[], Any]] = {
    "sam-saved": site_sam_saved,
    "sgd-velocity": site_sgd_velocity,
    "adam-moments": site_adam_moments(MARGIN),
    # room for one moment, not for both: the first allocation succeeds, the second fails
    "adam-second-moment": site_adam_moments(NBYTES + MARGIN),
    "strided-param": site_strided_param,
    "converted-grad": site_converted_grad,
}


# ----------------------------------------------------------------------------- checks


def virtual_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def same_dict(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)


def describe(e: BaseException | None) -> dict[str, Any]:
    if e is None:
        return {"type": None}
    oom = getattr(samopt, "OutOfMemoryError", None)
    return {
        "type": f"{type(e).__module__}.{type(e).__qualname__}",
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__],
        "message": str(e)[:1000],
        "key": getattr(e, "key", "<no .key>"),
        "is_out_of_memory_error": isinstance(oom, type) and isinstance(e, oom),
        "is_train_error": isinstance(e, samopt.TrainError),
        "is_memory_error": isinstance(e, MemoryError),
        "has_out_of_memory_error": isinstance(oom, type),
        "oom_subclasses": isinstance(oom, type) and issubclass(oom, samopt.TrainError)
        and issubclass(oom, MemoryError),
    }


def main() -> int:
    site = sys.argv[1]
    warm_up()
    make, params, grads, call, margin, keys, nbytes = SITES[site]()
    opt = make()
    ids = {k: id(v) for k, v in params.items()}
    params_before = {k: v.copy() for k, v in params.items()}
    grads_before = {k: v.copy() for k, v in grads.items()}
    state_before = opt.state_dict()
    pending_before = getattr(opt, "pending", None)
    gc.collect()

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = virtual_size() + margin
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    error: BaseException | None = None
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        call(opt, params, grads)
    except BaseException as e:  # a PanicException is no Exception
        error = e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    report: dict[str, Any] = {"site": site, "margin": margin, "keys": sorted(keys),
                              "nbytes": sorted(nbytes), "error": describe(error)}
    report["params_unchanged"] = (same_dict(params, params_before)
                                  and {k: id(v) for k, v in params.items()} == ids)
    report["grads_unchanged"] = same_dict(grads, grads_before)
    report["state_unchanged"] = same_dict(opt.state_dict(), state_before)
    report["pending_unchanged"] = getattr(opt, "pending", None) == pending_before
    if error is not None:
        try:
            again = pickle.loads(pickle.dumps(error))
            report["pickle"] = {"type": type(again) is type(error),
                                "message": str(again) == str(error),
                                "key": getattr(again, "key", None) == getattr(error, "key", None)}
        except BaseException as e:
            report["pickle"] = {"failed": f"{type(e).__name__}: {e}"}

    # with the limit raised, the same call succeeds and equals a twin's uninterrupted call
    try:
        call(opt, params, grads)
        twin = make()
        twin_params = {k: np.array(v, copy=True) for k, v in params_before.items()}
        call(twin, twin_params, grads_before)
        report["retry"] = {
            "ok": True,
            "params_match": same_dict(params, twin_params),
            "state_match": same_dict(opt.state_dict(), twin.state_dict()),
            "pending_match": getattr(opt, "pending", None) == getattr(twin, "pending", None),
        }
    except BaseException as e:
        report["retry"] = {"ok": False, "error": f"{type(e).__module__}.{type(e).__name__}: {e}"}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
