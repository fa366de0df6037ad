"""Subprocess worker of tests/test_interrupts.py (issue 12): interrupts one kind of long
call with SIGINT (raised by a SIGALRM timer) at several offsets and reports, per offset,
which consistent state (if any) the interrupt left behind.

Usage: python interrupt_worker.py <scenario>

For the scenario it builds a starting point (params of ~22M elements over three arrays,
an optimizer with state), and computes, uninterrupted, from that starting point:
- "old": params, state_dict() and `pending` before the call;
- "new": the same after the call (and the call's duration);
- for each of old and new, the result of continuing with one more uninterrupted step.
Then, per offset, it rebuilds the starting point (a fresh optimizer loaded with the old
state_dict, params copied back in place), arms `setitimer(ITIMER_REAL, offset)` with
`signal.default_int_handler`, makes the call, catches KeyboardInterrupt, and compares
params, state_dict() and pending bitwise with old and with new. When they are one of the
two, it continues one more step and compares with the precomputed continuation.

The SAM family's calls are several native calls and Python updates in a row (held against
Ctrl-C by samopt's InterruptHold, which defers SIGINT): the SIGALRM handler raises a real
SIGINT, as Ctrl-C does, and for those scenarios ("phased") every native `samopt._core`
call of the uninterrupted run is timed, so that offsets aim at each of them and at each
gap between the gradient function's calls.

One JSON object per trial is printed on stdout (the test asserts on them); anything the
worker itself did not expect makes it exit non-zero with a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Union

import numpy as np
import samopt

CFG = samopt.OptimizerConfig(learning_rate=0.01, momentum=0.9)
SHAPES: dict[str, tuple[tuple[int, ...], Any]] = {
    "layer.a": ((2500, 4000), np.float32),  # 10M
    "layer.b": ((8_000_000,), np.float32),
    "layer.c": ((4_000_000,), np.float64),
}
FRACTIONS = (0.0, 0.3, 0.6, 0.9, 1.2)  # offsets, as fractions of the call's duration
SAM_STEP_FRACTIONS = (0.0, 1.2)  # sam_step: plus offsets aimed at each of its phases
TINY = 1e-6  # setitimer(…, 0) would disarm: "offset 0" is the smallest delay
SHORTEST_AIMED = 5e-4  # gaps shorter than this (seconds) are not aimed at


def make_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape, dtype=np.float32).astype(dt, copy=False)
            for k, (shape, dt) in SHAPES.items()}


def make_grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)).astype(dt)
            for k, (shape, dt) in SHAPES.items()}


# ----------------------------------------------------------------------------- comparisons


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind in "fiub":
        u = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(a.view(u), b.view(u)))
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def copy_arrays(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in d.items()}


class Snapshot:
    """params, state_dict() and pending at one moment (copies)."""

    def __init__(self, params: Mapping[str, np.ndarray], opt: Any) -> None:
        self.params = copy_arrays(params)
        self.state = opt.state_dict()
        self.pending = getattr(opt, "pending", None)


def items_of(params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
             pending: Any) -> dict[str, Any]:
    out: dict[str, Any] = {f"param {k}": v for k, v in params.items()}
    out.update({f"state {k}": v for k, v in state.items()})
    out["pending"] = pending
    return out


def compare(observed: dict[str, Any], ref: dict[str, Any]) -> dict[str, bool]:
    """Per item (param, state key, pending): equal bitwise to the reference's?"""
    out = {}
    for k in sorted(observed.keys() | ref.keys()):
        if k not in observed or k not in ref:
            out[k] = False
        elif k == "pending":
            out[k] = observed[k] == ref[k]
        else:
            out[k] = same_bits(observed[k], ref[k])
    return out


def classify(params: Mapping[str, np.ndarray], opt: Any, old: Snapshot,
             new: Snapshot) -> tuple[str, str]:
    """("old" | "new" | "torn", what differs)."""
    observed = items_of(params, opt.state_dict(), getattr(opt, "pending", None))
    vs_old = compare(observed, items_of(old.params, old.state, old.pending))
    vs_new = compare(observed, items_of(new.params, new.state, new.pending))
    if all(vs_new.values()):
        return "new", ""
    if all(vs_old.values()):
        return "old", ""
    parts = []
    for k in sorted(vs_old.keys() | vs_new.keys()):
        o, n = vs_old.get(k, False), vs_new.get(k, False)
        if o and n:
            continue  # the call does not change it
        label = "old" if o else "new" if n else "neither"
        if k not in observed:
            label = "missing"
        parts.append(f"{k}: {label}")
    return "torn", "; ".join(parts)


# ----------------------------------------------------------------------------- scenarios


class Scenario:
    """make: a fresh optimizer; prepare: brings it (and the params) to the starting point;
    call: the call under test; cont: one more step afterwards (from the old or new state)."""

    def __init__(self, make: Callable[[], Any], prepare: Callable[[Any, dict], None],
                 call: Callable[[Any, dict], None], cont: Callable[[Any, dict], None]) -> None:
        self.make, self.prepare, self.call, self.cont = make, prepare, call, cont


G0, G1, G2, G3 = (make_grads(s) for s in (10, 11, 12, 13))
START: dict[str, Snapshot] = {}  # the starting point, for checks inside `cont`


def base_step(opt: Any, p: dict) -> None:
    opt.step(p, G1)


def warm_base(opt: Any, p: dict) -> None:
    opt.step(p, G0)


def full_sam_step(opt: Any, p: dict, ga: Mapping, gb: Mapping) -> None:
    opt.first_step(p, ga)
    opt.second_step(p, gb)


def sam_prepare(opt: Any, p: dict) -> None:
    full_sam_step(opt, p, G0, G1)


def sam_prepare_pending(opt: Any, p: dict) -> None:
    full_sam_step(opt, p, G0, G1)
    opt.first_step(p, G2)


def cont_after_first_step(opt: Any, p: dict) -> None:
    """A pending first_step must restore the original params exactly; then a full step."""
    opt.restore(p)
    assert not opt.pending, "restore left the step pending"
    start = START["start"]
    for k in p:
        assert same_bits(p[k], start.params[k]), f"restore did not give back {k!r} bitwise"
    full_sam_step(opt, p, G2, G3)


def cont_after_second_step(opt: Any, p: dict) -> None:
    if opt.pending:
        opt.second_step(p, G3)
    else:
        full_sam_step(opt, p, G1, G3)


class GradFn:
    """grad_fn(params) -> (loss, 2*(p - 0.25)), into preallocated buffers (two sets, so the
    first call's gradients stay intact during the second call); optionally raises SIGALRM
    (-> KeyboardInterrupt) inside its n-th call, and records when each call ran."""

    def __init__(self) -> None:
        self.buffers = [{k: np.empty(shape, dt) for k, (shape, dt) in SHAPES.items()}
                        for _ in range(2)]
        self.calls = 0
        self.interrupt_on: int | None = None
        self.times: list[tuple[float, float]] = []

    def __call__(self, params: Mapping[str, np.ndarray]) -> tuple[float, dict]:
        start = time.perf_counter()
        out = self.buffers[self.calls % 2]
        self.calls += 1
        for k, p in params.items():
            np.subtract(p, p.dtype.type(0.25), out=out[k])
            out[k] *= p.dtype.type(2.0)
        if self.interrupt_on == self.calls:
            signal.raise_signal(signal.SIGALRM)  # the handler raises KeyboardInterrupt here
        self.times.append((start, time.perf_counter()))
        return 0.5, dict(out)


GRAD_FN = GradFn()


class NativeTimes:
    """Times every native `samopt._core` function call (for the phased scenarios' aimed
    offsets): each function of the module replaced by a wrapper that records it, and that
    raises SIGINT as the `interrupt_after`-th call returns — where a SIGINT that arrived
    while that call ran is handled (Python runs handlers between bytecodes), on cue."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, float]] = []
        self.calls = 0
        self.interrupt_after: int | None = None

    def install(self) -> None:
        core = samopt._core
        for name in dir(core):
            function = getattr(core, name)
            if type(function).__name__ == "builtin_function_or_method":
                setattr(core, name, self._timed(name, function))

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.times.append((name, start, time.perf_counter()))
                self.calls += 1
                if self.calls == self.interrupt_after:
                    signal.raise_signal(signal.SIGINT)

        return timed


NATIVE = NativeTimes()


def sam_step_call(opt: Any, p: dict) -> None:
    opt.sam_step(p, GRAD_FN)


def sam_step_prepare(opt: Any, p: dict) -> None:
    opt.sam_step(p, GRAD_FN)


def sgd() -> samopt.SgdOptimizer:
    return samopt.SgdOptimizer(CFG)


def adam() -> samopt.AdamOptimizer:
    return samopt.AdamOptimizer(CFG)


def splits_call(opt: Any, p: dict) -> None:
    opt.sam_step_splits(p, [GRAD_FN, GRAD_FN])


# The SAM family's phases made of several native calls (timed and aimed at one by one).
PHASED = {
    "wsam-second_step": Scenario(lambda: samopt.WsamOptimizer(sgd(), 0.05), sam_prepare_pending,
                                 lambda o, p: o.second_step(p, G1), cont_after_second_step),
    "wsam-sam_step": Scenario(lambda: samopt.WsamOptimizer(adam(), 0.05), sam_step_prepare,
                              sam_step_call, sam_step_call),
    # restore undoes the EMA update of a first_step of this process only: no restore here
    "fsam-first_step": Scenario(lambda: samopt.FriendlySamOptimizer(sgd(), 0.05), sam_prepare,
                                lambda o, p: o.first_step(p, G1), cont_after_second_step),
    "fsam-sam_step": Scenario(lambda: samopt.FriendlySamOptimizer(sgd(), 0.05),
                              sam_step_prepare, sam_step_call, sam_step_call),
    "looksam-second_step": Scenario(lambda: samopt.LookSamOptimizer(sgd(), 0.05, k=2),
                                    sam_prepare_pending, lambda o, p: o.second_step(p, G1),
                                    cont_after_second_step),
    "esam-first_step": Scenario(lambda: samopt.EsamOptimizer(sgd(), 0.05), sam_prepare,
                                lambda o, p: o.first_step(p, G1), cont_after_first_step),
    "fisher-sam_step": Scenario(lambda: samopt.FisherSamOptimizer(sgd(), 0.05),
                                sam_step_prepare, sam_step_call, sam_step_call),
    "bsam-sam_step": Scenario(lambda: samopt.BsamOptimizer(1000), sam_step_prepare,
                              sam_step_call, sam_step_call),
    # p = 1: every call a SAM step (of the native SamOptimizer); p = 0: every one a base step
    "randomized-sam_step": Scenario(
        lambda: samopt.RandomizedSam(samopt.SamOptimizer(sgd(), 0.05), 1.0),
        sam_step_prepare, sam_step_call, sam_step_call),
    "randomized-base_step": Scenario(
        lambda: samopt.RandomizedSam(samopt.SamOptimizer(sgd(), 0.05), 0.0),
        sam_step_prepare, sam_step_call, sam_step_call),
    "sam-sam_step_splits": Scenario(lambda: samopt.SamOptimizer(sgd(), 0.05), splits_call,
                                    splits_call, splits_call),
    # each split's ascent updates F-SAM's EMA: an interrupted step must keep none of them
    "fsam-sam_step_splits": Scenario(lambda: samopt.FriendlySamOptimizer(sgd(), 0.05),
                                     splits_call, splits_call, splits_call),
    # and ESAM's draw count, once per split
    "esam-sam_step_splits": Scenario(lambda: samopt.EsamOptimizer(sgd(), 0.05),
                                     splits_call, splits_call, splits_call),
}

SCENARIOS = {
    "sgd-step": Scenario(lambda: samopt.SgdOptimizer(CFG), warm_base, base_step, base_step),
    "adam-step": Scenario(lambda: samopt.AdamOptimizer(CFG), warm_base, base_step, base_step),
    # a fresh AdamW: the interrupted call also creates m and v
    "adamw-first-step": Scenario(lambda: samopt.AdamWOptimizer(CFG), lambda o, p: None,
                                 base_step, base_step),
    "sam-first_step": Scenario(lambda: samopt.SamOptimizer(samopt.AdamOptimizer(CFG), 0.05),
                               sam_prepare, lambda o, p: o.first_step(p, G1),
                               cont_after_first_step),
    "sam-second_step": Scenario(lambda: samopt.SamOptimizer(samopt.AdamOptimizer(CFG), 0.05),
                                sam_prepare_pending, lambda o, p: o.second_step(p, G1),
                                cont_after_second_step),
    "sam_step-sgd": Scenario(lambda: samopt.SamOptimizer(samopt.SgdOptimizer(CFG), 0.05),
                             sam_step_prepare, sam_step_call, sam_step_call),
    "sam_step-adam": Scenario(lambda: samopt.SamOptimizer(samopt.AdamOptimizer(CFG), 0.05),
                              sam_step_prepare, sam_step_call, sam_step_call),
    **PHASED,
}


# ----------------------------------------------------------------------------- running


def interrupted_call(call: Callable[[], None], offset: float | None) -> bool:
    """Runs `call` with SIGALRM armed `offset` seconds ahead (None: not armed; the call
    may raise SIGALRM itself); SIGALRM raises SIGINT, which `signal.default_int_handler`
    (or a hold of samopt's) turns into KeyboardInterrupt. True when one was caught."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGALRM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        if offset is not None:
            signal.setitimer(signal.ITIMER_REAL, max(offset, TINY))
        try:
            call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        return True
    return False


Trial = tuple[str, Union[float, None], Union[int, None], Union[int, None]]
"""label, timer offset, the grad_fn call to interrupt inside, the native call to interrupt
as it returns"""


def aimed_trials(windows: list[tuple[float, float]], natives: list[tuple[str, float, float]],
                 end: float) -> list[Trial]:
    """A SIGINT as each native call returns; timer offsets at the middle of each grad_fn
    call and of each gap after one (the native phases of a native sam_step); and an
    interrupt raised inside each grad_fn call."""
    trials: list[Trial] = [(f"as {native} #{i + 1} returns", None, None, i + 1)
                           for i, (native, _, _) in enumerate(natives)]
    if not windows:
        return trials
    for i, (s, e) in enumerate(windows):
        trials.append((f"grad_fn #{i + 1} (timer)", 0.5 * (s + e), None, None))
    bounds = [t for w in windows for t in w]
    gaps = [(f"after grad_fn #{i + 1} (timer)", bounds[2 * i + 1], b)
            for i, b in enumerate([*bounds[2::2], end])]
    trials += [(label, 0.5 * (a + b), None, None)
               for label, a, b in gaps if b - a >= SHORTEST_AIMED]
    trials += [(f"inside grad_fn #{i + 1}", None, i + 1, None) for i in range(len(windows))]
    return trials


def load(sc: Scenario, params: dict[str, np.ndarray], snap: Snapshot) -> Any:
    """A fresh optimizer loaded with `snap`'s state, and the params (in place) set to it."""
    opt = sc.make()
    opt.load_state_dict(snap.state)
    for k, v in snap.params.items():
        np.copyto(params[k], v)
    return opt


def main() -> int:
    name = sys.argv[1]
    sc = SCENARIOS[name]
    phased = name in PHASED
    if phased:
        NATIVE.install()
    params = make_params(0)
    opt = sc.make()
    sc.prepare(opt, params)
    old = Snapshot(params, opt)
    # A pending first_step claims its arrays until it ends: every call below runs on a fresh
    # optimizer loaded with this state, so this one must let go of them.
    del opt
    START["start"] = old

    # the uninterrupted call, twice (its duration: the faster of the two)
    durations = []
    new = None
    for _ in range(2):
        ref = load(sc, params, old)
        GRAD_FN.times.clear()
        NATIVE.times.clear()
        t0 = time.perf_counter()
        sc.call(ref, params)
        t1 = time.perf_counter()
        durations.append(t1 - t0)
        snap = Snapshot(params, ref)
        if new is not None:
            assert classify(snap.params, ref, old, new)[0] == "new", "call not deterministic"
        new = snap
        windows = [(a - t0, b - t0) for a, b in GRAD_FN.times]
        natives = [(n, a - t0, b - t0) for n, a, b in NATIVE.times if a < t1]
    assert new is not None
    duration = min(durations)
    assert classify(new.params, ref, old, new)[0] == "new"

    continued = {}
    for label, snap in (("old", old), ("new", new)):
        ref = load(sc, params, snap)
        sc.cont(ref, params)
        continued[label] = Snapshot(params, ref)

    # offsets: fractions of the duration; for sam_step also aimed at its phases: inside each
    # grad_fn call, and the native calls between and after them
    sam_step = name.startswith("sam_step")
    fractions = SAM_STEP_FRACTIONS if sam_step or phased else FRACTIONS
    trials: list[Trial] = [(f"{f:.1f}x", f * duration, None, None) for f in fractions]
    if phased:
        trials += aimed_trials(windows, natives, durations[-1])
    if sam_step:
        (_, e1), (s2, e2) = windows
        trials += [("grad_fn #1 (timer)", windows[0][0] + 0.5 * (e1 - windows[0][0]), None, None),
                   ("first_step (timer)", e1 + 0.5 * (s2 - e1), None, None),
                   ("grad_fn #2 (timer)", s2 + 0.5 * (e2 - s2), None, None),
                   ("second_step (timer)", e2 + 0.5 * (durations[-1] - e2), None, None),
                   ("inside grad_fn #1", None, 1, None), ("inside grad_fn #2", None, 2, None)]
    print(json.dumps({"scenario": name, "duration": duration, "windows": windows,
                      "natives": natives}), flush=True)

    for label, offset, inside, after_native in trials:
        opt = load(sc, params, old)
        GRAD_FN.calls, GRAD_FN.interrupt_on = 0, inside
        NATIVE.calls, NATIVE.interrupt_after = 0, after_native
        interrupted = interrupted_call(lambda o=opt: sc.call(o, params), offset)
        GRAD_FN.interrupt_on = NATIVE.interrupt_after = None
        outcome, detail = classify(params, opt, old, new)
        cont_ok, cont_detail = None, ""
        if outcome in ("old", "new"):
            try:
                sc.cont(opt, params)
            except BaseException as e:  # a PanicException is no Exception
                cont_ok, cont_detail = False, f"{type(e).__module__}.{type(e).__name__}: {e}"
            else:
                want = continued[outcome]
                again, cont_detail = classify(params, opt, want, want)
                cont_ok = again != "torn"
        print(json.dumps({
            "trial": label, "offset": offset, "interrupted": interrupted,
            "expect": "old" if inside else None, "outcome": outcome, "detail": detail,
            "continued": cont_ok, "continue_detail": cont_detail[:500],
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
