#!/usr/bin/env python
"""Benchmark of one optimizer step: samopt against NumPy and the memory-bandwidth floor.

Usage (from the repository root, with the venv's python):

    python benches/bench_step.py                 # full run (~2 min): table + benches/results.json
    python benches/bench_step.py --quick         # seconds-long smoke (small sizes, few reps);
                                                 # writes benches/results_quick.json
    python benches/bench_step.py --json out.json # choose where the figures go
    python benches/bench_step.py --check         # only check that the NumPy baseline and samopt
                                                 # compute the same thing (exit 1 if not)
    python benches/bench_step.py --elementwise   # issue 17's optimizers at 10M f64 (~1 min):
                                                 # each against its floor, NumPy RMSprop/Lion

Every row is measured in the same run, as the median of several repetitions after a warm-up.
One subprocess per RAYON_NUM_THREADS setting (rayon reads the variable when the process
starts) times, for each size, all of these rows interleaved rep by rep (so a change in the
machine's load hits every row alike); speedups compare rows measured in the same process:

* NumPy baseline: the SAM(Adam) step a careful NumPy user would write (in-place ufuncs with
  ``out=``, one preallocated scratch buffer, one Python loop over the arrays per phase, the
  restore fused into the final ``p = saved - update``).  Extra rows: the same step walked in
  cache-sized blocks, NumPy Adam alone and NumPy SAM(SGD).
* samopt: SAM(Adam) full step (first_step + second_step), SAM(SGD) full step, Adam alone.
* torch.optim.Adam(fused=True) (foreach if fused is unsupported) when torch is importable.

Also measured, in the parent process or fresh subprocesses:

* Floor: the memory bandwidth measured at the start and at the end of the run with all cores
  busy (each thread streams ``np.add(a, b, out=a)`` over its share of two 512 MiB arrays: 3
  streams; the better of the two is used), times the bytes a step must move: Adam 7 streams
  of the parameter bytes (read p g m v, write p m v), SAM(Adam) 12 (norm 1, perturb-and-save
  4, restore fused into Adam 7), SAM(SGD) 10 (norm 1, perturb-and-save 4, restore fused into
  SGD 5: read saved g v, write p v).
* Peak RSS over a few steps after a warm-up step, in a fresh subprocess per optimizer and
  layout (20 arrays, and 1 array so a per-array temporary shows as a whole 1x), with VmHWM
  reset through /proc/self/clear_refs around each phase and MALLOC_MMAP_THRESHOLD_ fixed so
  freed buffers leave RSS (ru_maxrss before/after is recorded too).
* Check: before timing, the NumPy baseline and samopt are run from the same values for each
  size and optimizer and compared after first_step, after second_step and after 3 full steps
  (relative error max|x-ref|/max|ref| per array, SPEC.md tolerances); the sha256 of samopt's
  results is compared across the thread settings (bitwise determinism).

* Machine state: "effective cores" (threads doing compute-bound NumPy work in parallel against
  one alone) at the start and end, and per row the process CPU time / wall time: a run during
  which another process held a core is flagged, its multi-thread figures mean little.

Many arrays (``--sweep``, issue 16): the cost per array of a whole SAM(Adam) step (first_step
+ second_step, float64) against the number of arrays — 1 to 100,000 arrays holding 200,000
elements in all, and 20-element arrays from 100 to 100,000 — separate arrays ("samopt"), the
same arrays as a ``samopt.flat_params`` arena ("samopt flat") and torch's fused Adam with
foreach SAM ops where torch is installed; and 1,000,000 tiny arrays in a fresh process,
separate and as an arena: step time, peak RSS beyond the arrays and their state, state_dict
and load_state_dict times, and the first steps after the load. ``--compare PYTHON`` runs
the same workers under another interpreter (another build of samopt) alternately with this
one, so both see the same minutes of the machine; ``--plot PATH`` draws µs per array
against the array count (needs matplotlib).

Nothing here asserts on the figures (the CI smoke only prints them).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# OptimizerConfig defaults (SPEC.md) and SAM's default rho.
LR = 1e-3
MOMENTUM = 0.9
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8
RHO = 0.05

KINDS = ("sam_adam", "sam_sgd", "adam")
KIND_LABEL = {"sam_adam": "SAM(Adam)", "sam_sgd": "SAM(SGD)", "adam": "Adam"}
# Bytes a step must move, in units of the parameters' bytes (issue 3).
STREAMS = {"sam_adam": 12, "adam": 7, "sam_sgd": 10}
# Per-parameter memory SPEC.md allows: the optimizer state (+ SAM's saved values).
STATE_ARRAYS = {"sam_adam": 2, "adam": 2, "sam_sgd": 1}
SAVED_ARRAYS = {"sam_adam": 1, "adam": 0, "sam_sgd": 1}

TOL = {"float64": 1e-12, "float32": 2e-5}  # SPEC.md "Numerics"


# --------------------------------------------------------------------------------------------
# Sizes and data
# --------------------------------------------------------------------------------------------
def size_specs(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {
                "key": "200k_f64",
                "label": "200k f64 (20x10k)",
                "n_arrays": 20,
                "elems": 10_000,
                "dtype": "float64",
            },
            {
                "key": "200k_f32",
                "label": "200k f32 (20x10k)",
                "n_arrays": 20,
                "elems": 10_000,
                "dtype": "float32",
            },
            {
                "key": "200x1k_f64",
                "label": "200x1k f64",
                "n_arrays": 200,
                "elems": 1_000,
                "dtype": "float64",
            },
            {
                "key": "1x10_f64",
                "label": "1x10 f64",
                "n_arrays": 1,
                "elems": 10,
                "dtype": "float64",
            },
        ]
    return [
        {
            "key": "10M_f64",
            "label": "10M f64 (20x500k)",
            "n_arrays": 20,
            "elems": 500_000,
            "dtype": "float64",
        },
        {
            "key": "10M_f32",
            "label": "10M f32 (20x500k)",
            "n_arrays": 20,
            "elems": 500_000,
            "dtype": "float32",
        },
        {
            "key": "200x1k_f64",
            "label": "200x1k f64",
            "n_arrays": 200,
            "elems": 1_000,
            "dtype": "float64",
        },
        {"key": "1x10_f64", "label": "1x10 f64", "n_arrays": 1, "elems": 10, "dtype": "float64"},
    ]


def param_bytes(spec: dict[str, Any]) -> int:
    return int(spec["n_arrays"] * spec["elems"] * np.dtype(spec["dtype"]).itemsize)


def dram_bound(spec: dict[str, Any]) -> bool:
    """Whether even the smallest working set of this size's rows exceeds twice the L3: the
    rows whose floor is DRAM bandwidth."""
    smallest = min(2 + STATE_ARRAYS[k] + SAVED_ARRAYS[k] for k in KINDS)
    return smallest * param_bytes(spec) >= 2 * l3_bytes()


def make_data(
    spec: dict[str, Any], seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters ~ N(0, 1), gradients ~ N(0, 0.01^2); no temporaries larger than one array."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(spec["dtype"])
    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    for i in range(spec["n_arrays"]):
        name = f"w{i:03d}"
        p = np.empty(spec["elems"], dtype=dt)
        rng.standard_normal(dtype=dt, out=p)
        g = np.empty(spec["elems"], dtype=dt)
        rng.standard_normal(dtype=dt, out=g)
        g *= 0.01
        params[name] = p
        grads[name] = g
    return params, grads


def copy_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# The NumPy baseline (what a careful NumPy user writes)
# --------------------------------------------------------------------------------------------
class NumpyOpt:
    """SAM over Adam/SGD, or the base optimizer alone, written with in-place ufuncs.

    State (m, v / velocity, saved values) and one flat scratch buffer (the size of the largest
    parameter) are preallocated; every ufunc writes through ``out=``.  Formulas: SPEC.md.
    The restore of SAM's saved values is fused into the last ufunc (``p = saved - update``).
    """

    def __init__(self, params: dict[str, np.ndarray], base: str, sam: bool) -> None:
        self.base = base  # "adam" | "sgd"
        self.sam = sam
        self.t = 0
        self.pending = False
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.saved: dict[str, np.ndarray] = {}
        self.s: dict[str, np.ndarray] = {}
        biggest: dict[np.dtype, int] = {}
        for p in params.values():
            biggest[p.dtype] = max(biggest.get(p.dtype, 0), p.size)
        scratch = {dt: np.empty(n, dtype=dt) for dt, n in biggest.items()}
        for name, p in params.items():
            self.s[name] = scratch[p.dtype][: p.size].reshape(p.shape)
            self.v[name] = np.zeros_like(p)
            if base == "adam":
                self.m[name] = np.zeros_like(p)
            if sam:
                self.saved[name] = np.empty_like(p)

    # SAM phase 1: n = ||g||, save p, p += rho * g / n
    def first_step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        ss = 0.0
        for name in params:
            g = grads[name]
            ss += float(np.vdot(g, g))
        n = math.sqrt(ss)
        if n == 0.0:
            self.pending = False
            return
        scale = RHO / n
        saved, s = self.saved, self.s
        for name, p in params.items():
            np.copyto(saved[name], p)
            np.multiply(grads[name], scale, out=s[name])
            np.add(p, s[name], out=p)
        self.pending = True

    # SAM phase 2 (restore fused into the update) / the base optimizer's step
    def second_step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        pending = self.pending
        self.pending = False
        if self.base == "adam":
            self.t += 1
            lr_t = LR * math.sqrt(1.0 - BETA2**self.t) / (1.0 - BETA1**self.t)
            c1, c2 = 1.0 - BETA1, 1.0 - BETA2
            for name, p in params.items():
                g, m, v, s = grads[name], self.m[name], self.v[name], self.s[name]
                np.multiply(m, BETA1, out=m)
                np.multiply(g, c1, out=s)
                np.add(m, s, out=m)
                np.multiply(v, BETA2, out=v)
                np.multiply(g, g, out=s)
                np.multiply(s, c2, out=s)
                np.add(v, s, out=v)
                np.sqrt(v, out=s)
                np.add(s, EPS, out=s)
                np.divide(m, s, out=s)
                np.multiply(s, lr_t, out=s)
                np.subtract(self.saved[name] if pending else p, s, out=p)
        else:
            for name, p in params.items():
                g, v, s = grads[name], self.v[name], self.s[name]
                np.multiply(v, MOMENTUM, out=v)
                np.multiply(g, LR, out=s)
                np.add(v, s, out=v)
                np.subtract(self.saved[name] if pending else p, v, out=p)

    step = second_step


class NumpyOptBlocked(NumpyOpt):
    """The same SAM(Adam) step, but walking each array in cache-sized blocks (extra row).

    Each block's ufunc chain then runs on cache-resident data, so memory traffic drops to
    about one pass per stream, at the price of more Python calls.  Block views are built once.
    """

    BLOCK_BYTES = 128 * 1024  # per stream; ~6 streams per block stay in a 1 MiB L2

    def __init__(self, params: dict[str, np.ndarray], base: str, sam: bool) -> None:
        assert base == "adam"
        super().__init__(params, base, sam)
        scratch = {
            dt: np.empty(self.BLOCK_BYTES // dt.itemsize, dtype=dt)
            for dt in {p.dtype for p in params.values()}
        }
        self.blocks: dict[str, list[tuple[Any, ...]]] = {}
        for name, p in params.items():
            sc = scratch[p.dtype]
            blk = sc.size
            pf, mf, vf = p.reshape(-1), self.m[name].reshape(-1), self.v[name].reshape(-1)
            sf = self.saved[name].reshape(-1) if sam else pf
            lst = []
            for a in range(0, p.size, blk):
                b = min(a + blk, p.size)
                lst.append((a, b, pf[a:b], mf[a:b], vf[a:b], sf[a:b], sc[: b - a]))
            self.blocks[name] = lst

    def first_step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        ss = 0.0
        for name in params:
            g = grads[name]
            ss += float(np.vdot(g, g))
        n = math.sqrt(ss)
        if n == 0.0:
            self.pending = False
            return
        scale = RHO / n
        for name in params:
            gf = grads[name].reshape(-1)
            for a, b, p, _m, _v, sv, s in self.blocks[name]:
                np.copyto(sv, p)
                np.multiply(gf[a:b], scale, out=s)
                np.add(p, s, out=p)
        self.pending = True

    def second_step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        pending = self.pending
        self.pending = False
        self.t += 1
        lr_t = LR * math.sqrt(1.0 - BETA2**self.t) / (1.0 - BETA1**self.t)
        c1, c2 = 1.0 - BETA1, 1.0 - BETA2
        for name in params:
            gf = grads[name].reshape(-1)
            for a, b, p, m, v, sv, s in self.blocks[name]:
                g = gf[a:b]
                np.multiply(m, BETA1, out=m)
                np.multiply(g, c1, out=s)
                np.add(m, s, out=m)
                np.multiply(v, BETA2, out=v)
                np.multiply(g, g, out=s)
                np.multiply(s, c2, out=s)
                np.add(v, s, out=v)
                np.sqrt(v, out=s)
                np.add(s, EPS, out=s)
                np.divide(m, s, out=s)
                np.multiply(s, lr_t, out=s)
                np.subtract(sv if pending else p, s, out=p)

    step = second_step


def numpy_step_fn(
    kind: str, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], blocked: bool = False
) -> Callable[[], None]:
    base = "sgd" if kind == "sam_sgd" else "adam"
    sam = kind != "adam"
    opt = (NumpyOptBlocked if blocked else NumpyOpt)(params, base, sam)
    if sam:

        def full() -> None:
            opt.first_step(params, grads)
            opt.second_step(params, grads)

        return full
    return lambda: opt.step(params, grads)


# --------------------------------------------------------------------------------------------
# samopt (imported lazily: only the worker subprocesses need it)
# --------------------------------------------------------------------------------------------
def samopt_make(kind: str) -> Any:
    samopt = importlib.import_module("samopt")

    if kind == "sam_adam":
        return samopt.SamOptimizer(samopt.AdamOptimizer(), rho=RHO)
    if kind == "sam_sgd":
        return samopt.SamOptimizer(samopt.SgdOptimizer(), rho=RHO)
    return samopt.AdamOptimizer()


def samopt_step_fn(
    kind: str, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
) -> Callable[[], None]:
    opt = samopt_make(kind)
    if kind == "adam":
        step = opt.step
        return lambda: step(params, grads)
    first, second = opt.first_step, opt.second_step

    def full() -> None:
        first(params, grads)
        second(params, grads)

    return full


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def bench_interleaved(
    fns: dict[str, Callable[[], None]], reps: int, warmup: int, min_time: float
) -> dict[str, dict[str, Any]]:
    """Time several step functions rep by rep (rep 1 of every row, then rep 2, ...; the order
    rotates each rep), so slow drifts of the machine's load hit all rows alike.

    Each row gets `warmup` calls first; a repetition runs `inner` calls (enough to last about
    `min_time`) and records the mean time per call.  Result per row: median over the `reps`
    repetitions (and min, max).  GC is off while timing."""
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            fn()
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        inner[name] = max(1, min(200_000, math.ceil(min_time / max(one, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, float] = {name: 0.0 for name in fns}
    wall: dict[str, float] = {name: 0.0 for name in fns}
    names = list(fns)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                fn, n = fns[name], inner[name]
                c0 = time.process_time()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                dt = time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
                wall[name] += dt
                times[name].append(dt / n)
    finally:
        if gc_was:
            gc.enable()
    return {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "reps": reps,
            "inner": inner[name],
            "cpu_per_wall": cpu[name] / wall[name] if wall[name] > 0 else None,
        }
        for name, ts in times.items()
    }


def thread_shares(n_elems: int, n_threads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two arrays of `n_elems` float64, cut into one (a, b) share per thread."""
    a = np.ones(n_elems)
    b = np.ones(n_elems)
    bounds = [(i * n_elems // n_threads, (i + 1) * n_elems // n_threads) for i in range(n_threads)]
    return [(a[lo:hi], b[lo:hi]) for lo, hi in bounds]


def measure_bandwidth(n_elems: int, n_threads: int, reps: int) -> dict[str, Any]:
    """GB/s of np.add(a, b, out=a) (read a, read b, write a: 3 streams) with `n_threads`
    threads each streaming its share of the arrays at the same time (numpy releases the GIL)."""
    parts = thread_shares(n_elems, n_threads)
    barrier = threading.Barrier(n_threads)
    times: list[float] = []
    warm = 2

    def work(k: int) -> None:
        x, y = parts[k]
        for _ in range(warm + reps):
            barrier.wait()
            t0 = time.perf_counter()
            np.add(x, y, out=x)
            barrier.wait()
            if k == 0:
                times.append(time.perf_counter() - t0)

    helpers = [threading.Thread(target=work, args=(k,)) for k in range(1, n_threads)]
    for t in helpers:
        t.start()
    work(0)
    for t in helpers:
        t.join()
    ts = times[warm:]
    nbytes = 3 * 8 * n_elems
    return {
        "threads": n_threads,
        "GBps": nbytes / statistics.median(ts) / 1e9,
        "GBps_best": nbytes / min(ts) / 1e9,
        "array_bytes": n_elems * 8,
        "reps": reps,
        "method": "np.add(a, b, out=a) per thread share, 3 streams",
    }


def streaming_fn(n_elems: int, n_threads: int) -> tuple[Callable[[], None], int]:
    """A step-like function for `bench_interleaved`: `n_threads` threads each stream
    `np.add(a, b, out=a)` over their share of two arrays far larger than any cache. Timed
    among the step rows, it gives the bandwidth of the same minutes as the rows (this VM's
    bandwidth changes within a run).  Returns the function and the bytes one call moves."""
    parts = thread_shares(n_elems, n_threads)
    pool = ThreadPoolExecutor(max_workers=n_threads)

    def stream(part: tuple[np.ndarray, np.ndarray]) -> None:
        np.add(part[0], part[1], out=part[0])

    def step() -> None:
        for _ in pool.map(stream, parts):
            pass

    return step, 3 * 8 * n_elems


def measure_cores(n_threads: int, reps: int = 2000) -> float:
    """Effective cores available right now: n threads each doing the same compute-bound,
    cache-resident work (np.exp on 64k doubles; numpy releases the GIL) against one thread
    doing it alone.  About n_threads on an idle machine; about 1 when another process
    holds the other core (then the multi-thread figures of this run mean little)."""
    x = [np.full(1 << 16, 0.5) for _ in range(n_threads)]
    y = [np.empty(1 << 16) for _ in range(n_threads)]

    def work(k: int) -> None:
        for _ in range(reps):
            np.exp(x[k], out=y[k])

    def run(n: int) -> float:
        ths = [threading.Thread(target=work, args=(k,)) for k in range(n)]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return time.perf_counter() - t0

    best1 = min(run(1) for _ in range(5))
    bestn = min(run(n_threads) for _ in range(5))
    return n_threads * best1 / bestn


# --------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "env": {
            k: os.environ.get(k)
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
                "RAYON_NUM_THREADS",
            )
        },
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            info["l3_cache"] = f.read().strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
        info["threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for d in threadpoolctl.threadpool_info()
        ]
    except Exception as exc:
        info["threadpools"] = f"unavailable: {type(exc).__name__}"
    try:
        repo = os.path.dirname(HERE)
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        info["git_head"] = head.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip())
    except Exception as exc:
        info["git_head"] = f"unavailable: {type(exc).__name__}"
    return info


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip().upper()
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 1024**2


# --------------------------------------------------------------------------------------------
# Check: NumPy baseline vs samopt
# --------------------------------------------------------------------------------------------
def rel_err(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for k, arr in a.items():
        x = arr.astype(np.float64)
        r = b[k].astype(np.float64)
        den = float(np.max(np.abs(r))) if r.size else 0.0
        num = float(np.max(np.abs(x - r))) if r.size else 0.0
        worst = max(worst, num / den if den > 0 else num)
    return worst


def digest(arrs: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrs[k]).tobytes())
    return h.hexdigest()[:16]


def check_one(kind: str, spec: dict[str, Any], seed: int = 1) -> dict[str, Any]:
    params, grads = make_data(spec, seed)
    ref_p, so_p = copy_params(params), copy_params(params)
    ref = NumpyOpt(ref_p, "sgd" if kind == "sam_sgd" else "adam", kind != "adam")
    so = samopt_make(kind)
    out: dict[str, Any] = {"kind": kind, "size": spec["key"]}
    if kind == "adam":
        ref.step(ref_p, grads)
        so.step(so_p, grads)
        out["err_step1"] = rel_err(so_p, ref_p)
    else:
        ref.first_step(ref_p, grads)
        so.first_step(so_p, grads)
        out["err_first_step"] = rel_err(so_p, ref_p)
        ref.second_step(ref_p, grads)
        so.second_step(so_p, grads)
        out["err_step1"] = rel_err(so_p, ref_p)
    for _ in range(2):
        if kind == "adam":
            ref.step(ref_p, grads)
            so.step(so_p, grads)
        else:
            ref.first_step(ref_p, grads)
            so.first_step(so_p, grads)
            ref.second_step(ref_p, grads)
            so.second_step(so_p, grads)
    out["err_step3"] = rel_err(so_p, ref_p)
    out["tol"] = TOL[spec["dtype"]]
    out["ok"] = all(out[k] <= out["tol"] for k in out if k.startswith("err_"))
    out["grads_unchanged"] = digest(grads) == digest(make_data(spec, seed)[1])
    out["ok"] = out["ok"] and out["grads_unchanged"]
    out["sha256_step3"] = digest(so_p)
    return out


# --------------------------------------------------------------------------------------------
# Workers (subprocesses)
# --------------------------------------------------------------------------------------------
def run_params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"reps": 3, "warmup": 1, "min_time": 0.003}
    return {"reps": 7, "warmup": 2, "min_time": 0.1}


def worker_rows(args: argparse.Namespace) -> dict[str, Any]:
    """One process per RAYON_NUM_THREADS setting: for each size, check the NumPy baseline
    against samopt, then time the NumPy, samopt and torch rows interleaved."""
    threads = int(os.environ.get("RAYON_NUM_THREADS", "0") or 0)
    rp = run_params(args.quick)
    res: dict[str, Any] = {"threads": threads, "rows": [], "checks": [], "errors": []}
    have_samopt = not args.numpy_only
    if have_samopt:
        samopt = importlib.import_module("samopt")
        try:
            from importlib.metadata import version

            res["samopt_version"] = getattr(samopt, "__version__", None) or version("samopt")
        except Exception:
            res["samopt_version"] = getattr(samopt, "__version__", None)
        res["samopt_file"] = getattr(samopt, "__file__", None)
    torch_mod = None
    if not args.no_torch:
        try:
            torch = importlib.import_module("torch")
            torch.set_num_threads(max(1, threads or (os.cpu_count() or 1)))
            torch_mod = torch
            res["torch_version"] = torch.__version__
        except Exception as exc:
            res["torch_skipped"] = f"{type(exc).__name__}: {exc}"
    # Bandwidth streamed among the rows of the sizes a DRAM floor applies to.
    stream_elems = (1 << 22) if args.quick else (1 << 24)  # 32 / 128 MiB per array
    streaming, streamed_bytes = streaming_fn(stream_elems, os.cpu_count() or 1)
    res["bandwidth_interleaved"] = {}
    for spec in size_specs(args.quick):
        if have_samopt and not args.no_check:
            for kind in KINDS:
                res["checks"].append(check_one(kind, spec))
                gc.collect()
        params, grads = make_data(spec)
        fns: dict[str, Callable[[], None]] = {}
        meta: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            fns[f"numpy/{kind}"] = numpy_step_fn(kind, copy_params(params), grads)
            meta[f"numpy/{kind}"] = {"impl": "numpy", "kind": kind, "blocked": False}
        fns["numpy/sam_adam/blocked"] = numpy_step_fn(
            "sam_adam", copy_params(params), grads, blocked=True
        )
        meta["numpy/sam_adam/blocked"] = {"impl": "numpy", "kind": "sam_adam", "blocked": True}
        if have_samopt:
            for kind in KINDS:
                fns[f"samopt/{kind}"] = samopt_step_fn(kind, copy_params(params), grads)
                meta[f"samopt/{kind}"] = {"impl": "samopt", "kind": kind}
        if torch_mod is not None:
            trow = torch_setup(torch_mod, params, grads)
            if "fn" in trow:
                fns["torch/adam"] = trow.pop("fn")
                meta["torch/adam"] = {"impl": "torch", "kind": "adam", **trow}
            else:
                res["rows"].append(
                    {
                        "size": spec["key"],
                        "impl": "torch",
                        "kind": "adam",
                        "threads": threads,
                        **trow,
                    }
                )
        if dram_bound(spec):
            fns["bandwidth"] = streaming
        timed = bench_interleaved(fns, **rp)
        if "bandwidth" in timed:
            bandwidth = timed.pop("bandwidth")
            res["bandwidth_interleaved"][spec["key"]] = streamed_bytes / bandwidth["median_s"] / 1e9
        for name, r in timed.items():
            r.update(meta[name], size=spec["key"], threads=threads)
            res["rows"].append(r)
        del fns, timed, params, grads
        gc.collect()
    return res


def torch_setup(
    torch: Any, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
) -> dict[str, Any]:
    """torch.optim.Adam(fused=True) (foreach if fused is unsupported) on a copy of the data:
    {"fn": step, "variant": ...}, or {"skipped": reason}."""
    try:
        p = copy_params(params)
        tps = []
        for name, arr in p.items():
            tp = torch.from_numpy(arr)
            tp.grad = torch.from_numpy(grads[name])
            tps.append(tp)
        kw = {"lr": LR, "betas": (BETA1, BETA2), "eps": EPS}
        try:
            opt = torch.optim.Adam(tps, fused=True, **kw)
            opt.step()
            variant = "fused"
        except (RuntimeError, ValueError, TypeError):
            opt = torch.optim.Adam(tps, foreach=True, **kw)
            opt.step()
            variant = "foreach"
        step = opt.step

        def fn() -> None:
            step()

        fn.keep = (p, tps)  # type: ignore[attr-defined]
        return {"fn": fn, "variant": variant}
    except Exception as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh process: params+grads, one warm-up step (state exists), then peak RSS per phase
    over several further steps.  Figures in MiB and in units of the parameters' bytes."""
    kind = args.kind
    n_arrays = int(args.layout)
    total = 1_000_000 if args.quick else 10_000_000
    spec = {
        "key": f"{n_arrays}x{total // n_arrays}_f64",
        "n_arrays": n_arrays,
        "elems": total // n_arrays,
        "dtype": "float64",
    }
    params, grads = make_data(spec)
    pb = param_bytes(spec)
    opt = samopt_make(kind)
    phases: list[tuple[str, Callable[[], None]]]
    if kind == "adam":
        phases = [("step", lambda: opt.step(params, grads))]
    else:
        phases = [
            ("first_step", lambda: opt.first_step(params, grads)),
            ("second_step", lambda: opt.second_step(params, grads)),
        ]
    gc.collect()
    rss_data = _status_kb("VmRSS")
    can_reset = _reset_hwm()
    for _, ph in phases:  # warm-up step: the state exists afterwards
        ph()
    warm_hwm = _status_kb("VmHWM")
    gc.collect()
    rss_warm = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks: dict[str, int] = {name: 0 for name, _ in phases}
    hwm_abs = rss_warm
    steps = 3 if args.quick else 5
    for _ in range(steps):
        for name, ph in phases:
            before = _status_kb("VmRSS")
            if can_reset:
                _reset_hwm()
            ph()
            if can_reset:
                hwm = _status_kb("VmHWM")
                peaks[name] = max(peaks[name], hwm - before)
                hwm_abs = max(hwm_abs, hwm)
    rss_end = _status_kb("VmRSS")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib_p = pb / 1024
    allowed = STATE_ARRAYS[kind] + SAVED_ARRAYS[kind]
    peak_above_data = hwm_abs - rss_data
    return {
        "kind": kind,
        "size": spec["key"],
        "param_bytes": pb,
        "steps": steps,
        "hwm_reset": can_reset,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "warmup_peak_above_params_grads_x": (warm_hwm - rss_data) / kib_p if can_reset else None,
        "retained_after_warmup_x": (rss_warm - rss_data) / kib_p,
        "transient_peak_x": {k: v / kib_p for k, v in peaks.items()} if can_reset else None,
        "peak_above_params_grads_x": peak_above_data / kib_p if can_reset else None,
        "allowed_x": allowed,
        "growth_over_steps_x": (rss_end - rss_warm) / kib_p,
        "ru_maxrss_growth_x": (maxrss_after - maxrss_before) / kib_p,
        "rss_data_mib": rss_data / 1024,
        "rss_warm_mib": rss_warm / 1024,
        "rss_end_mib": rss_end / 1024,
    }


def spawn_worker(
    extra: list[str],
    env_threads: int | None,
    quick: bool,
    timeout: float = 1200,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = dict(os.environ)
    # NumPy's OpenBLAS threads keep spinning after a BLAS call (the baseline's np.vdot) and
    # would take a core from samopt's helper thread on a 2-core machine; as a user mixing
    # thread pools would, give BLAS one thread unless told otherwise.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.update(env_extra or {})
    if env_threads is not None:
        env["RAYON_NUM_THREADS"] = str(env_threads)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--out", out]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            return {
                "error": f"worker {' '.join(extra)} exited {proc.returncode}: "
                f"{tail[-1] if tail else '(no stderr)'}",
                "stderr_tail": proc.stderr[-3000:],
            }
        with open(out) as f:
            loaded: dict[str, Any] = json.load(f)
            return loaded
    except subprocess.TimeoutExpired:
        return {"error": f"worker {' '.join(extra)} timed out after {timeout}s"}
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


def samopt_available() -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import samopt; samopt.SamOptimizer"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_x(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def row_label(r: dict[str, Any]) -> str:
    if r["impl"] == "numpy":
        return f"numpy {KIND_LABEL[r['kind']]}" + (" blocked*" if r.get("blocked") else "")
    if r["impl"] == "torch":
        return f"torch Adam({r.get('variant', '?')})"
    return f"samopt {KIND_LABEL[r['kind']]}"


def build_report(res: dict[str, Any]) -> str:
    specs = {s["key"]: s for s in res["sizes"]}
    bw = res["bandwidth"]["floor_GBps"]
    lines = []
    m = res["meta"]
    lines.append(
        f"samopt step benchmark  ({'QUICK smoke' if res['quick'] else 'full run'})  "
        f"{m.get('cpu_model', '?')}, {m.get('nproc')} cpus, L3 {m.get('l3_cache', '?')}, "
        f"numpy {m['numpy']}, samopt {res.get('samopt_version')}, "
        f"loadavg(1min) start {m['loadavg_start'][0]:.2f} end {m['loadavg_end'][0]:.2f}"
    )
    lines.append(
        f"effective cores (threads doing compute-bound numpy work in parallel vs one alone): "
        f"start {m['effective_cores_start']:.2f}, end {m['effective_cores_end']:.2f} "
        f"of {m.get('nproc')}"
        + (
            "  <- WARNING: another process held a core; multi-thread figures are unreliable"
            if min(m["effective_cores_start"], m["effective_cores_end"])
            < 0.85 * (m.get("nproc") or 1)
            else ""
        )
    )
    b = res["bandwidth"]
    lines.append(
        "memory bandwidth (np.add(a,b,out=a), 3 streams, "
        f"2x{b['runs'][0]['array_bytes'] / 2**20:.0f} MiB): "
        + ", ".join(f"{x['threads']} thr {x['GBps']:.1f} GB/s" for x in b["runs"])
        + (
            f"  -> floor uses {bw:.1f} GB/s (all cores, best of start/end)"
            if not b.get("interleaved_GBps")
            else ""
        )
    )
    if b.get("interleaved_GBps"):
        lines.append(
            "floor bandwidth, streamed by all cores interleaved with each process's rows "
            "(same minutes as the rows): "
            + ", ".join(f"{k} {v:.1f} GB/s" for k, v in b["interleaved_GBps"].items())
        )
    lines.append(
        "floor = streams x parameter bytes / bandwidth; streams: Adam 7, SAM(Adam) 12, "
        "SAM(SGD) 10.  GB/s = those bytes / median time.  cpu = process CPU time / wall time "
        "while the row ran (about 2.0 = both cores busy)."
    )
    lines.append(
        "'vs numpy' = NumPy time of the same optimizer (measured in the same process, "
        "interleaved) / this row's time.  thr '(n)': a NumPy row measured in the "
        "RAYON_NUM_THREADS=n process (NumPy itself does not use rayon)."
    )
    lines.append("")
    hdr = (
        f"{'size':<18} {'row':<24} {'thr':>3} {'median':>10} {'min':>10} {'GB/s':>7} "
        f"{'floor':>9} {'/floor':>7} {'vs numpy':>8} {'cpu':>4}"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for key, spec in specs.items():
        first = True
        rows = [r for r in res["rows"] if r["size"] == key]
        order = {"numpy": 0, "samopt": 1, "torch": 2}
        rows.sort(
            key=lambda r: (
                order[r["impl"]],
                r.get("blocked", False) if r["impl"] == "numpy" else 0,
                KINDS.index(r["kind"]),
                r.get("threads") or 0,
            )
        )
        for r in rows:
            thr = f"({r.get('threads')})" if r["impl"] == "numpy" else str(r.get("threads"))
            if "skipped" in r:
                lines.append(
                    f"{spec['label'] if first else '':<18} {row_label(r):<24} {thr:>3} "
                    f"skipped: {r['skipped'][:60]}"
                )
                first = False
                continue
            cache = r.get("cache_resident")
            lines.append(
                f"{spec['label'] if first else '':<18} {row_label(r):<24} {thr:>3} "
                f"{fmt_t(r['median_s']):>10} {fmt_t(r['min_s']):>10} {r['GBps']:>7.1f} "
                f"{('cache' if cache else fmt_t(r['floor_s'])):>9} "
                f"{('-' if cache else fmt_x(r['ratio_floor'])):>7} "
                f"{fmt_x(r.get('speedup_vs_numpy')):>8} {fmt_x(r.get('cpu_per_wall'), 1):>4}"
            )
            first = False
        lines.append("")
    lines.append(
        "* blocked: the NumPy SAM(Adam) step walked in 128 KiB blocks per array "
        "(extra row, not the target baseline)."
    )
    lines.append("'cache': working set < 2x L3, so a DRAM floor does not apply.")
    lines.append("")
    lines.append("Ratios (issue 3 targets; informational, nothing asserted):")
    for t in res["targets"]:
        val = t["value"]
        shown = "-" if val is None else (f"{val:.1f} us" if t["unit"] == "us" else f"{val:.2f}x")
        status = "" if t["ok"] is None else ("ok" if t["ok"] else "MISS")
        lines.append(f"  {t['name']:<58} {shown:>10}   target {t['target']:<8} {status}")
    if res.get("scaling"):
        lines.append("")
        lines.append("Thread scaling (time with RAYON_NUM_THREADS=1 / time with 2):")
        for s in res["scaling"]:
            lines.append(f"  {s['size']:<14} {KIND_LABEL[s['kind']]:<10} {s['t1_over_t2']:.2f}x")
    if res.get("rss"):
        lines.append("")
        lines.append(
            "Peak RSS over params+grads (fresh process per row, one warm-up step then "
            "several steps; MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave RSS; "
            "unit P = parameter bytes; allowed = optimizer state (+ SAM saved values)):"
        )
        lines.append(
            f"  {'optimizer':<10} {'layout':<14} {'kept after warm-up':>18} {'warm-up peak':>12} "
            f"{'steady peak':>11} {'allowed':>7} {'excess':>7}  transient per phase"
        )
        for r in res["rss"]:
            if "error" in r:
                lines.append(f"  {r['error'][:300]}")
                continue
            tp = r["transient_peak_x"]
            tps = ", ".join(f"{k} +{v:.2f}P" for k, v in tp.items()) if tp else "n/a"
            peak = r["peak_above_params_grads_x"]
            excess = None if peak is None else peak - r["allowed_x"]
            lines.append(
                f"  {KIND_LABEL[r['kind']]:<10} {r['size']:<14} "
                f"{r['retained_after_warmup_x']:>17.2f}P "
                f"{fmt_x(r['warmup_peak_above_params_grads_x']):>11}P {fmt_x(peak):>10}P "
                f"{r['allowed_x']:>6}P {fmt_x(excess):>6}P  {tps}"
            )
    lines.append("")
    chk = res.get("checks_summary")
    if chk:
        lines.append(f"Check numpy baseline vs samopt: {chk}")
    for err in res.get("errors", []):
        lines.append(f"ERROR: {err}")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    quick = args.quick
    specs = size_specs(quick)
    rp = run_params(quick)
    res: dict[str, Any] = {
        "quick": quick,
        "meta": machine_info(),
        "sizes": [dict(s, param_bytes=param_bytes(s)) for s in specs],
        "run_params": rp,
        "hyperparameters": {
            "lr": LR,
            "momentum": MOMENTUM,
            "beta1": BETA1,
            "beta2": BETA2,
            "eps": EPS,
            "rho": RHO,
        },
        "streams": STREAMS,
        "rows": [],
        "errors": [],
    }
    threads_list = [int(x) for x in args.threads.split(",") if x.strip()]
    ncpu = os.cpu_count() or 1
    bw_elems = (1 << 22) if quick else (1 << 26)  # 32 MiB / 512 MiB per array
    bw_reps = 5 if quick else 15
    t_start = time.perf_counter()

    def log(*a: object) -> None:
        if not args.silent:
            print(*a, file=sys.stderr, flush=True)

    res["meta"]["loadavg_start"] = os.getloadavg()
    if os.getloadavg()[0] > 0.5:
        log(
            f"warning: load average {os.getloadavg()[0]:.2f} at start: other processes compete "
            "for the cores and the memory bus; figures will be noisy"
        )
    res["meta"]["effective_cores_start"] = measure_cores(ncpu)
    log("measuring bandwidth ...")
    bw_runs = [measure_bandwidth(bw_elems, ncpu, bw_reps), measure_bandwidth(bw_elems, 1, bw_reps)]

    # All step rows: one subprocess per RAYON_NUM_THREADS setting (rayon reads it at start);
    # each times the NumPy, samopt (and torch) rows interleaved, for every size.
    ok, why = samopt_available()
    if not ok:
        res["errors"].append(f"samopt not importable ({why}); only the NumPy rows were measured")
        threads_list = threads_list[-1:]
    workers: dict[int, dict[str, Any]] = {}
    # The baseline's norm (np.vdot -> OpenBLAS ddot) runs on one thread: a multi-threaded
    # ddot spin-waits for its helper thread and collapses (x5 on the SAM rows) as soon as any
    # other process holds a core; one thread costs it < 1 ms per 10M step.
    blas_env = {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    res["meta"]["worker_OPENBLAS_NUM_THREADS"] = blas_env["OPENBLAS_NUM_THREADS"]
    for n in threads_list:
        log(f"step rows, RAYON_NUM_THREADS={n} (subprocess) ...")
        extra = (
            ["--worker", "rows"]
            + (["--no-torch"] if args.no_torch else [])
            + (["--no-check"] if args.no_check else [])
            + ([] if ok else ["--numpy-only"])
        )
        w = spawn_worker(extra, n, quick, env_extra=blas_env)
        if "error" in w and ok:
            res["errors"].append(w["error"] + " -> NumPy rows only for this setting")
            log(w.get("stderr_tail", ""))
            w = spawn_worker([*extra, "--numpy-only", "--no-check"], n, quick, env_extra=blas_env)
        if "error" in w:
            res["errors"].append(w["error"])
            log(w.get("stderr_tail", ""))
            continue
        workers[n] = w
        res["rows"].extend(w["rows"])
        res.setdefault("samopt_version", w.get("samopt_version"))
        res.setdefault("samopt_file", w.get("samopt_file"))
        if "torch_version" in w:
            res["meta"]["torch"] = w["torch_version"]
        elif "torch_skipped" in w:
            res["meta"]["torch"] = None
            res["torch_skipped"] = w["torch_skipped"]
    res["checks"] = {str(n): w["checks"] for n, w in workers.items()}
    # Peak RSS: fresh subprocess per optimizer and layout
    if ok and not args.no_rss:
        res["rss"] = []
        for layout in ("20", "1"):
            for kind in KINDS:
                log(f"peak RSS: {kind}, {layout} array(s) (subprocess) ...")
                res["rss"].append(
                    spawn_worker(
                        ["--worker", "rss", "--kind", kind, "--layout", layout],
                        None,
                        quick,
                        env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"},
                    )
                )

    log("measuring bandwidth again ...")
    bw_runs += [measure_bandwidth(bw_elems, ncpu, bw_reps), measure_bandwidth(bw_elems, 1, bw_reps)]
    floor_bw = max(r["GBps"] for r in bw_runs if r["threads"] == ncpu)
    floor_bw1 = max(r["GBps"] for r in bw_runs if r["threads"] == 1)
    # The floor of a row: the all-cores bandwidth streamed among that process's rows of
    # the same size (same minutes); the start/end figure where there is none.
    interleaved = {
        (n, size): gbps
        for n, w in workers.items()
        for size, gbps in w.get("bandwidth_interleaved", {}).items()
    }
    res["bandwidth"] = {
        "runs": bw_runs,
        "floor_GBps": floor_bw,
        "one_thread_GBps": floor_bw1,
        "interleaved_GBps": {f"{size} [{n} thr]": v for (n, size), v in interleaved.items()},
        "note": "a row's floor uses the all-cores bandwidth streamed interleaved with its "
        "process's rows of its size; else the best median of the start and end runs",
    }

    # derived figures
    l3 = l3_bytes()
    spec_by = {s["key"]: s for s in specs}
    # speedups use the NumPy figure measured in the same process, interleaved with the row
    numpy_t = {
        (r["size"], r["kind"], r["threads"]): r["median_s"]
        for r in res["rows"]
        if r["impl"] == "numpy" and not r.get("blocked") and "median_s" in r
    }
    for r in res["rows"]:
        if "median_s" not in r:
            continue
        spec = spec_by[r["size"]]
        pb = param_bytes(spec)
        moved = STREAMS[r["kind"]] * pb
        working = (2 + STATE_ARRAYS[r["kind"]] + SAVED_ARRAYS[r["kind"]]) * pb
        r["bytes_model"] = moved
        r["GBps"] = moved / r["median_s"] / 1e9
        r["floor_GBps"] = interleaved.get((r["threads"], r["size"]), floor_bw)
        r["floor_s"] = moved / (r["floor_GBps"] * 1e9)
        r["floor_1thread_s"] = moved / (floor_bw1 * 1e9)
        r["ratio_floor"] = r["median_s"] / r["floor_s"]
        r["cache_resident"] = working < 2 * l3
        if r["impl"] != "numpy" or r.get("blocked"):
            base = numpy_t.get((r["size"], r["kind"], r["threads"]))
            r["speedup_vs_numpy"] = base / r["median_s"] if base else None
        else:
            r["speedup_vs_numpy"] = 1.0

    main_thr = 2 if 2 in workers else (max(workers) if workers else None)
    res["main_threads"] = main_thr

    def srow(size: str, kind: str, thr: int | None = main_thr) -> Any:
        for r in res["rows"]:
            if (
                r["impl"] == "samopt"
                and r["size"] == size
                and r["kind"] == kind
                and r["threads"] == thr
                and "median_s" in r
            ):
                return r
        return None

    targets = []
    big = [s for s in specs if s["n_arrays"] == 20]
    small_many = [s for s in specs if s["n_arrays"] == 200]
    tiny = [s for s in specs if s["elems"] == 10]
    sp_target = {"float64": 2.5, "float32": 2.0}
    sfx = f" [{main_thr} thr]" if main_thr else ""
    for s in big:
        r = srow(s["key"], "sam_adam")
        v = r["speedup_vs_numpy"] if r else None
        targets.append(
            {
                "name": f"SAM(Adam) speedup vs numpy, {s['label']}{sfx}",
                "value": v,
                "target": f">= {sp_target[s['dtype']]}x",
                "unit": "x",
                "ok": None if v is None or quick else v >= sp_target[s["dtype"]],
            }
        )
    for s in small_many:
        r = srow(s["key"], "sam_adam")
        v = r["speedup_vs_numpy"] if r else None
        targets.append(
            {
                "name": f"SAM(Adam) speedup vs numpy, {s['label']}{sfx}",
                "value": v,
                "target": ">= 8x",
                "unit": "x",
                "ok": None if v is None or quick else v >= 8,
            }
        )
    for s in big:
        for kind, lim in (("adam", 1.3), ("sam_adam", 1.5)):
            r = srow(s["key"], kind)
            v = r["ratio_floor"] if r else None
            targets.append(
                {
                    "name": f"{KIND_LABEL[kind]} / floor, {s['label']}{sfx}",
                    "value": v,
                    "target": f"<= {lim}x",
                    "unit": "x",
                    "ok": None if v is None or quick else v <= lim,
                }
            )
    for s in tiny:
        for thr in sorted(workers):
            r = srow(s["key"], "sam_adam", thr)
            v = r["median_s"] * 1e6 if r else None
            targets.append(
                {
                    "name": f"SAM(Adam) whole step, {s['label']} [{thr} thr]",
                    "value": v,
                    "target": "< 20 us",
                    "unit": "us",
                    "ok": None if v is None else v < 20,
                }
            )
    res["targets"] = targets
    if 1 in workers and 2 in workers:
        res["scaling"] = []
        for s in specs:
            for kind in KINDS:
                r1, r2 = srow(s["key"], kind, 1), srow(s["key"], kind, 2)
                if r1 and r2:
                    res["scaling"].append(
                        {
                            "size": s["key"],
                            "kind": kind,
                            "t1_over_t2": r1["median_s"] / r2["median_s"],
                        }
                    )
    # checks
    all_checks = [c for w in workers.values() for c in w["checks"]]
    if not all_checks:
        res["checks_ok"] = None
        res["checks_summary"] = "not run" + (" (--no-check)" if args.no_check else "")
    else:
        bad = [c for c in all_checks if not c["ok"]]
        hashes: dict[tuple[str, str], set[str]] = {}
        for c in all_checks:
            hashes.setdefault((c["size"], c["kind"]), set()).add(c["sha256_step3"])
        det = all(len(v) == 1 for v in hashes.values())
        worst = {
            dt: max(
                (
                    max(v for k, v in c.items() if k.startswith("err_"))
                    for c in all_checks
                    if spec_by[c["size"]]["dtype"] == dt
                ),
                default=0.0,
            )
            for dt in TOL
        }
        res["checks_ok"] = not bad
        res["deterministic_across_threads"] = det if len(workers) > 1 else None
        res["checks_summary"] = (
            (
                "OK"
                if not bad
                else f"FAILED ({len(bad)}: "
                + ", ".join(f"{c['size']}/{c['kind']}" for c in bad)
                + ")"
            )
            + "; worst rel. error "
            + ", ".join(f"{dt} {worst[dt]:.2e} (tol {TOL[dt]:g})" for dt in TOL)
            + (
                "; bitwise identical across RAYON_NUM_THREADS="
                f"{','.join(map(str, sorted(workers)))}: "
                f"{'yes' if det else 'NO'}"
                if len(workers) > 1
                else ""
            )
        )
    res["wall_s"] = time.perf_counter() - t_start
    res["meta"]["loadavg_end"] = os.getloadavg()
    res["meta"]["effective_cores_end"] = measure_cores(ncpu)

    report = build_report(res)
    print(report)
    path = args.json or os.path.join(HERE, "results_quick.json" if quick else "results.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"\nfigures written to {path} (run took {res['wall_s']:.0f} s)")
    return 0



# --------------------------------------------------------------------------------------------
# Many arrays (issue 16): cost per array against the array count
# --------------------------------------------------------------------------------------------
SWEEP_TOTAL = 200_000
"""Elements in all for the fixed-total sweep."""
SWEEP_FIXED_COUNTS = (1, 10, 100, 1_000, 10_000, 100_000)
SWEEP_SMALL_ELEMS = 20
SWEEP_SMALL_COUNTS = (100, 1_000, 10_000, 100_000)
MILLION = 1_000_000
MILLION_ELEMS = 10
"""Elements per array of the 1,000,000-array row."""


def many_arrays(count: int, elems: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``count`` float64 arrays of ``elems`` elements, named like a model's layers."""
    rng = np.random.default_rng(seed)
    flat_p = rng.standard_normal(count * elems)
    flat_g = rng.standard_normal(count * elems) * 0.01
    # Separate arrays (copies), as a model's parameters are; not views of one buffer.
    params = {f"layer{i}.weight": flat_p[i * elems : (i + 1) * elems].copy() for i in range(count)}
    grads = {name: flat_g[i * elems : (i + 1) * elems].copy() for i, name in enumerate(params)}
    return params, grads


def many_arrays_flat(samopt: Any, count: int, elems: int, seed: int = 0) -> tuple[Any, Any]:
    """The arrays of ``many_arrays`` with the same values, as ``samopt.flat_params``
    arenas: views of one buffer for the params and one for the grads. Without making the
    separate arrays on the way: their memory, freed but kept by the allocator, would hide
    the state's in the peak-RSS figures."""
    rng = np.random.default_rng(seed)
    values_p = rng.standard_normal(count * elems)
    values_g = rng.standard_normal(count * elems) * 0.01
    names = [f"layer{i}.weight" for i in range(count)]
    flat_p = samopt.flat_params({name: (elems,) for name in names}, np.float64)
    flat_g = flat_p.zeros_like()
    for i, name in enumerate(names):
        flat_p[name][...] = values_p[i * elems : (i + 1) * elems]
        flat_g[name][...] = values_g[i * elems : (i + 1) * elems]
    return flat_p, flat_g


def torch_sam_adam(
    torch: Any, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
) -> Callable[[], None]:
    """SAM(Adam) in torch as a careful user writes it for many arrays: foreach ops for the
    norm, the perturbation and the restore, fused (else foreach) Adam."""
    tps = [torch.from_numpy(a.copy()) for a in params.values()]
    tgs = [torch.from_numpy(grads[name]) for name in params]
    for tp, tg in zip(tps, tgs):
        tp.grad = tg
    kw = {"lr": LR, "betas": (BETA1, BETA2), "eps": EPS}
    try:
        opt = torch.optim.Adam(tps, fused=True, **kw)
        opt.step()
    except (RuntimeError, ValueError, TypeError):
        opt = torch.optim.Adam(tps, foreach=True, **kw)
        opt.step()
    saved = [tp.detach().clone() for tp in tps]

    def step() -> None:
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tgs)))
            torch._foreach_copy_(saved, tps)
            torch._foreach_add_(tps, tgs, alpha=float(RHO / norm))
            torch._foreach_copy_(tps, saved)
            opt.step()

    step.keep = (tps, tgs, saved, opt)  # type: ignore[attr-defined]
    return step


def time_steps(step: Callable[[], None], budget_s: float) -> dict[str, Any]:
    """Median time of ``step`` over repetitions filling about ``budget_s`` (at least 5),
    after one warm-up call; GC off while timing."""
    step()
    t0 = time.perf_counter()
    step()
    one = max(time.perf_counter() - t0, 1e-9)
    inner = max(1, int(0.02 / one))
    reps = max(5, min(41, int(budget_s / (one * inner))))
    times = []
    cpu = []
    gc.disable()
    try:
        for _ in range(reps):
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            times.append((time.perf_counter() - t0) / inner)
            cpu.append((time.process_time() - c0) / inner)
    finally:
        gc.enable()
    # CPU time says what the process itself spent, when other processes hold the cores.
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_median_s": statistics.median(cpu),
        "reps": reps,
    }


def worker_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The array-count sweep of SAM(Adam), float64, in one process: samopt, and torch where
    it is importable."""
    samopt = importlib.import_module("samopt")
    torch = None
    res: dict[str, Any] = {"samopt_file": samopt.__file__, "rows": []}
    if not args.no_torch:
        try:
            torch = importlib.import_module("torch")
            res["torch_version"] = torch.__version__
        except Exception as exc:
            res["torch_skipped"] = f"{type(exc).__name__}: {exc}"
    budget = 0.3 if args.quick else 1.5
    configs = [("fixed_total", n, SWEEP_TOTAL // n) for n in SWEEP_FIXED_COUNTS]
    configs += [("small", n, SWEEP_SMALL_ELEMS) for n in SWEEP_SMALL_COUNTS]
    if args.quick:
        configs = [c for c in configs if c[1] <= 10_000]
    def sam_adam_step(params: Any, grads: Any) -> Callable[[], None]:
        opt = samopt.SamOptimizer(samopt.AdamOptimizer(), rho=RHO)

        def step() -> None:
            opt.first_step(params, grads)
            opt.second_step(params, grads)

        return step

    for series, count, elems in configs:
        params, grads = many_arrays(count, elems)
        impls: dict[str, Callable[[], None]] = {"samopt": sam_adam_step(params, grads)}
        if hasattr(samopt, "flat_params"):  # a build from before the arena has none
            impls["samopt flat"] = sam_adam_step(*many_arrays_flat(samopt, count, elems))
        if torch is not None:
            try:
                impls["torch"] = torch_sam_adam(torch, params, grads)
            except Exception as exc:
                res["torch_skipped"] = f"{type(exc).__name__}: {exc}"
        for impl, fn in impls.items():
            timed = time_steps(fn, budget)
            timed.update(
                impl=impl,
                series=series,
                arrays=count,
                elems=elems,
                us_per_array=timed["median_s"] / count * 1e6,
            )
            res["rows"].append(timed)
        del params, grads, impls
        gc.collect()
    return res


def worker_million(args: argparse.Namespace) -> dict[str, Any]:
    """1,000,000 tiny arrays (100,000 with --quick) in a fresh process, separate arrays or
    (worker ``million_flat``) a ``flat_params`` arena: SAM(Adam) step time, peak RSS of the
    steps beyond params, grads, state and saved values, the times of state_dict and of
    load_state_dict into a new optimizer, and of that optimizer's first step (for an arena,
    the step that gathers the loaded per-name state into buffers)."""
    samopt = importlib.import_module("samopt")
    count = 100_000 if args.quick else MILLION
    flat = args.worker == "million_flat"
    if flat and not hasattr(samopt, "flat_params"):
        return {"arrays": count, "elems": MILLION_ELEMS, "skipped": "no flat_params"}
    if flat:
        params, grads = many_arrays_flat(samopt, count, MILLION_ELEMS)
    else:
        params, grads = many_arrays(count, MILLION_ELEMS)
    gc.collect()
    rss_data = _status_kb("VmRSS")
    opt = samopt.SamOptimizer(samopt.AdamOptimizer(), rho=RHO)
    can_reset = _reset_hwm()
    times = []
    cpu = []
    for _ in range(4):  # the first builds the state
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.first_step(params, grads)
        opt.second_step(params, grads)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak_kib = _status_kb("VmHWM") if can_reset else -1
    t0 = time.perf_counter()
    opt.first_step(params, grads)  # the state dict holds the pending saved values too
    first_s = time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    state = opt.state_dict()
    state_dict_s, state_dict_cpu = time.perf_counter() - t0, time.process_time() - c0
    # What any dict of that many new arrays costs here, under the state dict's own keys
    # (already made): a floor for state_dict and load_state_dict with per-name keys.
    t0 = time.perf_counter()
    floor = {key: np.empty(MILLION_ELEMS) for key in state}
    dict_floor_s = time.perf_counter() - t0
    del floor
    # A resume as in a new process: the old optimizer's claim on the perturbed arrays
    # goes with it.
    del opt
    gc.collect()
    fresh = samopt.SamOptimizer(samopt.AdamOptimizer(), rho=RHO)
    c0, t0 = time.process_time(), time.perf_counter()
    fresh.load_state_dict(state)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    fresh.second_step(params, grads)
    resumed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.first_step(params, grads)
    fresh.second_step(params, grads)
    after_resume_s = time.perf_counter() - t0
    # m, v and the saved values: float64, one element each per parameter element.
    state_bytes = 3 * count * MILLION_ELEMS * 8
    beyond = (peak_kib - rss_data) * 1024 - state_bytes if can_reset else None
    return {
        "arrays": count,
        "elems": MILLION_ELEMS,
        "flat": flat,
        "first_call_s": times[0],
        "step_s": statistics.median(times[1:]),
        "step_cpu_s": statistics.median(cpu[1:]),
        "first_step_s": first_s,
        "peak_rss_above_params_grads_mb": (peak_kib - rss_data) / 1024 if can_reset else None,
        "state_and_saved_mb": state_bytes / 2**20,
        "peak_beyond_state_mb": beyond / 2**20 if beyond is not None else None,
        "state_dict_s": state_dict_s,
        "state_dict_cpu_s": state_dict_cpu,
        "state_dict_keys": len(state),
        "dict_of_new_arrays_s": dict_floor_s,
        "load_state_dict_s": load_s,
        "load_state_dict_cpu_s": load_cpu,
        "second_step_after_load_s": resumed_s,
        "step_after_load_s": after_resume_s,
        "loadavg": os.getloadavg(),
    }


def spawn_with(python: str, extra: list[str], quick: bool) -> dict[str, Any]:
    """A worker under interpreter ``python`` (another build of samopt)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [python, os.path.abspath(__file__), *extra, "--out", out, *(["--quick"] if quick else [])]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"error": f"{python} {' '.join(extra)} exited {proc.returncode}",
                    "stderr_tail": proc.stderr[-3000:]}
        with open(out) as f:
            loaded: dict[str, Any] = json.load(f)
            return loaded
    finally:
        os.unlink(out)


def sweep_report(runs: dict[str, dict[str, Any]]) -> str:
    """Tables of µs per array for each build, and the 1,000,000-array rows."""
    labels = list(runs)
    lines = []
    for series, title in (
        ("fixed_total", f"{SWEEP_TOTAL:,} elements in all"),
        ("small", f"{SWEEP_SMALL_ELEMS}-element arrays"),
    ):
        lines.append(
            f"\nSAM(Adam) step, float64, {title}: us per array (step time; CPU us per array)"
        )
        rows: dict[tuple[int, int], dict[str, str]] = {}
        for label in labels:
            for r in runs[label]["sweep"].get("rows", []):
                if r["series"] == series:
                    key = (r["arrays"], r["elems"])
                    name = label if r["impl"] == "samopt" else f"{label} {r['impl']}"
                    cpu_us = r["cpu_median_s"] / r["arrays"] * 1e6
                    rows.setdefault(key, {})[name] = (
                        f"{r['us_per_array']:.3f} ({fmt_t(r['median_s'])}; cpu {cpu_us:.3f})"
                    )
        names = sorted({n for cells in rows.values() for n in cells})
        lines.append("| arrays x elements | " + " | ".join(names) + " |")
        lines.append("| --- |" + " --- |" * len(names))
        for (count, elems), cells in sorted(rows.items()):
            cols = " | ".join(cells.get(n, "-") for n in names)
            lines.append(f"| {count:,} x {elems:,} | {cols} |")
    counts = [
        run[worker]["arrays"]
        for run in runs.values()
        for worker in ("million", "million_flat")
        if "arrays" in run.get(worker, {})
    ]
    lines.append(f"\n{max(counts, default=MILLION):,} tiny arrays of {MILLION_ELEMS} elements")
    keys = ("arrays", "step_s", "step_cpu_s", "peak_beyond_state_mb",
            "peak_rss_above_params_grads_mb", "state_dict_s", "state_dict_cpu_s",
            "load_state_dict_s", "load_state_dict_cpu_s", "dict_of_new_arrays_s",
            "second_step_after_load_s", "step_after_load_s")
    lines.append("| build | " + " | ".join(keys) + " |")
    lines.append("| --- |" + " --- |" * len(keys))
    for label in labels:
        for worker, what in (("million", ""), ("million_flat", " flat")):
            m = runs[label].get(worker, {})
            if not m or "skipped" in m or "error" in m:
                continue
            cells = [
                "-" if m.get(k) is None
                else (f"{m[k]:.3g}" if isinstance(m[k], float) else str(m[k]))
                for k in keys
            ]
            lines.append(f"| {label}{what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_plot(runs: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"fixed_total": "o-", "small": "s--"}
    for label, run in runs.items():
        impls = sorted({r["impl"] for r in run["sweep"].get("rows", [])})
        for impl in impls:
            for series, what in (
                ("fixed_total", f"{SWEEP_TOTAL:,} elements in all"),
                ("small", f"{SWEEP_SMALL_ELEMS} elements each"),
            ):
                rows = sorted(
                    (r for r in run["sweep"].get("rows", [])
                     if r["series"] == series and r["impl"] == impl),
                    key=lambda r: r["arrays"],
                )
                if rows:
                    ax.plot([r["arrays"] for r in rows], [r["us_per_array"] for r in rows],
                            styles[series], label=f"{label} {impl}, {what}")
        for worker, marker, what in (("million", "k*", ""), ("million_flat", "r*", " flat")):
            million = run.get(worker, {})
            if million.get("step_s"):
                at = (million["arrays"], million["step_s"] / million["arrays"] * 1e6)
                ax.plot([at[0]], [at[1]], marker, markersize=9)
                ax.annotate(f"{label}{what} 1M x {million['elems']}", at,
                            textcoords="offset points", xytext=(-80, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arrays in the call")
    ax.set_ylabel("µs per array (whole SAM(Adam) step)")
    ax.set_title("SAM(Adam), float64: cost per array against array count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def orchestrate_sweep(args: argparse.Namespace) -> int:
    """The sweep and the 1,000,000-array row, for this build and ``--compare``'s, each
    worker of one build followed by the same worker of the other."""
    compared, this = (args.labels or "compared,this build").split(",", 1)
    builds = {this: sys.executable}
    if args.compare:
        builds = {compared: args.compare, this: sys.executable}
    runs: dict[str, dict[str, Any]] = {label: {} for label in builds}
    extra_torch = ["--no-torch"] if args.no_torch else []
    for worker in ("sweep", "million", "million_flat"):
        for label, python in builds.items():
            if not args.silent:
                print(f"{worker}: {label} ({python}) ...", file=sys.stderr, flush=True)
            out = spawn_with(python, ["--worker", worker, *extra_torch], args.quick)
            if "error" in out:
                print(out["error"], out.get("stderr_tail", ""), file=sys.stderr)
            runs[label][worker] = out
    print(sweep_report(runs))
    result = {"meta": machine_info(), "builds": builds, "runs": runs}
    path = args.json or os.path.join(HERE, "results_sweep.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nfigures written to {path}")
    if args.plot:
        sweep_plot(runs, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def check_mode(args: argparse.Namespace) -> int:
    bad = 0
    for spec in size_specs(args.quick):
        for kind in KINDS:
            c = check_one(kind, spec)
            errs = ", ".join(f"{k}={v:.2e}" for k, v in c.items() if k.startswith("err_"))
            print(
                f"{spec['label']:<20} {KIND_LABEL[kind]:<10} {'ok ' if c['ok'] else 'BAD'} "
                f"{errs} (tol {c['tol']:g})"
                f"{'' if c['grads_unchanged'] else ' GRADS MODIFIED'}"
            )
            bad += not c["ok"]
    print("check:", "OK" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# LookaheadOptimizer, LAMB, LARS (issue 17): `--layerwise`
# --------------------------------------------------------------------------------------------
# Streams each step must move, in parameter bytes. LAMB and LARS are two passes: a read pass
# for each array's norms (LAMB: p, g, m, v; LARS: p, g), then the update (LAMB: read p, g, m,
# v, write p, m, v; LARS: read p, g, v, write p, v). SAM adds its norm (g) and perturb-and-save
# (read p, g, write p, saved), and its restore reads saved instead of p. Lookahead's
# synchronisation reads and writes the fast and the slow weights (4), here every step (k=1)
# on top of Adam's 7. samopt reads g once more (the finiteness check) than these count for
# Lookahead(Adam) and Sophia; the read pass of LAMB, LARS and AdamP is their check.
# Sophia is element-wise: read p, g, m, h, write p, m (and h on the one step in
# hessian_update_freq = 10 that refreshes it from g²). AdamP counts as LAMB: its read pass
# (p, g, m, v) sums the norms and dot products, its update reads p, g, m, v and writes p, m,
# v; its arrays are 2-d (x 1000 columns), so the projection is decided on each (the channel
# view first: these random gradients fail it at each array's first row, one row read).
LAYERWISE_STREAMS = {
    "adamp": 11,
    "sam_adamp": 16,
    "lamb": 11,
    "sam_lamb": 16,
    "lars": 7,
    "sam_lars": 12,
    "lookahead_adam": 11,
    "sophia": 6,
}


class NumpyLamb:
    """A careful NumPy LAMB (the crate's formula): in-place ufuncs with `out=`, one
    preallocated scratch pair per array, one loop over the arrays."""

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, wd: float = 0.01) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps, self.t = lr, wd, 0.9, 0.999, 1e-8, 0
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.r = {k: np.empty_like(p) for k, p in params.items()}
        self.s = {k: np.empty_like(p) for k, p in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1.0 / (1 - self.b1**self.t), 1.0 / (1 - self.b2**self.t)
        for k, p in params.items():
            g, m, v, r, s = grads[k], self.m[k], self.v[k], self.r[k], self.s[k]
            m *= self.b1
            np.multiply(g, 1 - self.b1, out=s)
            m += s
            v *= self.b2
            np.multiply(g, g, out=s)
            s *= 1 - self.b2
            v += s
            np.multiply(v, c2, out=s)
            np.sqrt(s, out=s)
            s += self.eps
            np.multiply(m, c1, out=r)
            r /= s
            np.multiply(p, self.wd, out=s)
            r += s
            pn, rn = math.sqrt(float(np.dot(p, p))), math.sqrt(float(np.dot(r, r)))
            trust = pn / rn if pn > 0 and rn > 0 else 1.0
            r *= self.lr * trust
            p -= r


def layerwise_mode(args: argparse.Namespace) -> int:
    """Times LAMB, SAM(LAMB), LARS, SAM(LARS), Lookahead(Adam) (k=1, so every step
    synchronises) and Sophia at 10M float64 (20 x 500k) against their memory floors, and a careful
    NumPy LAMB, all interleaved with the bandwidth stream in one process."""
    samopt = importlib.import_module("samopt")
    n_arrays, per = (20, 50_000) if args.quick else (20, 500_000)
    rng = np.random.default_rng(0)
    params = {f"p{i:02d}": rng.standard_normal(per) for i in range(n_arrays)}
    grads = {k: rng.standard_normal(per) * 0.01 for k in params}
    cfg = samopt.OptimizerConfig(learning_rate=1e-3)
    makers: dict[str, Callable[[], Any]] = {
        "lamb": lambda: samopt.LambOptimizer(cfg),
        "sam_lamb": lambda: samopt.SamOptimizer(samopt.LambOptimizer(cfg), RHO),
        "lars": lambda: samopt.LarsOptimizer(samopt.OptimizerConfig(0.1), 0.001),
        "sam_lars": lambda: samopt.SamOptimizer(
            samopt.LarsOptimizer(samopt.OptimizerConfig(0.1), 0.001), RHO
        ),
        "lookahead_adam": lambda: samopt.LookaheadOptimizer(samopt.AdamOptimizer(cfg), 0.5, 1),
        "sophia": lambda: samopt.SophiaOptimizer(),
        "adamp": lambda: samopt.AdamPOptimizer(cfg),
        "sam_adamp": lambda: samopt.SamOptimizer(samopt.AdamPOptimizer(cfg), RHO),
    }
    matrices = {k: g.reshape(-1, 1000) for k, g in grads.items()}
    fns: dict[str, Callable[[], None]] = {}
    for kind, make in makers.items():
        opt, p = make(), copy_params(params)
        g = grads
        if kind.endswith("adamp"):
            p, g = {k: v.reshape(-1, 1000) for k, v in p.items()}, matrices
        if kind.startswith("sam_"):
            fns[f"samopt/{kind}"] = lambda o=opt, p=p, g=g: (o.first_step(p, g),
                                                             o.second_step(p, g)) and None
        else:
            fns[f"samopt/{kind}"] = lambda o=opt, p=p, g=g: o.step(p, g)
    numpy_params = copy_params(params)
    numpy_lamb = NumpyLamb(numpy_params)
    fns["numpy/lamb"] = lambda: numpy_lamb.step(numpy_params, grads)
    check_params = copy_params(params)
    check_opt = samopt.LambOptimizer(cfg)
    check_numpy = copy_params(params)
    check_ref = NumpyLamb(check_numpy)
    for _ in range(3):
        check_opt.step(check_params, grads)
        check_ref.step(check_numpy, grads)
    agreement = rel_err(check_params, check_numpy)
    streaming, streamed = streaming_fn(1 << (22 if args.quick else 24), os.cpu_count() or 1)
    fns["bandwidth"] = streaming
    reps = {"reps": 3, "warmup": 1, "min_time": 0.05} if args.quick else {
        "reps": 7, "warmup": 2, "min_time": 0.3}
    timed = bench_interleaved(fns, **reps)
    gbps = streamed / timed.pop("bandwidth")["median_s"] / 1e9
    param_bytes_total = n_arrays * per * 8
    print(f"layer-wise rows, {n_arrays} x {per} float64, RAYON_NUM_THREADS="
          f"{os.environ.get('RAYON_NUM_THREADS', 'all')}; bandwidth streamed among the rows "
          f"{gbps:.1f} GB/s; samopt LAMB vs NumPy LAMB after 3 steps: rel err {agreement:.2g}")
    print(f"{'row':<22} {'time':>9} {'streams':>7} {'floor':>9} {'/floor':>7}")
    results = []
    for name, r in timed.items():
        kind = name.split("/", 1)[1]
        streams = LAYERWISE_STREAMS[kind]
        floor = streams * param_bytes_total / (gbps * 1e9)
        results.append({"row": name, **r, "streams": streams, "floor_s": floor,
                        "floor_GBps": gbps, "agreement": agreement})
        print(f"{name:<22} {fmt_t(r['median_s']):>9} {streams:>7} {fmt_t(floor):>9} "
              f"{r['median_s'] / floor:>7.2f}")
    lamb = timed["samopt/lamb"]["median_s"]
    print(f"samopt LAMB vs NumPy LAMB: {timed['numpy/lamb']['median_s'] / lamb:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


# Issue 17: the other element-wise optimizers, each against its own floor
# --------------------------------------------------------------------------------------------
# Streams each step must move, in parameter bytes: read p, g and each slot, write p and each
# slot. SAM adds 5 (norm 1, perturb-and-save 4; the restore is fused into the update, which
# reads the saved values instead of p). samopt reads g once more (the finiteness check).
ELEMENTWISE_SLOTS = {
    "adagrad": 1, "rmsprop": 1, "lion": 1, "nadam": 2, "adamax": 2, "radam": 2, "adabelief": 2,
    "schedulefree": 2,  # ScheduleFreeAdamW: z - y and v
    "adam": 2,  # the yardstick: issue 3's Adam, in the same minutes
    "prodigy": 4,  # exp_avg, exp_avg_sq, s, x0 − x; its two sums ride on the same pass
}
ELEMENTWISE_ROWS = (
    *ELEMENTWISE_SLOTS, "sam_rmsprop", "sam_lion", "sam_adam", "sam_schedulefree",
    "numpy_rmsprop", "numpy_lion",
    "numpy_sam_lion",
    "sam_prodigy",
)
LION_LR, LION_BETA1, LION_BETA2, LION_WD = 1e-4, 0.9, 0.99, 0.01


def elementwise_streams(row: str) -> int:
    base = row.split("_")[-1]
    return 3 + 2 * ELEMENTWISE_SLOTS[base] + (5 if "sam" in row else 0)


def elementwise_samopt(row: str) -> Any:
    samopt = importlib.import_module("samopt")
    base = row.split("_")[-1]
    if base == "lion":
        opt = samopt.LionOptimizer(samopt.LionConfig(weight_decay=LION_WD))
    else:
        names = {"adagrad": "AdagradOptimizer", "rmsprop": "RMSpropOptimizer",
                 "nadam": "NAdamOptimizer", "adamax": "AdaMaxOptimizer",
                 "radam": "RAdamOptimizer", "adabelief": "AdaBeliefOptimizer",
                 "adam": "AdamOptimizer", "schedulefree": "ScheduleFreeAdamW",
                 "prodigy": "ProdigyOptimizer"}
        opt = getattr(samopt, names[base])()
    return samopt.SamOptimizer(opt, rho=RHO) if row.startswith("sam_") else opt


class NumpyElementwise:
    """RMSprop (alpha = beta2, the crate's) and Lion (decoupled decay), bare or under SAM,
    as a careful NumPy user writes them: in-place ufuncs, one preallocated scratch buffer,
    SAM's restore fused into the last ufunc of the update."""

    def __init__(self, params: dict[str, np.ndarray], base: str, sam: bool) -> None:
        self.base = base
        self.sam = sam
        self.pending = False
        self.state = {k: np.zeros_like(p) for k, p in params.items()}
        self.saved = {k: np.empty_like(p) for k, p in params.items()} if sam else {}
        biggest = max(p.size for p in params.values())
        scratch = {dt: np.empty(biggest, dtype=dt) for dt in {p.dtype for p in params.values()}}
        self.s = {k: scratch[p.dtype][: p.size].reshape(p.shape) for k, p in params.items()}

    first_step = NumpyOpt.first_step

    def second_step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        pending, self.pending = self.pending, False
        for name, p in params.items():
            g, s, state = grads[name], self.s[name], self.state[name]
            start = self.saved[name] if pending else p
            if self.base == "rmsprop":
                np.multiply(state, BETA2, out=state)
                np.multiply(g, g, out=s)
                np.multiply(s, 1.0 - BETA2, out=s)
                np.add(state, s, out=state)
                np.sqrt(state, out=s)
                np.add(s, EPS, out=s)
                np.divide(g, s, out=s)
                np.multiply(s, LR, out=s)
                np.subtract(start, s, out=p)
            else:
                # sign(b1*m + (1-b1)*g) as the sign of b1/(1-b1)*m + g: one scratch buffer.
                np.multiply(state, LION_BETA1 / (1.0 - LION_BETA1), out=s)
                np.add(s, g, out=s)
                np.sign(s, out=s)
                np.multiply(s, LION_LR, out=s)
                np.multiply(start, 1.0 - LION_LR * LION_WD, out=p)
                np.subtract(p, s, out=p)
                np.multiply(state, LION_BETA2, out=state)
                np.multiply(g, 1.0 - LION_BETA2, out=s)
                np.add(state, s, out=state)

    step = second_step


def elementwise_step_fn(
    row: str, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
) -> Callable[[], None]:
    sam = "sam" in row
    if row.startswith("numpy_"):
        opt: Any = NumpyElementwise(params, row.split("_")[-1], sam)
    else:
        opt = elementwise_samopt(row)
    if not sam:
        return lambda: opt.step(params, grads)

    def full() -> None:
        opt.first_step(params, grads)
        opt.second_step(params, grads)

    return full


def elementwise_check(spec: dict[str, Any]) -> dict[str, float]:
    """NumPy against samopt from the same values over 3 steps (worst relative error)."""
    out = {}
    for row in ("rmsprop", "lion", "sam_rmsprop", "sam_lion"):
        params, grads = make_data(spec, seed=3)
        mine, theirs = copy_params(params), copy_params(params)
        ours = elementwise_step_fn(row, mine, grads)
        reference = NumpyElementwise(theirs, row.split("_")[-1], "sam" in row)
        for _ in range(3):
            ours()
            if "sam" in row:
                reference.first_step(theirs, grads)
            reference.second_step(theirs, grads)
        out["numpy_" + row] = rel_err(mine, theirs)
    return out


def elementwise_mode(args: argparse.Namespace) -> int:
    """Issue 17's rows at one size, interleaved with a streaming row in one process: each
    optimizer's time against the bytes it must move at the bandwidth of the same minutes."""
    spec = dict(size_specs(args.quick)[0])
    spec["dtype"] = args.dtype
    if args.dtype == "float32":
        spec["key"], spec["label"] = spec["key"].replace("f64", "f32"), spec["label"].replace(
            "f64", "f32"
        )
    threads = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)
    errors = elementwise_check(spec)
    params, grads = make_data(spec)
    fns = {}
    for row in ELEMENTWISE_ROWS:
        data = copy_params(params)
        fns[row] = elementwise_step_fn(row, data, grads)
    stream_elems = max(4 * param_bytes(spec) // 8, 4 * l3_bytes() // 8)
    fns["stream"], stream_bytes = streaming_fn(stream_elems, threads)
    reps, warmup, min_time = (3, 1, 0.05) if args.quick else (9, 2, 0.3)
    timed = bench_interleaved(fns, reps, warmup, min_time)
    bandwidth = stream_bytes / timed["stream"]["median_s"]
    pb = param_bytes(spec)
    rows = []
    print(f"{spec['label']}, RAYON_NUM_THREADS={threads}, streaming "
          f"{bandwidth / 1e9:.1f} GB/s among the rows (np.add over {threads} threads)")
    print(f"{'row':<16} {'time':>9} {'streams':>7} {'floor':>9} {'/ floor':>7}")
    for row in ELEMENTWISE_ROWS:
        streams = elementwise_streams(row)
        floor = streams * pb / bandwidth
        median = timed[row]["median_s"]
        rows.append({"row": row, "median_s": median, "streams": streams, "floor_s": floor,
                     "vs_floor": median / floor, "cpu_per_wall": timed[row]["cpu_per_wall"]})
        print(f"{row:<16} {fmt_t(median):>9} {streams:>7} {fmt_t(floor):>9} "
              f"{median / floor:>7.2f}")
    for name, numpy_row in (("RMSprop", "rmsprop"), ("Lion", "lion"), ("SAM(Lion)", "sam_lion")):
        ratio = timed["numpy_" + numpy_row]["median_s"] / timed[numpy_row]["median_s"]
        print(f"samopt {name} is {ratio:.2f}x NumPy's")
    print("NumPy vs samopt, 3 steps, worst relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    result = {"size": spec, "threads": threads, "bandwidth_Bps": bandwidth, "rows": rows,
              "numpy_vs_samopt_rel_err": errors, "machine": machine_info()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="seconds-long smoke: small sizes, few reps"
    )
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the figures "
        "(default benches/results.json, or benches/results_quick.json with --quick)",
    )
    ap.add_argument(
        "--check", action="store_true", help="only compare the NumPy baseline with samopt"
    )
    ap.add_argument(
        "--threads", default="1,2", help="RAYON_NUM_THREADS settings to run (default 1,2)"
    )
    ap.add_argument(
        "--no-torch", action="store_true", help="skip the torch row even if torch is importable"
    )
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-check", action="store_true", help="skip the baseline-vs-samopt check")
    ap.add_argument("--silent", action="store_true", help="no progress messages on stderr")
    ap.add_argument(
        "--sweep", action="store_true", help="cost per array against the array count (issue 16)"
    )
    ap.add_argument("--compare", metavar="PYTHON", help="--sweep: also run under this interpreter")
    ap.add_argument("--plot", metavar="PNG", help="--sweep: plot us per array against count")
    ap.add_argument(
        "--labels", metavar="COMPARED,THIS", help="--sweep: names of the two builds in the report"
    )
    ap.add_argument(
        "--worker", choices=("rows", "rss", "sweep", "million", "million_flat"),
        help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--layerwise",
        action="store_true",
        help="only the LAMB, LARS, Lookahead and Sophia rows (10M float64) against their floors",
    )
    ap.add_argument(
        "--elementwise",
        action="store_true",
        help="issue 17's optimizers at 10M (200k with --quick), each against its floor",
    )
    ap.add_argument(
        "--dtype", default="float64", choices=("float64", "float32"),
        help="the parameters' dtype for --elementwise",
    )
    ap.add_argument("--numpy-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="20", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        workers = {
            "rows": worker_rows,
            "rss": worker_rss,
            "sweep": worker_sweep,
            "million": worker_million,
            "million_flat": worker_million,
        }
        out = workers[args.worker](args)
        with open(args.out, "w") as f:
            json.dump(out, f, default=str)
        return 0
    if args.check:
        return check_mode(args)
    if args.sweep:
        return orchestrate_sweep(args)
    if args.layerwise:
        return layerwise_mode(args)
    if args.elementwise:
        return elementwise_mode(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
