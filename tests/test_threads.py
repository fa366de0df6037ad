"""Threads (issue 5, point 4): samopt's kernels run without the GIL, so Python threads
really run them at the same time. Checked here, with arrays large enough (over a million
elements) that the calls overlap:

- the GIL is released during a kernel (another Python thread makes progress meanwhile);
- two threads stepping one optimizer at once never corrupt it: the result is bitwise that
  of the same calls made one after the other in some order (identical gradients: exactly
  two sequential steps; SAM's first_step/second_step pairs: one of the interleavings);
- many optimizers stepped in parallel threads give bitwise the results of sequential runs;
- two optimizers stepping the same arrays at once (or one writing an array that the other
  reads as a gradient) either serialise or raise a TrainError, never a data race or a
  panic: the outcome is bitwise that of the calls that succeeded, in some order.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    GsamOptimizer,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
)

BIG = 1_200_000  # elements of the large float64 parameter (float32 one: BIG // 4)
ROUNDS = 3

CFG = OptimizerConfig(learning_rate=0.01, momentum=0.9, weight_decay=0.05, grad_clip=5.0,
                      grad_clip_mode=GradClipMode.NORM)
KINDS = ["sgd", "adam", "adamw", "sam", "asam", "gsam"]


def make_opt(kind: str) -> Any:
    base = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}
    if kind in base:
        return base[kind](CFG)
    if kind == "sam":
        return SamOptimizer(AdamOptimizer(CFG), rho=0.1)
    if kind == "asam":
        return SamOptimizer(SgdOptimizer(CFG), rho=0.5, adaptive=True, eta=0.01)
    return GsamOptimizer(AdamWOptimizer(CFG), rho_max=0.1, alpha=0.4)


def make_params(seed: int, n: int = BIG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal(n),
        "big32": rng.standard_normal(n // 4).astype(np.float32),
        "strided": rng.standard_normal((300, 200))[::2, ::-1],  # staged copy path
        "small": rng.standard_normal(7),
    }


def make_grads(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.1).astype(v.dtype) for k, v in params.items()}


def copy_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in params.items()}


def full_step(opt: Any, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
              grads2: dict[str, np.ndarray] | None = None) -> None:
    """One whole step: sam_step for the SAM family (gradients g, then grads2 at the
    perturbed point), a plain step otherwise."""
    if isinstance(opt, SamOptimizer):
        seq = iter([grads, grads2 if grads2 is not None else grads])
        opt.sam_step(params, lambda p: (0.0, next(seq)))
    else:
        opt.step(params, grads)


def outcome(opts: list[Any], params: list[dict[str, np.ndarray]]) -> Any:
    """Everything observable, bitwise: the arrays and the optimizers' state."""
    return (
        tuple(tuple((k, v.dtype.str, v.tobytes()) for k, v in sorted(p.items()))
              for p in params),
        tuple(tuple(sorted(R.state_snapshot(o.state_dict()).items())) for o in opts),
    )


def run_threads(calls: list[Callable[[], Any]]) -> list[BaseException | None]:
    """Runs the calls in threads released together; returns what each raised."""
    barrier = threading.Barrier(len(calls))
    raised: list[BaseException | None] = [None] * len(calls)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            calls[i]()
        except BaseException as e:
            raised[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hangs (deadlock?)"
    for e in raised:
        if e is not None and not isinstance(e, TrainError):
            pytest.fail(f"a thread raised {type(e).__module__}.{type(e).__name__}: {e}")
    return raised


# ----------------------------------------------------------------------------- the GIL


@pytest.mark.parametrize("kind", ["adam", "sam"])
def test_gil_released_during_kernels(kind: str) -> None:
    """While a thread is inside a step on large arrays, another Python thread runs."""
    opt = make_opt(kind)
    params = make_params(0, 4 * BIG)
    grads = make_grads(params, 1)
    full_step(opt, params, grads)  # warm-up: state allocated
    inside: list[tuple[float, float]] = []
    done = threading.Event()

    def worker() -> None:
        for _ in range(4):
            t0 = time.perf_counter()
            full_step(opt, params, grads)
            inside.append((t0, time.perf_counter()))
        done.set()

    ticks: list[float] = []
    thread = threading.Thread(target=worker)
    thread.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    thread.join()
    # ticks strictly inside a call (a margin for entering and leaving the kernel)
    during = 0
    for t0, t1 in inside:
        margin = (t1 - t0) * 0.2
        during += sum(t0 + margin < t < t1 - margin for t in ticks)
    total = sum(t1 - t0 for t0, t1 in inside)
    assert during > 100, (
        f"the main thread ran {during} loop iterations during {total * 1e3:.0f} ms of "
        "kernels: the GIL is not released")


# ----------------------------------------------------------------------------- one optimizer


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_same_optimizer_identical_grads(kind: str) -> None:
    """Both threads step the same optimizer and params with the same gradients: bitwise
    two sequential steps, every round."""
    opt, twin = make_opt(kind), make_opt(kind)
    params = make_params(1)
    twin_params = copy_params(params)
    for r in range(ROUNDS):
        grads, grads2 = make_grads(params, 10 + r), make_grads(params, 20 + r)
        run_threads([lambda g=grads, h=grads2: full_step(opt, params, g, h)] * 2)
        full_step(twin, twin_params, grads, grads2)
        full_step(twin, twin_params, grads, grads2)
        assert outcome([opt], [params]) == outcome([twin], [twin_params]), f"round {r}"


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_same_optimizer_different_grads(kind: str) -> None:
    """Different gradients: bitwise one of the two sequential orders."""
    opt = make_opt(kind)
    params = make_params(2)
    state = R.state_snapshot(opt.state_dict())
    for r in range(ROUNDS):
        ga, gb = make_grads(params, 30 + r), make_grads(params, 40 + r)
        start = copy_params(params)
        candidates = []
        for order in ((ga, gb), (gb, ga)):
            twin = make_opt(kind)
            twin.load_state_dict(opt.state_dict())
            p = copy_params(start)
            for g in order:
                full_step(twin, p, g)
            candidates.append(outcome([twin], [p]))
        assert R.state_snapshot(opt.state_dict()) == state
        run_threads([lambda ga=ga: full_step(opt, params, ga),
                     lambda gb=gb: full_step(opt, params, gb)])
        assert outcome([opt], [params]) in candidates, f"round {r}: not a sequential order"
        state = R.state_snapshot(opt.state_dict())


def _interleavings(a: list[Any], b: list[Any]) -> list[list[tuple[int, Any]]]:
    n = len(a) + len(b)
    out = []
    for positions in itertools.combinations(range(n), len(a)):
        ia, ib = iter(a), iter(b)
        out.append([(0, next(ia)) if i in positions else (1, next(ib)) for i in range(n)])
    return out


@pytest.mark.parametrize("kind", ["sam", "asam", "gsam"])
def test_two_threads_first_and_second_steps(kind: str) -> None:
    """Each thread calls first_step then second_step on one SAM optimizer, stopping at its
    first error. Whatever the timing, the result (arrays, state, and which calls failed)
    is bitwise that of one interleaving of those calls made sequentially."""
    opt = make_opt(kind)
    params = make_params(3)
    for r in range(ROUNDS):
        g = [(make_grads(params, 50 + r), make_grads(params, 60 + r)),
             (make_grads(params, 70 + r), make_grads(params, 80 + r))]

        def calls(o: Any, p: dict[str, np.ndarray], t: int,
                  g: list[Any] = g) -> list[Callable[[], None]]:
            return [lambda: o.first_step(p, g[t][0]), lambda: o.second_step(p, g[t][1])]

        start, start_state = copy_params(params), opt.state_dict()
        candidates = set()
        for order in _interleavings([0, 1], [0, 1]):
            twin = make_opt(kind)
            twin.load_state_dict(start_state)
            p = copy_params(start)
            failed = [False, False]
            for t, i in order:
                if failed[t]:
                    continue
                try:
                    calls(twin, p, t)[i]()
                except TrainError:
                    failed[t] = True
            candidates.add((outcome([twin], [p]), tuple(failed)))

        def thread(t: int) -> None:
            for call in calls(opt, params, t):
                call()  # an error ends the thread, as in the sequential model

        raised = run_threads([lambda: thread(0), lambda: thread(1)])
        got = (outcome([opt], [params]), tuple(e is not None for e in raised))
        assert got in candidates, f"round {r}: no sequential interleaving gives this"
        if opt.pending:
            opt.restore(params)


def _digest(opt: Any) -> str:
    h = hashlib.sha256()
    for key, (dtype, shape, data) in R.state_snapshot(opt.state_dict()).items():
        h.update(f"{key}|{dtype}|{shape}|".encode())
        h.update(data)
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["adam", "sam", "gsam"])
def test_state_dict_during_steps_is_never_torn(kind: str) -> None:
    """state_dict() called while another thread steps returns the state before or after
    some step, never a mix of two (checkpointing from a monitoring thread)."""
    opt, twin = make_opt(kind), make_opt(kind)
    params = make_params(5)
    twin_params = copy_params(params)
    steps = 4
    grads = [(make_grads(params, 90 + i), make_grads(params, 95 + i)) for i in range(steps)]
    valid = {_digest(twin)}
    for g, h in grads:
        full_step(twin, twin_params, g, h)
        valid.add(_digest(twin))
    seen: list[str] = []
    done = threading.Event()

    def stepper() -> None:
        for g, h in grads:
            full_step(opt, params, g, h)
        done.set()

    def reader() -> None:
        while not done.is_set():
            seen.append(_digest(opt))

    run_threads([stepper, reader])
    assert seen, "the reader never ran"
    torn = sum(d not in valid for d in seen)
    assert not torn, f"{torn} of {len(seen)} state_dict() calls saw a torn state"
    assert _digest(opt) == _digest(twin)


# ----------------------------------------------------------------------------- many optimizers


def test_many_optimizers_in_parallel_match_sequential_runs() -> None:
    """One optimizer per kind, each on its own arrays, all stepped at once in threads:
    bitwise what each gives when run alone."""
    opts = [make_opt(k) for k in KINDS]
    twins = [make_opt(k) for k in KINDS]
    params = [make_params(100 + i, BIG // 2) for i in range(len(KINDS))]
    twin_params = [copy_params(p) for p in params]
    steps = 3
    grads = [[make_grads(p, 1000 * i + s) for s in range(2 * steps)]
             for i, p in enumerate(params)]

    def run(o: Any, p: dict[str, np.ndarray], gs: list[dict[str, np.ndarray]]) -> None:
        for s in range(steps):
            if isinstance(o, SamOptimizer):
                o.first_step(p, gs[2 * s])
                o.second_step(p, gs[2 * s + 1])
            else:
                o.step(p, gs[2 * s])

    run_threads([lambda i=i: run(opts[i], params[i], grads[i]) for i in range(len(opts))])
    for i in range(len(opts)):
        run(twins[i], twin_params[i], grads[i])
        assert outcome([opts[i]], [params[i]]) == outcome([twins[i]], [twin_params[i]]), (
            KINDS[i])


# ----------------------------------------------------------------------------- shared arrays


def _check_shared(make: Callable[[], tuple[list[Any], list[dict[str, np.ndarray]],
                                           list[Callable[..., None]]]],
                  rounds: int = 4) -> dict[str, int]:
    """Runs two calls at once (each may be refused with a TrainError) and checks the
    outcome is bitwise that of the calls that succeeded, in some sequential order.
    `make()` builds fresh (optimizers, arrays, calls), calls taking (opts, arrays)."""
    seen = {"both": 0, "refused": 0}
    for r in range(rounds):
        opts, arrays, calls = make()
        before = outcome(opts, arrays)
        raised = run_threads([lambda c=c, o=opts, a=arrays: c(o, a) for c in calls])
        ok = [i for i, e in enumerate(raised) if e is None]
        candidates = set()
        for order in itertools.permutations(ok):
            o2, a2, c2 = make()
            assert outcome(o2, a2) == before
            for i in order:
                c2[i](o2, a2)
            candidates.add(outcome(o2, a2))
        assert outcome(opts, arrays) in candidates, (
            f"round {r}: {len(ok)} call(s) succeeded, but the result is no sequential "
            "order of them (a data race?)")
        seen["both" if len(ok) == len(calls) else "refused"] += 1
    return seen


@pytest.mark.parametrize("kind,method", [("sgd", "step"), ("adam", "step"),
                                         ("adamw", "step"), ("sam", "first_step"),
                                         ("gsam", "first_step")])
def test_two_optimizers_same_arrays(kind: str, method: str) -> None:
    """Each call is one native call (a sam_step of two optimizers on the same arrays would
    interleave their phases, which is the caller's mistake, not a race)."""
    def make() -> Any:
        opts = [make_opt(kind), make_opt(kind)]
        params = make_params(7)
        ga, gb = make_grads(params, 8), make_grads(params, 9)
        return opts, [params], [lambda o, a: getattr(o[0], method)(a[0], ga),
                                lambda o, a: getattr(o[1], method)(a[0], gb)]

    _check_shared(make)


def test_one_optimizer_writes_what_another_reads_as_gradient() -> None:
    """Thread A steps params P with gradients G while thread B steps G as its params."""
    def make() -> Any:
        opts = [make_opt("adam"), make_opt("sgd")]
        p = make_params(11)
        g = make_grads(p, 12)
        g2 = make_grads(g, 13)
        return opts, [p, g], [lambda o, a: o[0].step(a[0], a[1]),
                              lambda o, a: o[1].step(a[1], g2)]

    _check_shared(make)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_steps_like_its_parent() -> None:
    """Helper threads do not survive fork(): a child (multiprocessing's default start on
    Linux) must still step, alone, to the same bits as its parent, and never hang."""
    opt = make_opt("sam")
    params = make_params(21)
    for seed in (1, 2):  # the helper threads exist, busy or just done, when forking
        opt.first_step(params, make_grads(params, seed))
        opt.second_step(params, make_grads(params, seed + 10))
    expected = copy_params(params)
    expected_opt = pickle.loads(pickle.dumps(opt))
    expected_opt.first_step(expected, make_grads(expected, 3))
    expected_opt.second_step(expected, make_grads(expected, 13))
    digest = hashlib.sha256(b"".join(expected[k].tobytes() for k in sorted(expected)))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: step, report the digest, leave without pytest's teardown
        status = 1
        try:
            os.close(read_end)
            opt.first_step(params, make_grads(params, 3))
            opt.second_step(params, make_grads(params, 13))
            got = hashlib.sha256(b"".join(params[k].tobytes() for k in sorted(params)))
            os.write(write_end, got.hexdigest().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in a step")
    with os.fdopen(read_end, "rb") as pipe:
        reported = pipe.read().decode()
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert reported == digest.hexdigest()
