"""Subprocess worker of tests/test_interrupts.py (issue 12): interrupts one kind of long
native call with SIGALRM -> KeyboardInterrupt at several offsets and reports, per offset,
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

One JSON object per trial is printed on stdout (the test asserts on them); anything the
worker itself did not expect makes it exit non-zero with a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

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


def sam_step_call(opt: Any, p: dict) -> None:
    opt.sam_step(p, GRAD_FN)


def sam_step_prepare(opt: Any, p: dict) -> None:
    opt.sam_step(p, GRAD_FN)


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
}


# ----------------------------------------------------------------------------- running


def interrupted_call(call: Callable[[], None], offset: float | None) -> bool:
    """Runs `call` with SIGALRM armed `offset` seconds ahead (None: not armed; the call
    may raise SIGALRM itself). True when a KeyboardInterrupt was caught."""
    signal.signal(signal.SIGALRM, signal.default_int_handler)
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
        t0 = time.perf_counter()
        sc.call(ref, params)
        t1 = time.perf_counter()
        durations.append(t1 - t0)
        snap = Snapshot(params, ref)
        if new is not None:
            assert classify(snap.params, ref, old, new)[0] == "new", "call not deterministic"
        new = snap
        windows = [(a - t0, b - t0) for a, b in GRAD_FN.times]
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
    fractions = SAM_STEP_FRACTIONS if sam_step else FRACTIONS
    trials: list[tuple[str, float | None, int | None]] = [
        (f"{f:.1f}x", f * duration, None) for f in fractions]
    if sam_step:
        (_, e1), (s2, e2) = windows
        trials += [("grad_fn #1 (timer)", windows[0][0] + 0.5 * (e1 - windows[0][0]), None),
                   ("first_step (timer)", e1 + 0.5 * (s2 - e1), None),
                   ("grad_fn #2 (timer)", s2 + 0.5 * (e2 - s2), None),
                   ("second_step (timer)", e2 + 0.5 * (durations[-1] - e2), None),
                   ("inside grad_fn #1", None, 1), ("inside grad_fn #2", None, 2)]
    print(json.dumps({"scenario": name, "duration": duration, "windows": windows}), flush=True)

    for label, offset, inside in trials:
        opt = load(sc, params, old)
        GRAD_FN.calls, GRAD_FN.interrupt_on = 0, inside
        interrupted = interrupted_call(lambda o=opt: sc.call(o, params), offset)
        GRAD_FN.interrupt_on = None
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
