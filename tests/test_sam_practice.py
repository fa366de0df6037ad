"""Issue 4, "SAM in practice", points 1-3, against the float64 reference (tests/reference.py):

1. `SamOptimizer.sam_step(params, grad_fn)` and `interval=k`: where and how often grad_fn is
   called, what it returns, equality with first_step/grad/second_step, the `sam_calls`
   counter through a checkpoint, and atomic errors (sam_step restores);
2. `rho` as a validated read/write property (rho schedules) and `eps` (rho*g/(||g||+eps));
3. GSAM (Zhuang et al., ICLR 2022): the decomposition g0 = g0_par + g0_perp, trajectories
   over SGD/Adam/AdamW and a Python-written base, the rho schedule with rho_min, exact
   restore, atomic errors, pending state dicts, and alpha = 0 being plain SAM bitwise.

Tolerances are SPEC's: relative error <= 1e-12 for float64 arrays and <= 2e-5 for float32,
over 100-step trajectories.

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
)

STEPS = 100  # trajectories; the property tests too
CHECK_AT = {0, 1, 9, 50, STEPS - 1}
BASES = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}
PER_PARAM_PREFIXES = ("velocity_", "m_", "v_", "saved_", "grad0_")

# ----------------------------------------------------------------------------- arrays

MIXED_SPECS = (
    dict(name="conv.w", shape=(3, 2, 4), dtype=np.float32, layout="strided",
         gdtype=np.float16, glayout="F", gscale=1.0),
    dict(name="fc.w", shape=(6, 5), dtype=np.float64, layout="transposed",
         gdtype=np.float32, glayout="strided", gscale=30.0),
    dict(name="fc.b", shape=(5,), dtype=np.float64, layout="reversed",
         gdtype=np.float64, glayout="C", gscale=0.01),
    dict(name="scale", shape=(), dtype=np.float32, layout="C",
         gdtype=np.float64, glayout="C", gscale=1.0),
    dict(name="empty", shape=(0, 3), dtype=np.float64, layout="F",
         gdtype=np.float32, glayout="C", gscale=1.0),
    dict(name="f", shape=(4, 3), dtype=np.float64, layout="F",
         gdtype=np.float64, glayout="transposed", gscale=1.0),
)


def specs_of(dtypes: str) -> list[dict[str, Any]]:
    specs = [dict(s) for s in MIXED_SPECS]
    if dtypes == "float64":
        for s in specs:
            s["dtype"] = np.float64
    return specs


NAMES = ["w", "layer1.weight", "layer1.bias", "emb/λ", "z0", "head.out"]
MAX_DIM = {0: 1, 1: 60, 2: 8, 3: 4}


@st.composite
def array_specs(draw: Any, max_arrays: int = 4) -> list[dict[str, Any]]:
    n = draw(st.integers(1, max_arrays))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    specs = []
    for name in names:
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.integers(0, MAX_DIM[ndim])) for _ in range(ndim))
        specs.append(dict(
            name=name, shape=shape,
            dtype=draw(st.sampled_from([np.float32, np.float64])),
            layout=draw(st.sampled_from(R.LAYOUTS)),
            gdtype=draw(st.sampled_from([np.float16, np.float32, np.float64])),
            glayout=draw(st.sampled_from(R.LAYOUTS)),
            gscale=draw(st.sampled_from([0.01, 1.0, 30.0])),
        ))
    if all(math.prod(s["shape"]) == 0 for s in specs):
        specs[0]["shape"] = (3,)
    return specs


def build_params(specs: list[dict[str, Any]], rng: np.random.Generator
                 ) -> tuple[dict[str, R.Holder], dict[str, np.ndarray], dict[str, np.ndarray]]:
    holders = {}
    for s in specs:
        vals = rng.standard_normal(s["shape"]) * rng.choice([0.1, 1.0, 5.0])
        holders[s["name"]] = R.make_array(vals, s["dtype"], s["layout"])
    params = {k: h.array for k, h in holders.items()}
    ref_params = {k: p.astype(np.float64) for k, p in params.items()}
    return holders, params, ref_params


def grad_pair(specs: list[dict[str, Any]], rng: np.random.Generator, mode: str = ""
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(g0, g1) in each spec's gradient dtype and layout. g1 = c*g0 + noise, with one c in
    [-1, 2] per call, so that g0 has a sizeable part parallel to g1 (positive or negative);
    mode "zero0"/"zero1" makes g0/g1 all zero."""
    c = rng.uniform(-1.0, 2.0)
    g0, g1 = {}, {}
    for s in specs:
        v0 = rng.standard_normal(s["shape"]) * s["gscale"]
        v1 = c * v0 + 0.5 * rng.standard_normal(s["shape"]) * s["gscale"]
        if mode == "zero0":
            v0 = np.zeros(s["shape"])
        if mode == "zero1":
            v1 = np.zeros(s["shape"])
        g0[s["name"]] = R.make_array(v0, s["gdtype"], s["glayout"]).array
        g1[s["name"]] = R.make_array(v1, s["gdtype"], s["glayout"]).array
    return g0, g1


def dtypes_of(params: dict[str, np.ndarray]) -> dict[str, np.dtype]:
    return {k: v.dtype for k, v in params.items()}


def copies(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in d.items()}


def assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str = "") -> None:
    assert list(a) == list(b) or set(a) == set(b), f"{what}: keys differ"
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {k!r} dtype/shape"
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), (
            f"{what}: {k!r} differs")


def assert_in_place(params: dict[str, np.ndarray], holders: dict[str, R.Holder]) -> None:
    assert list(params) == list(holders)
    for k, h in holders.items():
        assert params[k] is h.array, f"params[{k!r}] was rebound"
        assert h.outside_untouched(), f"{k!r}: memory outside the view was written"


# ----------------------------------------------------------------------------- optimizers


class PySGD:
    """SGD with momentum written in Python (float64 velocity), the crate's formula
    v <- mu*v + lr*g ; p <- p - v. Records the params and gradients it is given."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.5) -> None:
        self.lr = lr
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] = {}
        self.seen_params: list[dict[str, np.ndarray]] = []
        self.seen_ids: list[dict[str, int]] = []
        self.seen_grads: list[dict[str, np.ndarray]] = []

    def step(self, params: Any, grads: Any) -> None:
        self.seen_params.append(copies(params))
        self.seen_ids.append({k: id(v) for k, v in params.items()})
        self.seen_grads.append({k: np.array(grads[k], copy=True) for k in params})
        for k, p in params.items():
            g = np.asarray(grads[k], dtype=np.float64)
            v = self.momentum * self.velocity.get(k, np.zeros(p.shape)) + self.lr * g
            self.velocity[k] = v
            p[...] = p.astype(np.float64) - v

    def zero_grad(self) -> None:
        pass

    def get_lr(self) -> float:
        return self.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"lr": np.array(self.lr)}

    def load_state_dict(self, state: Any) -> None:
        self.lr = float(state["lr"])


def make_config(c: dict[str, Any]) -> OptimizerConfig:
    return OptimizerConfig(
        learning_rate=c["lr"], momentum=c["momentum"], beta1=c["beta1"], beta2=c["beta2"],
        epsilon=c["eps"], weight_decay=c["wd"], grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.NORM if c["clip_mode"] == "norm" else GradClipMode.VALUE)


def base_config(kind: str, clip_mode: str | None = None, **kw: Any) -> dict[str, Any]:
    c = dict(kind=kind, lr=0.05, momentum=0.9, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.05,
             clip_mode=clip_mode, clip=None if clip_mode is None else 0.5)
    c.update(kw)
    return c


def make_base(c: dict[str, Any]) -> tuple[Any, Any]:
    """(samopt or Python base optimizer, reference base) for a base config."""
    mode = c["clip_mode"] or "value"
    if c["kind"] == "py":
        assert c["clip"] is None
        return PySGD(c["lr"], c["momentum"]), R.RefSGD(c["lr"], c["momentum"])
    cfg = make_config(c)
    wd = R.effective_weight_decay(c["kind"], c["wd"])
    if c["kind"] == "sgd":
        return SgdOptimizer(cfg), R.RefSGD(c["lr"], c["momentum"], c["clip"], mode,
                                           weight_decay=wd)
    if c["kind"] == "adam":
        return AdamOptimizer(cfg), R.RefAdam(c["lr"], c["beta1"], c["beta2"], c["eps"], wd,
                                             clip=c["clip"], clip_mode=mode)
    return AdamWOptimizer(cfg), R.RefAdamW(c["lr"], c["beta1"], c["beta2"], c["eps"],
                                           wd, c["clip"], mode)


def sam_config(typ: str = "sam", **kw: Any) -> dict[str, Any]:
    s = dict(type=typ, rho=0.1, adaptive=False, eta=0.0, eps=0.0, interval=1,
             rho_min=None, alpha=0.4, lr_min=0.0)
    s.update(kw)
    return s


def make_pair(c: dict[str, Any], s: dict[str, Any]) -> tuple[Any, Any]:
    """(samopt SamOptimizer/GsamOptimizer, reference RefSAMEps/RefGSAM)."""
    base, ref_base = make_base(c)
    if s["type"] == "sam":
        opt = SamOptimizer(base, s["rho"], adaptive=s["adaptive"], eta=s["eta"], eps=s["eps"],
                           interval=s["interval"])
        ref: Any = R.RefSAMEps(ref_base, s["rho"], s["adaptive"], s["eta"], s["eps"])
    else:
        opt = GsamOptimizer(base, s["rho"], s["rho_min"], s["alpha"], lr_min=s["lr_min"],
                            eps=s["eps"], interval=s["interval"])
        ref = R.RefGSAM(ref_base, s["rho"], s["rho_min"], s["alpha"], s["lr_min"], s["eps"])
    return opt, ref


def set_ref_rho(ref: Any, rho: float) -> None:
    if isinstance(ref, R.RefGSAM):
        ref.rho_max = rho
    else:
        ref.rho = rho


# ----------------------------------------------------------------------------- comparisons


def track(scales: R.ScaleTracker, ref_params: Any, ref_state: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref_state, "state:")


def param_of(key: str, names: Any) -> str | None:
    for prefix in PER_PARAM_PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] in names:
            return key[len(prefix):]
    return None


def assert_state_matches(state: Any, ref_state: dict[str, np.ndarray],
                         params: dict[str, np.ndarray], what: str, f64_tol: float,
                         scales: R.ScaleTracker | None = None, python_base: bool = False
                         ) -> None:
    """samopt's state_dict against the reference's: same keys (entries of size-0 params
    may be absent), lr/rho exact float64, t/sam_calls exact int64, grad_norm0 within 1e-12,
    per-parameter arrays in the parameter's dtype and shape within SPEC's tolerance."""
    assert isinstance(state, dict), what
    ref_state = dict(ref_state)
    ref_state.setdefault("sam_calls", np.array(0, dtype=np.int64))
    if python_base:  # PySGD's state_dict is only its lr
        ref_state = {k: v for k, v in ref_state.items() if not k.startswith("velocity_")}
    for k in ref_state:
        if k not in state:
            pk = param_of(k, params)
            assert pk is not None and params[pk].size == 0, f"{what}: missing key {k!r}"
    for k, v in state.items():
        assert k in ref_state, f"{what}: unexpected key {k!r}"
        assert isinstance(v, np.ndarray), f"{what}: {k!r} not an ndarray"
        r = np.asarray(ref_state[k])
        if k in ("lr", "rho"):
            assert v.shape == () and v.dtype == np.float64, f"{what}: {k!r} {v.dtype}{v.shape}"
            assert float(v) == float(r), f"{what}: {k!r} = {float(v)!r}, expected {float(r)!r}"
        elif k in ("t", "sam_calls"):
            assert v.shape == () and v.dtype == np.int64, f"{what}: {k!r} {v.dtype}{v.shape}"
            assert int(v) == int(r), f"{what}: {k!r} = {int(v)}, expected {int(r)}"
        elif k == "grad_norm0":
            assert v.shape == () and v.dtype == np.float64, f"{what}: grad_norm0 {v.dtype}"
            assert abs(float(v) - float(r)) <= 1e-12 * float(r), (
                f"{what}: grad_norm0 {float(v)!r}, expected {float(r)!r}")
        else:
            pk = param_of(k, params)
            assert pk is not None, f"{what}: {k!r}"
            p = params[pk]
            assert v.dtype == p.dtype and v.shape == p.shape, f"{what}: {k!r} {v.dtype}{v.shape}"
            e = R.rel_err(v, r, scales.get("state:" + k) if scales else 0.0)
            assert e <= R.tol_for(p.dtype, f64_tol), f"{what}: state {k!r} rel err {e:.3g}"


def assert_close_dicts(x: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                       dtypes: dict[str, Any], what: str, f64_tol: float = R.FLOAT64_TOL,
                       scales: R.ScaleTracker | None = None, prefix: str = "param:") -> None:
    assert set(x) == set(ref), f"{what}: keys {sorted(x)} vs {sorted(ref)}"
    for k in ref:
        assert np.shape(x[k]) == np.shape(ref[k]), f"{what}: {k!r} shape"
        e = R.rel_err(x[k], ref[k], scales.get(prefix + k) if scales else 0.0)
        assert e <= R.tol_for(dtypes[k], f64_tol), f"{what}: {k!r} ({dtypes[k]}) rel err {e:.3g}"


# ----------------------------------------------------------------------------- grad_fn


class Loss:
    """A loss object (identity matters: sam_step must return the first one)."""

    def __init__(self, value: float, call: int) -> None:
        self.value = value
        self.call = call


class Quadratic:
    """grad_fn(params) -> (loss, grads) for sum(0.5*a*(p-c)^2 + 0.2*cos(p)): the gradient
    a*(p-c) - 0.2*sin(p), computed in float64 from the given params and returned in each
    spec's gradient dtype and memory layout. Records every call."""

    def __init__(self, specs: list[dict[str, Any]], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.meta = {s["name"]: s for s in specs}
        self.curv = {s["name"]: rng.uniform(0.5, 2.0, s["shape"]) for s in specs}
        self.center = {s["name"]: rng.standard_normal(s["shape"]) for s in specs}
        self.points: list[dict[str, np.ndarray]] = []
        self.ids: list[dict[str, int]] = []
        self.grads: list[dict[str, np.ndarray]] = []
        self.grad_copies: list[dict[str, np.ndarray]] = []
        self.losses: list[Loss] = []

    def gradient(self, ps: Any) -> tuple[float, dict[str, np.ndarray]]:
        loss = 0.0
        g = {}
        for k, p in ps.items():
            x = np.asarray(p, dtype=np.float64)
            a, c = self.curv[k], self.center[k]
            loss += float(np.sum(0.5 * a * (x - c) ** 2 + 0.2 * np.cos(x)))
            g[k] = R.make_array(a * (x - c) - 0.2 * np.sin(x), self.meta[k]["gdtype"],
                                self.meta[k]["glayout"]).array
        return loss, g

    def __call__(self, ps: Any) -> tuple[Loss, dict[str, np.ndarray]]:
        self.points.append(copies(ps))
        self.ids.append({k: id(v) for k, v in ps.items()})
        value, g = self.gradient(ps)
        loss = Loss(value, len(self.losses))
        self.grads.append(g)
        self.grad_copies.append(copies(g))
        self.losses.append(loss)
        return loss, g

    @property
    def calls(self) -> int:
        return len(self.losses)


class Replay:
    """The reference's grad_fn: records the (float64) point it is called at and returns the
    loss and gradients samopt's grad_fn returned at the same call, as samopt sees them."""

    def __init__(self, rec: Quadratic, dts: dict[str, Any]) -> None:
        self.rec = rec
        self.dts = dts
        self.points: list[dict[str, np.ndarray]] = []

    def __call__(self, ps: Any) -> tuple[Loss, dict[str, np.ndarray]]:
        i = len(self.points)
        self.points.append(copies(ps))
        return self.rec.losses[i], R.to_ref_grads(self.rec.grads[i], self.dts)


# ============================================================================= 1. sam_step


def run_sam_step(specs: list[dict[str, Any]], c: dict[str, Any], s: dict[str, Any],
                 seed: int, steps: int, rho_schedule: Callable[[int], float] | None = None,
                 lr_schedule: Callable[[int], float] | None = None) -> None:
    """sam_step over `steps` calls against RefSamStep: the number of grad_fn calls per step
    (2 on SAM calls, 1 otherwise), the points grad_fn is called at, the returned loss, the
    params and the state (incl. sam_calls)."""
    rng = np.random.default_rng(seed)
    holders, params, ref_params = build_params(specs, rng)
    opt, ref_sam = make_pair(c, s)
    ref = R.RefSamStep(ref_sam, s["interval"])
    fn = Quadratic(specs, seed + 1)
    dts = dtypes_of(params)
    replay = Replay(fn, dts)
    tol = R.coupled_f64_tol(params, s["adaptive"])
    scales = R.ScaleTracker()
    track(scales, ref_params, ref.state_dict())
    for t in range(steps):
        if rho_schedule is not None:
            # GSAM's rho setter sets rho_max, which may not go below rho_min.
            rho = max(rho_schedule(t), getattr(opt, "rho_min", None) or 0.0)
            opt.rho = rho
            set_ref_rho(ref_sam, rho)
        if lr_schedule is not None:
            opt.set_lr(lr_schedule(t))
            ref_sam.base.lr = lr_schedule(t)
        before = copies(params)
        n0 = fn.calls
        loss = opt.sam_step(params, fn)
        ref_loss = ref.sam_step(ref_params, replay)
        sam_call = t % s["interval"] == 0
        assert fn.calls - n0 == (2 if sam_call else 1), f"step {t}: grad_fn calls"
        assert len(replay.points) == fn.calls
        assert loss is fn.losses[n0] and ref_loss is loss, f"step {t}: not the first loss"
        # the first call is at the current point, on the caller's arrays
        assert_bitwise(fn.points[n0], before, f"step {t}: first grad_fn point")
        assert fn.ids[n0] == {k: id(v) for k, v in params.items()}
        for j in range(n0, fn.calls):
            scales.update(replay.points[j], "param:")
            assert_close_dicts(fn.points[j], replay.points[j], dts,
                               f"step {t}: grad_fn point {j - n0}", tol, scales)
        track(scales, ref_params, ref.state_dict())
        if t in CHECK_AT or t < 2 * s["interval"] or t == steps - 1:
            R.assert_params_close(params, ref_params, f"sam_step {t}", tol, scales)
            assert_state_matches(opt.state_dict(), ref.state_dict(), params,
                                 f"sam_step {t}", tol, scales, c["kind"] == "py")
    assert_in_place(params, holders)
    for g, gc in zip(fn.grads, fn.grad_copies):
        assert_bitwise(g, gc, "grad_fn's gradients were modified")


@pytest.mark.parametrize("typ,adaptive,eps", [("sam", False, 0.0), ("sam", True, 1e-12),
                                              ("gsam", False, 0.0), ("gsam", False, 1e-3)])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "py"])
@pytest.mark.parametrize("interval", [1, 3])
def test_sam_step_trajectory_matches_reference(typ: str, adaptive: bool, eps: float,
                                               kind: str, interval: int) -> None:
    c = base_config(kind, clip_mode=None if kind == "py" else "norm")
    s = sam_config(typ, adaptive=adaptive, eta=0.01 if adaptive else 0.0, eps=eps,
                   interval=interval, rho=0.08)
    run_sam_step(specs_of("mixed"), c, s, seed=11, steps=STEPS)


@st.composite
def base_configs(draw: Any, kinds: tuple[str, ...] = ("sgd", "adam", "adamw", "py")
                 ) -> dict[str, Any]:
    kind = draw(st.sampled_from(kinds))
    clip_mode = None if kind == "py" else draw(st.sampled_from([None, "value", "norm"]))
    wd = draw(st.one_of(st.none(), st.just(0.01), st.floats(0.0, 0.1)))
    # Adam with L2 and a large lr is unstable in itself (see test_trajectories).
    max_lr = 0.02 if kind == "adam" and wd else 0.1
    return dict(
        kind=kind, lr=draw(st.floats(1e-3, max_lr)),
        momentum=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95))),
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.0, 0.95))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        wd=wd,
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


@st.composite
def sam_configs(draw: Any, lr: float, types: tuple[str, ...] = ("sam", "gsam"),
                intervals: tuple[int, ...] = (1, 1, 2, 3)) -> dict[str, Any]:
    typ = draw(st.sampled_from(types))
    rho = draw(st.one_of(st.just(0.05), st.floats(0.01, 0.5)))
    s = sam_config(typ, rho=rho, eps=draw(st.sampled_from([0.0, 1e-12, 1e-3])),
                   interval=draw(st.sampled_from(intervals)))
    if typ == "sam":
        s["adaptive"] = draw(st.booleans())
        s["eta"] = draw(st.sampled_from([0.0, 0.01])) if s["adaptive"] else 0.0
    else:
        s["rho_min"] = draw(st.one_of(st.none(), st.floats(0.0, 1.0).map(
            lambda f: min(rho, max(f * rho, 1e-3)))))
        s["alpha"] = draw(st.one_of(st.just(0.4), st.just(0.0), st.floats(0.0, 2.0)))
        s["lr_min"] = lr * draw(st.sampled_from([0.0, 0.3, 1.0, 1.5]))
    return s


def lr_decay(lr: float, steps: int = 40) -> Callable[[int], float]:
    """From 1.2*lr (above lr_max: rho clamps to rho_max) down to 0 (below any lr_min) over
    `steps` steps, then 0."""
    return lambda t: 1.2 * lr * 0.5 * (1.0 + math.cos(math.pi * min(t, steps - 1) / (steps - 1)))


@settings(max_examples=80)
@given(data=st.data())
def test_sam_step_property_trajectories(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(), label="base")
    s = data.draw(sam_configs(c["lr"]), label="sam")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    schedule = data.draw(st.sampled_from(["none", "rho", "lr"]), label="schedule")
    run_sam_step(
        specs, c, s, seed, steps=STEPS,
        rho_schedule=(lambda t: 0.01 + 0.2 * abs(math.sin(t))) if schedule == "rho" else None,
        lr_schedule=lr_decay(c["lr"], 80) if schedule == "lr" else None)


def twin_manual_step(opt: Any, params: dict[str, np.ndarray], fn: Callable, sam_call: bool
                     ) -> Any:
    """What sam_step should do, spelled out with the public two-phase API."""
    loss, g = fn(params)
    if sam_call:
        opt.first_step(params, g)
        _, g2 = fn(params)
        opt.second_step(params, g2)
    else:
        opt.base_optimizer.step(params, g)
    return loss


@pytest.mark.parametrize("typ", ["sam", "asam", "gsam"])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "py"])
@pytest.mark.parametrize("interval", [1, 2, 5])
def test_sam_step_equals_first_step_grad_second_step(typ: str, kind: str,
                                                     interval: int) -> None:
    """Bitwise: sam_step == grad_fn, first_step, grad_fn at the perturbed point,
    second_step on SAM calls (0, k, 2k, ...), and grad_fn + base step otherwise; the
    second grad_fn call is at exactly the point first_step produced."""
    c = base_config(kind, clip_mode=None if kind == "py" else "value")
    s = sam_config("gsam" if typ == "gsam" else "sam", adaptive=typ == "asam",
                   eps=1e-12, interval=interval)
    specs = specs_of("mixed")
    results = []
    for mode in ("sam_step", "manual"):
        rng = np.random.default_rng(5)
        _, params, _ = build_params(specs, rng)
        opt, _ = make_pair(c, s)
        fn = Quadratic(specs, 6)
        per_step = []
        for t in range(3 * interval + 2):
            n0 = fn.calls
            if mode == "sam_step":
                loss = opt.sam_step(params, fn)
            else:
                loss = twin_manual_step(opt, params, fn, t % interval == 0)
            assert loss is fn.losses[n0]
            per_step.append((fn.calls - n0, copies(params)))
        state = {k: v for k, v in opt.state_dict().items() if k != "sam_calls"}
        results.append((per_step, fn.points, state, opt.state_dict().get("sam_calls")))
    (steps_a, points_a, state_a, calls_a), (steps_b, points_b, state_b, calls_b) = results
    assert [n for n, _ in steps_a] == [2 if t % interval == 0 else 1
                                       for t in range(3 * interval + 2)]
    assert [n for n, _ in steps_a] == [n for n, _ in steps_b]
    for t, ((_, pa), (_, pb)) in enumerate(zip(steps_a, steps_b)):
        assert_bitwise(pa, pb, f"params after call {t}")
    assert len(points_a) == len(points_b)
    for j, (pa, pb) in enumerate(zip(points_a, points_b)):
        assert_bitwise(pa, pb, f"grad_fn point {j}")
    assert_bitwise(state_a, state_b, "state")
    assert calls_a.dtype == np.int64 and calls_a.shape == () and int(calls_a) == 3 * interval + 2
    assert int(calls_b) == 0  # the counter counts sam_step calls only


def test_sam_step_defaults_and_counts() -> None:
    """Defaults (interval 1: every call is a SAM call; eps 0; GSAM's alpha 0.4, rho_max
    0.05, no rho_min, lr_min 0); a hand-computed SAM step; a zero first gradient leaves
    nothing to restore (grad_fn is still called twice) and the step is a plain base step."""
    opt = SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.1, momentum=0.0)), 0.5)
    assert opt.interval == 1 and opt.eps == 0.0
    g = GsamOptimizer(SgdOptimizer())
    assert g.interval == 1 and g.eps == 0.0 and g.alpha == 0.4 and g.rho_min is None
    assert g.rho == 0.05 and g.rho_max == 0.05 and g.lr_min == 0.0
    params = {"w": np.array([1.0, 2.0])}
    points: list[np.ndarray] = []

    def fn(ps: Any) -> Any:
        points.append(ps["w"].copy())
        return "loss", {"w": np.array([3.0, 4.0])}

    assert opt.sam_step(params, fn) == "loss"
    assert len(points) == 2
    np.testing.assert_array_equal(points[0], [1.0, 2.0])
    np.testing.assert_allclose(points[1], [1.3, 2.4], rtol=1e-15)  # + 0.5*(3,4)/5
    np.testing.assert_allclose(params["w"], [0.7, 1.6], rtol=1e-15)
    # a zero gradient: no perturbation, grad_fn still called twice, a plain base step
    points.clear()

    def zero_fn(ps: Any) -> Any:
        points.append(ps["w"].copy())
        return 0.0, {"w": np.zeros(2)}

    opt.sam_step(params, zero_fn)
    assert len(points) == 2 and not opt.pending
    np.testing.assert_array_equal(points[0], points[1])
    assert int(opt.state_dict()["sam_calls"]) == 2


class MappingView(Mapping):
    """A read-only Mapping that is not a dict."""

    def __init__(self, d: dict[str, np.ndarray]) -> None:
        self._d = d

    def __getitem__(self, k: str) -> np.ndarray:
        return self._d[k]

    def __iter__(self) -> Any:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def test_sam_step_accepts_any_mapping_and_updates_in_place() -> None:
    specs = specs_of("mixed")
    rng = np.random.default_rng(0)
    holders, params, _ = build_params(specs, rng)
    twin = copies(params)
    opt = GsamOptimizer(AdamOptimizer(OptimizerConfig(learning_rate=0.01)), 0.1)
    twin_opt = GsamOptimizer(AdamOptimizer(OptimizerConfig(learning_rate=0.01)), 0.1)
    fn, fn2 = Quadratic(specs, 1), Quadratic(specs, 1)
    for _ in range(3):
        opt.sam_step(MappingView(params), fn)
        twin_opt.sam_step(twin, fn2)
    assert_in_place(params, holders)
    assert_bitwise(params, twin, "a Mapping vs a dict")


# ----------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("typ", ["sam", "gsam"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sam_calls_survive_checkpoint(tmp_path: Path, typ: str, kind: str) -> None:
    """7 sam_steps, numpy.savez of state and params, load into a fresh optimizer (same
    construction), 8 more: bitwise the same as 15 in a row, and the SAM calls stay on
    0, 3, 6, 9, 12 (the counter `sam_calls` is in the state dict)."""
    c = base_config(kind, clip_mode="norm")
    s = sam_config(typ, interval=3, eps=1e-12)
    specs = specs_of("mixed")

    def fresh() -> tuple[Any, dict[str, np.ndarray], Quadratic]:
        _, params, _ = build_params(specs, np.random.default_rng(3))
        return make_pair(c, s)[0], params, Quadratic(specs, 4)

    opt, params, fn = fresh()
    counts = []
    for _ in range(15):
        n0 = fn.calls
        opt.sam_step(params, fn)
        counts.append(fn.calls - n0)
    assert counts == [2, 1, 1] * 5
    straight_params, straight_state = params, opt.state_dict()

    opt, params, fn = fresh()
    for _ in range(7):
        opt.sam_step(params, fn)
    state = opt.state_dict()
    assert state["sam_calls"].dtype == np.int64 and state["sam_calls"].shape == ()
    assert int(state["sam_calls"]) == 7
    np.savez(tmp_path / "ckpt.npz", **{"opt/" + k: v for k, v in state.items()},
             **{"param/" + k: v for k, v in params.items()})
    del opt, params
    opt, params, fn2 = fresh()
    with np.load(tmp_path / "ckpt.npz") as z:
        opt.load_state_dict({k[4:]: z[k] for k in z.files if k.startswith("opt/")})
        for k in params:
            params[k][...] = z["param/" + k]
    counts = []
    for _ in range(8):
        n0 = fn2.calls
        opt.sam_step(params, fn2)
        counts.append(fn2.calls - n0)
    assert counts == [1, 1, 2, 1, 1, 2, 1, 1]  # calls 7..14: SAM on 9 and 12
    assert_bitwise(params, straight_params, "resumed params")
    assert_bitwise(opt.state_dict(), straight_state, "resumed state")


def test_state_without_sam_calls_starts_at_zero() -> None:
    """A state dict from before sam_step existed (no `sam_calls`) loads with the counter 0."""
    opt = SamOptimizer(SgdOptimizer(), interval=2)
    params = {"w": np.ones(3)}
    fn = Quadratic([dict(name="w", shape=(3,), gdtype=np.float64, glayout="C")], 0)
    opt.sam_step(params, fn)
    state = {k: v for k, v in opt.state_dict().items() if k != "sam_calls"}
    fresh = SamOptimizer(SgdOptimizer(), interval=2)
    fresh.load_state_dict(state)
    assert int(fresh.state_dict()["sam_calls"]) == 0
    n0 = fn.calls
    fresh.sam_step(params, fn)
    assert fn.calls - n0 == 2


@pytest.mark.parametrize("bad", [-1, 1.5, np.nan, True, np.array([1, 2])])
def test_bad_sam_calls_in_state_rejected(bad: Any) -> None:
    opt = SamOptimizer(SgdOptimizer(), interval=2)
    params = {"w": np.ones(3)}
    fn = Quadratic([dict(name="w", shape=(3,), gdtype=np.float64, glayout="C")], 0)
    opt.sam_step(params, fn)
    before = R.state_snapshot(opt.state_dict())
    state = opt.state_dict()
    state["sam_calls"] = np.array(bad)
    with pytest.raises(OptimizerError) as info:
        opt.load_state_dict(state)
    assert info.value.key == "sam_calls" and "sam_calls" in str(info.value)
    assert R.state_snapshot(opt.state_dict()) == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_interval_rejected(bad: Any) -> None:
    for make in (lambda: SamOptimizer(SgdOptimizer(), interval=bad),
                 lambda: GsamOptimizer(SgdOptimizer(), interval=bad)):
        with pytest.raises(OptimizerError) as info:
            make()
        assert info.value.key == "interval" and "interval" in str(info.value)


# ----------------------------------------------------------------------------- sam_step errors

A, Z = "a.first", "z.last"


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception."""


def good_fn(ps: Any) -> tuple[float, dict[str, np.ndarray]]:
    ga = (0.5 * ps[A].astype(np.float64) + np.cos(ps[A].astype(np.float64))).astype(np.float16)
    gz = 0.3 * ps[Z] - 1.0
    return float(np.sum(ps[Z] ** 2)), {A: ga, Z: gz}


def error_setup(kind: str, interval: int, warm: int) -> tuple[Any, dict[str, np.ndarray]]:
    cfg = OptimizerConfig(learning_rate=0.05, grad_clip=2.0, grad_clip_mode=GradClipMode.NORM)
    if kind == "sam":
        opt: Any = SamOptimizer(AdamOptimizer(cfg), 0.1, interval=interval)
    elif kind == "asam":
        opt = SamOptimizer(SgdOptimizer(cfg), 0.1, adaptive=True, eps=1e-12,
                           interval=interval)
    elif kind == "gsam":
        opt = GsamOptimizer(AdamWOptimizer(cfg), 0.1, 0.02, 0.5, interval=interval)
    elif kind == "sam_py":
        opt = SamOptimizer(PySGD(), 0.1, interval=interval)
    else:
        opt = GsamOptimizer(PySGD(), 0.1, alpha=0.3, interval=interval)
    params = {A: np.linspace(-1.0, 2.0, 12, dtype=np.float32).reshape(3, 4),
              Z: np.linspace(0.5, -3.0, 5)}
    for _ in range(warm):
        opt.sam_step(params, good_fn)
    return opt, params


FAULTS = ["raise", "interrupt", "nan", "inf", "none", "grads_only", "triple", "grads_none",
          "grads_int_list", "missing", "shape", "int_dtype"]


GRADIENT_CONTENT_FAULTS = ("nan", "inf", "missing", "shape", "int_dtype")


def faulty_fn(mode: str, at: int, exc: BaseException) -> Callable:
    calls: list[int] = []

    def fn(ps: Any) -> Any:
        j = len(calls)
        calls.append(j)
        loss, g = good_fn(ps)
        if j != at:
            return loss, g
        g = dict(g)
        if mode in ("raise", "interrupt"):
            raise exc
        if mode == "nan":
            g[Z] = g[Z].copy()
            g[Z][2] = np.nan
        elif mode == "inf":
            g[A] = g[A].copy()
            g[A][1, 1] = np.inf
        elif mode == "none":
            return None
        elif mode == "grads_only":
            return g
        elif mode == "triple":
            return loss, g, None
        elif mode == "grads_none":
            return loss, None
        elif mode == "grads_int_list":
            return loss, [1, 2]
        elif mode == "missing":
            del g[A]
        elif mode == "shape":
            g[Z] = np.ones(7)
        elif mode == "int_dtype":
            g[Z] = np.arange(5)
        return loss, g

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def expected_exception(mode: str) -> type[BaseException]:
    return {"raise": Boom, "interrupt": Interrupt, "nan": NonFiniteGradientError,
            "inf": NonFiniteGradientError}.get(mode, OptimizerError)


@pytest.mark.parametrize("kind,mode,at", [
    (kind, mode, at)
    for kind in ["sam", "asam", "gsam", "sam_py", "gsam_py"]
    for mode in FAULTS
    for at in [0, 1]
    # SAM hands g1 to a Python base unread: checking its content is the base's job.
    if not (kind == "sam_py" and at == 1 and mode in GRADIENT_CONTENT_FAULTS)
])
def test_sam_step_errors_change_nothing(kind: str, mode: str, at: int) -> None:
    """A failing grad_fn (at the current point, at=0, or at the perturbed point, at=1), a
    non-finite gradient, or a return value that is not (loss, grads): the exception
    propagates and params (same arrays, same bits), the state (incl. sam_calls) and the
    pending flag are as before; the next good sam_step is the one a clean run takes."""
    interval = 2
    opt, params = error_setup(kind, interval, warm=2)  # call 2: a SAM call
    twin, twin_params = error_setup(kind, interval, warm=2)
    p_snap = R.snapshot(params)
    s_snap = R.state_snapshot(opt.state_dict())
    exc = Boom("boom") if mode == "raise" else Interrupt()
    fn = faulty_fn(mode, at, exc)
    with pytest.raises(expected_exception(mode)) as info:
        opt.sam_step(params, fn)
    if mode in ("raise", "interrupt"):
        assert info.value is exc
    elif expected_exception(mode) is OptimizerError:
        assert not isinstance(info.value, NonFiniteGradientError)
        assert isinstance(info.value, TrainError) and str(info.value)
    assert len(fn.calls) == at + 1, "grad_fn called after it failed"  # type: ignore
    R.assert_same_snapshot(p_snap, R.snapshot(params), f"{kind}/{mode}/{at}: params")
    assert R.state_snapshot(opt.state_dict()) == s_snap, "state changed"
    assert not opt.pending
    for _ in range(3):  # calls 2, 3, 4 as in a clean run
        opt.sam_step(params, good_fn)
        twin.sam_step(twin_params, good_fn)
    assert_bitwise(params, twin_params, "after recovery")
    assert_bitwise(opt.state_dict(), twin.state_dict(), "state after recovery")


@pytest.mark.parametrize("kind,mode", [
    (kind, mode)
    for kind in ["sam", "gsam", "sam_py", "gsam_py"]
    for mode in ["raise", "nan", "none", "missing"]
    # A plain call hands the gradients to a Python base unread.
    if not (kind.endswith("_py") and mode in GRADIENT_CONTENT_FAULTS)
])
def test_sam_step_errors_on_plain_calls_change_nothing(kind: str, mode: str) -> None:
    """With interval=2, call 3 is a plain base step with one gradient evaluation: its
    errors change nothing either (a Python base gets the gradients as they are there)."""
    opt, params = error_setup(kind, 2, warm=3)
    p_snap = R.snapshot(params)
    s_snap = R.state_snapshot(opt.state_dict())
    exc = Boom("boom")
    fn = faulty_fn(mode, 0, exc)
    with pytest.raises(expected_exception(mode)):
        opt.sam_step(params, fn)
    R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    assert R.state_snapshot(opt.state_dict()) == s_snap
    assert int(opt.state_dict()["sam_calls"]) == 3


class FailingBase(PySGD):
    """A Python base optimizer whose step raises; with `mutate`, after having updated the
    first parameter (an optimizer that fails half-way)."""

    def __init__(self, mutate: bool) -> None:
        super().__init__(0.1, 0.0)
        self.mutate = mutate
        self.fail = False

    def step(self, params: Any, grads: Any) -> None:
        if self.fail:
            if self.mutate:
                first = sorted(params)[0]
                params[first] -= 1.0
            raise Boom("base failed")
        super().step(params, grads)


def _failing_base_case(typ: str, mutate: bool, via_sam_step: bool) -> None:
    base = FailingBase(mutate)
    opt = (SamOptimizer(base, 0.1) if typ == "sam" else GsamOptimizer(base, 0.1))
    params = {A: np.array([1.0, 2.0]), Z: np.array([3.0], np.float32)}
    opt.sam_step(params, good_fn)
    original = copies(params)
    base.fail = True
    with pytest.raises(Boom):
        if via_sam_step:
            opt.sam_step(params, good_fn)
        else:
            opt.first_step(params, good_fn(params)[1])
            try:
                opt.second_step(params, good_fn(params)[1])
            finally:
                opt.restore(params)
    assert not opt.pending
    assert_bitwise(params, original, "params after the base optimizer failed")


@pytest.mark.parametrize("typ", ["sam", "gsam"])
@pytest.mark.parametrize("via_sam_step", [True, False])
def test_failing_python_base_restores(typ: str, via_sam_step: bool) -> None:
    _failing_base_case(typ, False, via_sam_step)


@pytest.mark.parametrize("typ", ["sam", "gsam"])
@pytest.mark.parametrize("via_sam_step", [True, False])
def test_half_failing_python_base_restores(typ: str, via_sam_step: bool) -> None:
    _failing_base_case(typ, True, via_sam_step)


@pytest.mark.parametrize("typ", ["sam", "gsam"])
@pytest.mark.parametrize("warm", [2, 3], ids=["sam_call", "plain_call"])
def test_sam_step_with_pending_first_step_is_error(typ: str, warm: int) -> None:
    """With interval=2, call 2 is a SAM call and call 3 a plain one: either way a pending
    first_step makes sam_step an error that changes nothing."""
    opt, params = error_setup(typ, 2, warm=warm)
    opt.first_step(params, good_fn(params)[1])
    p_snap, s_snap = R.snapshot(params), R.state_snapshot(opt.state_dict())
    with pytest.raises(OptimizerError):
        opt.sam_step(params, good_fn)
    R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    assert R.state_snapshot(opt.state_dict()) == s_snap and opt.pending


# ============================================================================= 2. rho and eps


BAD_REALS = [0.0, -0.1, -1e-300, float("nan"), float("inf"), -float("inf"), True, "0.1",
             None, np.array([0.1, 0.2])]


@pytest.mark.parametrize("typ", ["sam", "gsam"])
@pytest.mark.parametrize("bad", BAD_REALS, ids=repr)
def test_rho_setter_rejects_bad_values(typ: str, bad: Any) -> None:
    opt, _ = error_setup(typ, 1, warm=2)
    rho = opt.rho
    s_snap = R.state_snapshot(opt.state_dict())
    with pytest.raises(OptimizerError) as info:
        opt.rho = bad
    assert info.value.key == "rho" and "rho" in str(info.value)
    assert opt.rho == rho
    assert R.state_snapshot(opt.state_dict()) == s_snap
    with pytest.raises(OptimizerError):
        SamOptimizer(SgdOptimizer(), bad) if typ == "sam" else GsamOptimizer(SgdOptimizer(),
                                                                             bad)


@pytest.mark.parametrize("typ", ["sam", "gsam"])
def test_rho_setter_accepts_reals_and_state_has_it(typ: str) -> None:
    opt = SamOptimizer(SgdOptimizer(), 0.05) if typ == "sam" else GsamOptimizer(SgdOptimizer())
    for value, expected in ((0.2, 0.2), (np.float32(0.25), float(np.float32(0.25))),
                            (1, 1.0), (np.float64(1e-300), 1e-300), (3, 3.0)):
        opt.rho = value
        assert opt.rho == expected and type(opt.rho) is float
        st_ = opt.state_dict()["rho"]
        assert st_.dtype == np.float64 and st_.shape == () and float(st_) == expected
        fresh = (SamOptimizer(SgdOptimizer(), 0.05) if typ == "sam"
                 else GsamOptimizer(SgdOptimizer()))
        fresh.load_state_dict(opt.state_dict())
        assert fresh.rho == expected


@pytest.mark.parametrize("typ", ["sam", "asam", "gsam"])
def test_new_rho_is_used_by_next_first_step(typ: str) -> None:
    """Changing rho moves the next first_step by the new radius (against the reference);
    changing it while a step is pending does not disturb the exact restore."""
    specs = specs_of("float64")
    rng = np.random.default_rng(8)
    _, params, ref_params = build_params(specs, rng)
    s = sam_config("gsam" if typ == "gsam" else "sam", adaptive=typ == "asam", rho=0.05)
    opt, ref = make_pair(base_config("sgd", lr=0.0, momentum=0.0), s)
    dts = dtypes_of(params)
    for rho in (0.05, 0.3, 1e-3, 2.5):
        opt.rho = rho
        set_ref_rho(ref, rho)
        g0, g1 = grad_pair(specs, rng)
        start = copies(params)
        opt.first_step(params, g0)
        ref.first_step(ref_params, R.to_ref_grads(g0, dts))
        R.assert_params_close(params, ref_params, f"rho={rho}")
        moved = math.sqrt(sum(float(np.sum((params[k] - start[k]) ** 2)) for k in params))
        if typ != "asam":
            assert abs(moved - rho) <= 1e-9 * rho, "the step is not rho long"
        assert float(opt.state_dict()["rho"]) == rho
        opt.rho = 7.0  # while pending: used from the next first_step on
        set_ref_rho(ref, 7.0)
        opt.second_step(params, g1)  # lr = 0: back to the start, bitwise
        ref.second_step(ref_params, R.to_ref_grads(g1, dts))
        assert_bitwise(params, start, "restore after a rho change")


@settings(max_examples=40)
@given(data=st.data())
def test_rho_schedule_trajectory(data: Any) -> None:
    """A rho that changes every step (a schedule through the property), two-phase API."""
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(), label="base")
    s = data.draw(sam_configs(c["lr"], intervals=(1,)), label="sam")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    run_phases(specs, c, s, seed, steps=STEPS,
               rho_schedule=lambda t: 0.02 + 0.3 * (t % 7) / 7.0)


# ----------------------------------------------------------------------------- eps


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5])
@pytest.mark.parametrize("gscale", [1e-13, 1e-9, 1.0])
def test_eps_in_the_perturbation(adaptive: bool, eps: float, gscale: float) -> None:
    """p + rho*g/(||g|| + eps) (adaptive: rho*T^2*g/(||T*g|| + eps)) against the reference,
    with gradients small enough for eps to matter (davda54/sam's 1e-12 included), for
    SAM and GSAM's first step."""
    rng = np.random.default_rng(17)
    params0 = {"a": rng.standard_normal((4, 3)), "b": rng.standard_normal(5).astype(np.float32)}
    grads = {"a": rng.standard_normal((4, 3)) * gscale,
             "b": (rng.standard_normal(5) * gscale).astype(np.float32)}
    dts = dtypes_of(params0)
    ref_g = R.to_ref_grads(grads, dts)
    ref_p = {k: v.astype(np.float64) for k, v in params0.items()}
    e, n = R.sam_perturbation(ref_p, ref_g, 0.2, eps, adaptive)
    e0, _ = R.sam_perturbation(ref_p, ref_g, 0.2, 0.0, adaptive)
    assert e is not None and e0 is not None
    if eps > 1e-6 * n:  # eps is not negligible: the reference says so
        assert R.global_norm(e) < R.global_norm(e0) * (1 - 1e-7)
    opts: list[Any] = [SamOptimizer(SgdOptimizer(), 0.2, adaptive=adaptive, eps=eps)]
    if not adaptive:
        opts.append(GsamOptimizer(SgdOptimizer(), 0.2, eps=eps))
    for opt in opts:
        assert opt.eps == eps
        params = copies(params0)
        opt.first_step(params, grads)
        R.assert_params_close(params, {k: ref_p[k] + e[k] for k in ref_p},
                              f"{type(opt).__name__} eps={eps}",
                              R.coupled_f64_tol(params, adaptive))
        if isinstance(opt, GsamOptimizer):  # the kept norm is ||g0||, without eps
            assert abs(float(opt.state_dict()["grad_norm0"]) - n) <= 1e-13 * n


def test_eps_default_zero_is_bitwise_eps_zero() -> None:
    specs = specs_of("mixed")
    out = []
    for kwargs in ({}, {"eps": 0.0}, {"eps": 0}):
        rng = np.random.default_rng(2)
        _, params, _ = build_params(specs, rng)
        for typ in ("sam", "gsam"):
            cls = SamOptimizer if typ == "sam" else GsamOptimizer
            opt = cls(AdamOptimizer(), 0.1, **kwargs)
            assert opt.eps == 0.0
            for _ in range(5):
                g0, g1 = grad_pair(specs, rng)
                opt.first_step(params, g0)
                opt.second_step(params, g1)
        out.append(params)
    assert_bitwise(out[0], out[1])
    assert_bitwise(out[0], out[2])


def test_eps_zero_gradient_moves_nothing() -> None:
    """n = 0: nothing moves and nothing is pending, whatever eps."""
    for opt in (SamOptimizer(SgdOptimizer(), eps=1e-12), GsamOptimizer(SgdOptimizer(), eps=1.0),
                SamOptimizer(SgdOptimizer(), adaptive=True, eps=0.5)):
        params = {"w": np.array([1.0, -2.0])}
        opt.first_step(params, {"w": np.zeros(2)})
        assert not opt.pending
        np.testing.assert_array_equal(params["w"], [1.0, -2.0])
        assert not any(k.startswith(("saved_", "grad0_")) for k in opt.state_dict())


@pytest.mark.parametrize("bad", [-1e-12, -1.0, float("nan"), float("inf"), -float("inf"),
                                 True, "1e-12", None], ids=repr)
def test_bad_eps_rejected(bad: Any) -> None:
    for make in (lambda: SamOptimizer(SgdOptimizer(), eps=bad),
                 lambda: SamOptimizer(SgdOptimizer(), adaptive=True, eps=bad),
                 lambda: GsamOptimizer(SgdOptimizer(), eps=bad)):
        with pytest.raises(OptimizerError) as info:
            make()
        assert info.value.key == "eps" and "eps" in str(info.value)


def test_eps_accepts_zero_and_reals() -> None:
    for value in (0, 0.0, 1e-12, np.float32(1e-6), 3):
        assert SamOptimizer(SgdOptimizer(), eps=value).eps == float(value)
        assert GsamOptimizer(SgdOptimizer(), eps=value).eps == float(value)


# ============================================================================= 3. GSAM


def run_phases(specs: list[dict[str, Any]], c: dict[str, Any], s: dict[str, Any], seed: int,
               steps: int = STEPS, lr_schedule: Callable[[int], float] | None = None,
               rho_schedule: Callable[[int], float] | None = None) -> None:
    """first_step(g0) / second_step(g1) over `steps` steps against the reference, with zero
    g0 (every 7th step) and zero g1 (every 11th); for a Python base also what it receives:
    the parameters as they were before first_step, bitwise, and the combined gradient."""
    rng = np.random.default_rng(seed)
    holders, params, ref_params = build_params(specs, rng)
    opt, ref = make_pair(c, s)
    dts = dtypes_of(params)
    tol = R.coupled_f64_tol(params, s["adaptive"])
    python_base = c["kind"] == "py"
    scales = R.ScaleTracker()
    track(scales, ref_params, ref.state_dict())
    all_grads = []
    for t in range(steps):
        if lr_schedule is not None:
            opt.set_lr(lr_schedule(t))
            ref.base.lr = lr_schedule(t)
        if rho_schedule is not None:
            # GSAM's rho setter sets rho_max, which may not go below rho_min.
            rho = max(rho_schedule(t), getattr(opt, "rho_min", None) or 0.0)
            opt.rho = rho
            set_ref_rho(ref, rho)
        if isinstance(ref, R.RefGSAM):
            assert math.isclose(opt.rho, ref.rho, rel_tol=1e-14, abs_tol=1e-300), (
                f"step {t}: rho {opt.rho!r}, expected {ref.rho!r}")
        mode = "zero0" if t % 7 == 3 else "zero1" if t % 11 == 5 else ""
        g0, g1 = grad_pair(specs, rng, mode)
        all_grads.append((g0, copies(g0)))
        all_grads.append((g1, copies(g1)))
        start = copies(params)
        ref.first_step(ref_params, R.to_ref_grads(g0, dts))
        opt.first_step(params, g0)
        track(scales, ref_params, ref.state_dict())
        assert opt.pending == (ref.saved is not None), f"step {t}: pending"
        if t in CHECK_AT or mode or t == steps - 1:
            R.assert_params_close(params, ref_params, f"first_step {t}", tol, scales)
            assert_state_matches(opt.state_dict(), ref.state_dict(), params,
                                 f"first_step {t}", tol, scales, python_base)
        g1_ref = R.to_ref_grads(g1, dts)
        mixed = isinstance(ref, R.RefGSAM) and ref.saved is not None
        expected = R.gsam_gradient(ref.grad0, g1_ref, ref.alpha) if mixed else g1_ref
        ref.second_step(ref_params, g1_ref)
        opt.second_step(params, g1)
        track(scales, ref_params, ref.state_dict())
        if python_base:
            base = opt.base_optimizer
            assert len(base.seen_grads) == t + 1
            assert_bitwise(base.seen_params[-1], start, f"step {t}: the base's params")
            assert base.seen_ids[-1] == {k: id(v) for k, v in params.items()}
            # the combined gradient, rounded to the parameter's dtype (values below the
            # dtype's smallest normal number may underflow: that is not an error)
            scale_ = R.ScaleTracker()
            scale_.update(expected, "g:")
            for k in expected:
                scale_.hist["g:" + k] = max(scale_.get("g:" + k), float(np.finfo(dts[k]).tiny))
            assert_close_dicts(base.seen_grads[-1], expected, dts,
                               f"step {t}: gradient given to the base", tol, scale_, "g:")
            if mixed and ref.alpha == 0.0:  # exactly g1, in the parameter's dtype
                assert_bitwise(base.seen_grads[-1],
                               {k: np.asarray(g1[k]).astype(dts[k]) for k in g1},
                               f"step {t}: alpha = 0 gradient given to the base")
        if t in CHECK_AT or mode or t == steps - 1:
            R.assert_params_close(params, ref_params, f"second_step {t}", tol, scales)
            assert_state_matches(opt.state_dict(), ref.state_dict(), params,
                                 f"second_step {t}", tol, scales, python_base)
    assert_in_place(params, holders)
    for g, gc in all_grads:
        assert_bitwise(g, gc, "gradients were modified")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("clip_mode", [None, "value", "norm"])
@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
def test_gsam_trajectory_every_combination(kind: str, clip_mode: str | None,
                                           dtypes: str) -> None:
    """GSAM over each base with each clipping mode (the base clips the combined gradient),
    rho_max = 0.1, alpha = 0.4, 100 steps, on a fixed mixed-layout dict."""
    c = base_config(kind, clip_mode)
    run_phases(specs_of(dtypes), c, sam_config("gsam", rho=0.1, alpha=0.4), seed=1234)


@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.7])
def test_gsam_python_base_gets_the_combined_gradient(dtypes: str, alpha: float) -> None:
    c = base_config("py", momentum=0.5)
    run_phases(specs_of(dtypes), c, sam_config("gsam", rho=0.1, alpha=alpha), seed=99)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "py"])
def test_gsam_rho_schedule_trajectory(kind: str) -> None:
    """rho following a cosine-decayed lr (from above lr_max to 0, below lr_min)."""
    c = base_config(kind, None if kind == "py" else "norm", lr=0.04)
    s = sam_config("gsam", rho=0.2, rho_min=0.02, alpha=0.3, lr_min=0.004, eps=1e-12)
    run_phases(specs_of("mixed"), c, s, seed=7, steps=40, lr_schedule=lr_decay(0.04))


@settings(max_examples=80)
@given(data=st.data())
def test_gsam_property_trajectories(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(), label="base")
    s = data.draw(sam_configs(c["lr"], types=("gsam",), intervals=(1,)), label="gsam")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    schedule = data.draw(st.booleans(), label="lr schedule")
    run_phases(specs, c, s, seed, steps=STEPS,
               lr_schedule=lr_decay(c["lr"], 80) if schedule else None)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_gsam_clips_the_combined_gradient(kind: str) -> None:
    """Hand-picked g0, g1 whose combined gradient d = g1 - alpha*g0_perp has a norm above
    the clip while g1's is below it (NORM), or elements beyond it (VALUE): the base clips d.
    g0 = (0, 2), g1 = (1, 0): g0_perp = g0, d = (1, -0.8) (alpha = 0.4), ||d|| = 1.2806.
    (Adam with epsilon = 1, so that its first step depends on the gradient's size.)"""
    d = np.array([1.0, -0.8])
    for mode, clip, clipped in (("norm", 1.1, d * 1.1 / math.sqrt(1.64)),
                                ("value", 0.5, np.array([0.5, -0.5])),
                                (None, None, d)):
        c = base_config(kind, mode, lr=0.01, momentum=0.0, beta1=0.0, beta2=0.5, eps=1.0)
        c["clip"] = clip
        base, _ = make_base(c)
        opt = GsamOptimizer(base, 0.1, alpha=0.4)
        params = {"w": np.array([0.5, -0.25])}
        opt.first_step(params, {"w": np.array([0.0, 2.0])})
        opt.second_step(params, {"w": np.array([1.0, 0.0])})
        expected = {}
        for name, grad in (("clipped", clipped), ("unclipped", d)):
            _, ref_base = make_base(dict(c, clip=None, clip_mode=None))
            ref_params = {"w": np.array([0.5, -0.25])}
            ref_base.step(ref_params, {"w": grad})  # the unclipped base on the given d
            expected[name] = ref_params["w"]
        assert R.rel_err(params["w"], expected["clipped"]) <= 1e-13, (mode, params["w"])
        if mode is not None:  # the data tells clipping d from not clipping it
            assert R.rel_err(params["w"], expected["unclipped"]) > 1e-4


def test_gsam_ignores_absent_names_and_dict_order() -> None:
    """Gradients of names not in params (even NaN) enter neither the norms nor the dot
    product; the insertion order of the dicts changes no bit."""
    specs = specs_of("mixed")
    out = []
    for variant in ("plain", "ghosts", "reversed"):
        rng = np.random.default_rng(31)
        _, params, _ = build_params(specs, rng)
        if variant == "reversed":
            params = dict(reversed(list(params.items())))
        opt = GsamOptimizer(AdamOptimizer(OptimizerConfig(
            learning_rate=0.01, grad_clip=1.0, grad_clip_mode=GradClipMode.NORM)), 0.1)
        for _ in range(5):
            g0, g1 = grad_pair(specs, rng)
            if variant == "ghosts":
                g0 = {"ghost": np.full(4, 1e6), **g0, "nan_ghost": np.array([np.nan])}
                g1 = {"int_ghost": np.arange(3), **g1, "ghost": np.full(4, -1e6)}
            if variant == "reversed":
                g0 = dict(reversed(list(g0.items())))
            opt.first_step(params, g0)
            opt.second_step(params, g1)
        out.append(({k: params[k] for k in sorted(params)}, opt.state_dict()))
    for params, state in out[1:]:
        assert_bitwise(params, out[0][0], "params")
        assert R.state_snapshot(state) == R.state_snapshot(out[0][1])


@pytest.mark.parametrize("names", [["a"], ["a", "b", "c"], ["a", "c"]])
def test_gsam_second_step_on_other_names_is_error(names: list[str]) -> None:
    opt = GsamOptimizer(SgdOptimizer(), 0.1)
    params = {"a": np.ones(3), "b": np.full(2, 2.0), "c": np.zeros(1)}
    first = {k: params[k] for k in ("a", "b")}
    opt.first_step(first, {"a": np.ones(3), "b": np.ones(2)})
    other = {k: params[k] for k in names}
    p_snap, s_snap = R.snapshot(params), R.state_snapshot(opt.state_dict())
    with pytest.raises(OptimizerError):
        opt.second_step(other, {k: np.ones(v.shape) for k, v in other.items()})
    R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    assert R.state_snapshot(opt.state_dict()) == s_snap and opt.pending


# ----------------------------------------------------------------------------- decomposition


@settings(max_examples=150)
@given(data=st.data())
def test_gsam_decomposition(data: Any) -> None:
    """g0 = g0_par + g0_perp with g0_perp orthogonal to g1 and g0_par parallel to it (global
    dot products over all arrays): in the reference, and recovered from what samopt gives a
    Python base, d = g1 - alpha*g0_perp, i.e. g0_perp = (g1 - d)/alpha."""
    specs = data.draw(array_specs(max_arrays=5), label="arrays")
    for sp in specs:
        sp["dtype"] = np.float64
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    alpha = data.draw(st.sampled_from([0.4, 1.0, 0.05, 3.0]), label="alpha")
    relation = data.draw(st.sampled_from(["random", "correlated", "parallel", "antiparallel",
                                          "orthogonal", "zero1"]), label="g1")
    rng = np.random.default_rng(seed)
    _, params, _ = build_params(specs, rng)
    g0 = {s["name"]: np.asarray(rng.standard_normal(s["shape"]) * s["gscale"]) for s in specs}
    raw = {s["name"]: np.asarray(rng.standard_normal(s["shape"]) * s["gscale"]) for s in specs}
    if relation == "random":
        g1 = raw
    elif relation == "correlated":
        g1 = {k: 1.5 * g0[k] + 0.1 * raw[k] for k in g0}
    elif relation == "parallel":
        g1 = {k: 2.0 * g0[k] for k in g0}
    elif relation == "antiparallel":
        g1 = {k: -0.5 * g0[k] for k in g0}
    elif relation == "orthogonal":
        c = R.global_dot(raw, g0) / max(R.global_dot(g0, g0), 1e-300)
        g1 = {k: raw[k] - c * g0[k] for k in g0}
        if R.global_norm(g1) <= 1e-8 * R.global_norm(raw):  # one element: no room
            relation = "zero1"
    if relation == "zero1":
        g1 = {k: np.zeros_like(v) for k, v in g0.items()}
    g1 = {k: np.asarray(v) for k, v in g1.items()}  # 0-d arithmetic gives numpy scalars
    n0, n1 = R.global_norm(g0), R.global_norm(g1)
    par, perp = R.gsam_decompose(g0, g1)
    # the reference's decomposition
    for k in g0:
        np.testing.assert_allclose(par[k] + perp[k], g0[k], rtol=0,
                                   atol=1e-15 * max(n0, 1e-300) * 4)
    assert abs(R.global_dot(perp, g1)) <= 1e-13 * n0 * n1 + 1e-300
    if relation in ("parallel", "antiparallel"):
        assert R.global_norm(perp) <= 1e-14 * n0
    if relation in ("orthogonal", "zero1"):
        # g1 = raw - c*g0 is orthogonal to g0 up to its rounding, about eps*|raw|*|g0|, so
        # the part of g0 along g1 may be eps*(|raw|/|g1|)*|g0|: large when raw is nearly
        # parallel to g0 (two scalars of scales 0.01 and 30 gave |raw|/|g1| = 6341).
        conditioning = max(1.0, R.global_norm(raw) / n1) if n1 > 0 else 1.0
        assert R.global_norm({k: perp[k] - g0[k] for k in g0}) <= 1e-13 * n0 * conditioning
    # what samopt hands a Python base
    base = PySGD(0.0, 0.0)
    opt = GsamOptimizer(base, 0.1, alpha=alpha)
    opt.first_step(params, g0)
    if n0 == 0.0:
        assert not opt.pending
        return
    opt.second_step(params, g1)
    d = {k: base.seen_grads[-1][k].astype(np.float64) for k in g0}
    expected = R.gsam_gradient(g0, g1, alpha)
    scale = max(R.global_norm(expected), 1e-300)
    err = R.global_norm({k: d[k] - expected[k] for k in g0})
    assert err <= 1e-13 * (n1 + alpha * n0), f"combined gradient off by {err / scale:.3g}"
    perp_s = {k: (g1[k] - d[k]) / alpha for k in g0}
    assert abs(R.global_dot(perp_s, g1)) <= 1e-12 * n1 * (n0 + n1 / alpha)
    par_s = {k: g0[k] - perp_s[k] for k in g0}
    if n1 > 0:
        c = R.global_dot(par_s, g1) / (n1 * n1)
        resid = R.global_norm({k: par_s[k] - c * g1[k] for k in g0})
        assert resid <= 1e-12 * (n0 + n1 / alpha)
    if relation == "zero1":
        for k in g0:  # g1 = 0: d = -alpha*g0 exactly
            assert d[k].tobytes() == (-alpha * g0[k]).tobytes()




@pytest.mark.parametrize("e0,e1", [
    (0, 0), (500, -500), (-500, 500), (1000, 1000), (-1000, -1000), (0, -1000), (1020, 0),
    (-1020, 0), (0, 1020),
    (-1060, 0), (600, -600), (0, -1030), (0, -1060),
])
@pytest.mark.parametrize("base_kind", ["sgd", "py"])
def test_gsam_extreme_gradient_scales(e0: int, e1: int, base_kind: str) -> None:
    """g0 = 2^e0*a and g1 = 2^e1*b for O(1) vectors a, b: g0_perp scales with g0 and is
    independent of g1's scale, so the combined gradient 2^e1*b - alpha*2^e0*perp(a, b) is
    finite whenever both terms are; samopt must not over- or underflow on the way."""
    rng = np.random.default_rng(5)
    a = {"x": rng.standard_normal(7), "y": rng.standard_normal((2, 3))}
    b = {"x": rng.standard_normal(7), "y": rng.standard_normal((2, 3))}
    s0, s1 = 2.0 ** e0, 2.0 ** e1
    g0 = {k: v * s0 for k, v in a.items()}
    g1 = {k: v * s1 for k, v in b.items()}
    # Subnormal gradients keep only part of their bits: the directions samopt is given are
    # the rounded ones, scaled back up exactly by the same power of two.
    a = {k: v / s0 for k, v in g0.items()}
    b = {k: v / s1 for k, v in g1.items()}
    _, perp = R.gsam_decompose(a, b)  # O(1) numbers: nothing to overflow here
    expected = {k: s1 * b[k] - 0.4 * s0 * perp[k] for k in a}
    lr = 2.0 ** -40
    base: Any = (PySGD(lr, 0.0) if base_kind == "py"
                 else SgdOptimizer(OptimizerConfig(learning_rate=lr, momentum=0.0)))
    opt = GsamOptimizer(base, 0.1, alpha=0.4)
    params = {k: np.zeros_like(v) for k, v in a.items()}
    opt.first_step(params, g0)
    na = R.scaled_norm(a)
    for k in a:  # the perturbation rho*g0/||g0||, whatever the scale of g0
        np.testing.assert_allclose(params[k], 0.1 * a[k] / na, rtol=1e-13, atol=1e-16)
    opt.second_step(params, g1)
    if base_kind == "py":
        for k in a:
            assert np.all(np.isfinite(base.seen_grads[-1][k])), "non-finite combined gradient"
            assert R.rel_err(base.seen_grads[-1][k], expected[k]) <= 1e-12
    for k in a:
        assert np.all(np.isfinite(params[k])), f"{k!r} became non-finite"
        assert R.rel_err(params[k], -lr * expected[k]) <= 1e-12


@pytest.mark.parametrize("typ", ["sam", "asam", "gsam"])
def test_subnormal_gradient_perturbation(typ: str) -> None:
    """g = (3e-320, 4e-320): ||g|| = 5e-320 > 0, so p <- p + rho*g/||g|| = p + rho*(0.6, 0.8)
    (adaptive with T = |p| = (1, 2): p + rho*T^2*g/||T*g||)."""
    p = {"w": np.array([1.0, 2.0])}
    g = {"w": np.array([3e-320, 4e-320])}
    if typ == "gsam":
        opt: Any = GsamOptimizer(SgdOptimizer(), 0.05)
    else:
        opt = SamOptimizer(SgdOptimizer(), 0.05, adaptive=typ == "asam")
    ref = {"w": p["w"].copy()}
    # The ascent is invariant under scaling g: scaled up exactly by 2^1074 the reference
    # works with normal numbers (its norm would otherwise be a subnormal with few bits).
    big = {k: np.ldexp(v, 1074) for k, v in R.to_ref_grads(g, {"w": np.float64}).items()}
    e, n = R.sam_perturbation(ref, big, 0.05, adaptive=typ == "asam")
    assert n > 0 and e is not None and np.all(np.isfinite(e["w"]))
    opt.first_step(p, g)
    assert np.all(np.isfinite(p["w"])), f"params became {p['w']}"
    np.testing.assert_allclose(p["w"], ref["w"] + e["w"], rtol=1e-12)


# ----------------------------------------------------------------------------- rho schedule


@pytest.mark.parametrize("lr_max,lr_min", [(0.1, 0.0), (0.1, 0.01), (0.01, 0.01),
                                           (0.005, 0.01), (0.0, 0.0)])
@pytest.mark.parametrize("rho_min", [None, 0.02, 0.2])
@pytest.mark.parametrize("py", [False, True])
def test_gsam_rho_follows_lr(lr_max: float, lr_min: float, rho_min: float | None,
                             py: bool) -> None:
    """rho = rho_min + (rho_max - rho_min)*(lr - lr_min)/(lr_max - lr_min), clamped into
    [rho_min, rho_max]; rho_max without rho_min or when lr_max <= lr_min; lr_max is the
    base's lr at construction (later set_lr calls do not change it). The first_step moves
    the parameters by exactly that radius."""
    rho_max = 0.2
    base: Any = (PySGD(lr_max, 0.0) if py
                 else SgdOptimizer(OptimizerConfig(learning_rate=lr_max, momentum=0.0)))
    opt = GsamOptimizer(base, rho_max, rho_min, lr_min=lr_min)
    assert opt.lr_max == lr_max and opt.lr_min == lr_min and opt.rho_min == rho_min
    params = {"w": np.array([0.5, -1.0, 2.0]), "v": np.array(3.0, np.float32)}
    lrs = [lr_max, lr_min, 0.5 * (lr_max + lr_min), 0.37 * lr_max + 0.63 * lr_min,
           2.0 * lr_max + 0.1, 0.5 * lr_min, 0.0, lr_max * (1 - 1e-9)]
    for lr in lrs:
        opt.set_lr(lr)
        expected = R.gsam_rho(rho_max, rho_min, lr, lr_min, lr_max)
        if rho_min is None or lr_max <= lr_min:
            assert expected == rho_max
        assert math.isclose(opt.rho, expected, rel_tol=1e-14), (lr, opt.rho, expected)
        assert opt.rho_max == rho_max
        lo = rho_min if rho_min is not None else rho_max
        assert lo <= opt.rho <= rho_max
        start = copies(params)
        g = {"w": np.array([1.0, 2.0, -2.0]), "v": np.array(-4.0)}  # ||g|| = 5
        opt.first_step(params, g)
        e_w = params["w"] - start["w"]
        np.testing.assert_allclose(e_w, expected * g["w"] / 5.0, rtol=1e-13, atol=1e-15)
        opt.restore(params)
        assert_bitwise(params, start)
    assert opt.lr_max == lr_max  # set_lr does not move lr_max
    # assigning rho sets rho_max
    opt.set_lr(lr_max)
    opt.rho = 0.5
    assert opt.rho_max == 0.5
    assert math.isclose(opt.rho, R.gsam_rho(0.5, rho_min, lr_max, lr_min, lr_max),
                        rel_tol=1e-14)


def test_gsam_rho_setter_keeps_rho_min_le_rho_max() -> None:
    opt = GsamOptimizer(SgdOptimizer(), 0.1, rho_min=0.05)
    with pytest.raises(OptimizerError):
        opt.rho = 0.01


@pytest.mark.parametrize("field,value", [
    ("rho_max", 0.0), ("rho_max", -0.1), ("rho_max", float("nan")), ("rho_max", float("inf")),
    ("rho_min", 0.0), ("rho_min", -0.01), ("rho_min", float("nan")), ("rho_min", float("inf")),
    ("rho_min", 0.06), ("rho_min", "0.01"),
    ("alpha", -0.1), ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", "0.4"),
    ("alpha", None),
    ("lr_min", -0.1), ("lr_min", float("nan")), ("lr_min", float("inf")),
])
def test_gsam_bad_constructor_arguments(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = dict(rho_max=0.05, rho_min=0.01, alpha=0.4, lr_min=0.0)
    kwargs[field] = value
    with pytest.raises(OptimizerError) as info:
        GsamOptimizer(SgdOptimizer(), **kwargs)
    key = "rho" if field == "rho_max" else field
    assert info.value.key in (key, field) and info.value.key in str(info.value)


def test_gsam_boundary_constructor_arguments() -> None:
    opt = GsamOptimizer(SgdOptimizer(), 0.05, rho_min=0.05, alpha=0.0, lr_min=0.0)
    assert opt.rho == 0.05 and opt.alpha == 0.0
    opt.set_lr(0.0)
    assert opt.rho == 0.05
    assert GsamOptimizer(SgdOptimizer(), alpha=5.0).alpha == 5.0


# ----------------------------------------------------------------------------- exact restore


def _hard_params(seed: int, n: int = 600) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vals = rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))
    return {"a32": R.make_array(vals[: n // 2].reshape(10, -1), np.float32, "strided").array,
            "b64": R.make_array(vals[n // 2:].reshape(-1, 10), np.float64, "transposed").array,
            "c64": R.make_array(vals[3], np.float64, "C").array}


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "py"])
def test_gsam_restore_is_bitwise_exact(kind: str) -> None:
    """A zero-lr base: after second_step the parameters are bitwise what they were before
    first_step (restoring by subtraction would not be, for this data)."""
    cfg = OptimizerConfig(learning_rate=0.0, momentum=0.0, weight_decay=0.0)
    base: Any = PySGD(0.0, 0.0) if kind == "py" else BASES[kind](cfg)
    opt = GsamOptimizer(base, 0.5, alpha=0.7)
    params = _hard_params(3)
    rng = np.random.default_rng(4)
    inexact = False
    for _ in range(3):
        before = copies(params)
        g0 = {k: np.asarray(rng.standard_normal(v.shape) * 3).astype(np.float16)
              for k, v in params.items()}
        g1 = {k: np.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
        opt.first_step(params, g0)
        # sanity of the data: restoring by subtracting the perturbation is not exact here
        ref_p = {k: w.astype(np.float64) for k, w in before.items()}
        e, _ = R.sam_perturbation(ref_p, R.to_ref_grads(g0, dtypes_of(params)), 0.5)
        assert e is not None
        for k, w in before.items():
            back = (params[k].astype(np.float64) - e[k]).astype(w.dtype)
            inexact |= bool(np.any(back != w))
        opt.second_step(params, g1)
        assert_bitwise(params, before, "GSAM restore")
    assert inexact, "test data too easy: (w+e)-e == w everywhere"
    # and restore() after an abandoned step
    before = copies(params)
    opt.first_step(params, {k: np.ones(v.shape) for k, v in params.items()})
    opt.restore(params)
    assert_bitwise(params, before, "GSAM restore()")
    assert not opt.pending


# ----------------------------------------------------------------------------- atomic errors


def gsam_trained(kind: str) -> tuple[Any, dict[str, np.ndarray]]:
    cfg = OptimizerConfig(learning_rate=0.05, grad_clip=2.0, grad_clip_mode=GradClipMode.NORM)
    base: Any = PySGD() if kind == "py" else BASES[kind](cfg)
    opt = GsamOptimizer(base, 0.1, 0.02, 0.5, eps=1e-12)
    params = {A: np.linspace(-1.0, 2.0, 12, dtype=np.float32).reshape(3, 4),
              Z: np.linspace(0.5, -3.0, 5)}
    for s in range(2):
        opt.first_step(params, good_fn(params)[1])
        opt.second_step(params, {k: v * (1 + s) for k, v in good_fn(params)[1].items()})
    return opt, params


def bad_grads(params: dict[str, np.ndarray], mode: str) -> tuple[dict[str, Any], Any]:
    g: dict[str, Any] = dict(good_fn(params)[1])
    if mode == "nan":
        g[Z] = g[Z].copy()
        g[Z][1] = np.nan
        return g, NonFiniteGradientError
    if mode == "inf":
        g[A] = g[A].copy()
        g[A][0, 2] = -np.inf
        return g, NonFiniteGradientError
    if mode == "overflow":  # finite float64, inf once converted to the float32 parameter
        g[A] = np.full(params[A].shape, 1e300)
        return g, NonFiniteGradientError
    if mode == "missing":
        del g[Z]
    elif mode == "shape":
        g[A] = np.ones((4, 3), np.float32)
    elif mode == "int":
        g[Z] = np.arange(5)
    elif mode == "own":
        g[Z] = params[Z]
        return g, TrainError
    return g, OptimizerError


GSAM_BAD = ["nan", "inf", "overflow", "missing", "shape", "int", "own"]


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "py"])
@pytest.mark.parametrize("mode", GSAM_BAD)
def test_gsam_first_step_errors_change_nothing(kind: str, mode: str) -> None:
    opt, params = gsam_trained(kind)
    grads, exc = bad_grads(params, mode)
    p_snap, g_snap = R.snapshot(params), R.snapshot(grads)
    s_snap = R.state_snapshot(opt.state_dict())
    with pytest.raises(exc):
        opt.first_step(params, grads)
    R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    R.assert_same_snapshot(g_snap, R.snapshot(grads), "grads")
    assert R.state_snapshot(opt.state_dict()) == s_snap and not opt.pending


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "py"])
@pytest.mark.parametrize("mode", GSAM_BAD)
def test_gsam_second_step_errors_change_nothing(kind: str, mode: str) -> None:
    """A bad g1 (a NaN among them): params (still perturbed), grads and the state (with its
    pending saved_/grad0_/grad_norm0) bitwise unchanged; restore() then gives back the
    pre-first_step values, and the run continues as a clean one."""
    opt, params = gsam_trained(kind)
    twin, twin_params = gsam_trained(kind)
    original = copies(params)
    g0 = good_fn(params)[1]
    opt.first_step(params, g0)
    grads, exc = bad_grads(params, mode)
    p_snap, g_snap = R.snapshot(params), R.snapshot(grads)
    s_snap = R.state_snapshot(opt.state_dict())
    assert any(k.startswith("grad0_") for k in s_snap) and "grad_norm0" in s_snap
    with pytest.raises(exc) as info:
        opt.second_step(params, grads)
    if exc is OptimizerError:
        assert not isinstance(info.value, NonFiniteGradientError)
    R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    R.assert_same_snapshot(g_snap, R.snapshot(grads), "grads")
    assert R.state_snapshot(opt.state_dict()) == s_snap and opt.pending
    if kind == "py":
        assert len(opt.base_optimizer.seen_grads) == 2, "the Python base was called"
    opt.restore(params)
    assert_bitwise(params, original, "restore after a failed second_step")
    for p, o in ((params, opt), (twin_params, twin)):
        o.first_step(p, good_fn(p)[1])
        o.second_step(p, {k: -v for k, v in good_fn(p)[1].items()})
    assert_bitwise(params, twin_params, "after recovery")
    assert_bitwise(opt.state_dict(), twin.state_dict(), "state after recovery")


# ----------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("kind,clip_mode", [("sgd", None), ("sgd", "norm"), ("adam", None),
                                            ("adam", "norm"), ("adamw", "value"),
                                            ("adamw", "norm"), ("py", None)])
def test_gsam_resume_between_first_and_second_step(tmp_path: Path, kind: str,
                                                   clip_mode: str | None) -> None:
    """10 GSAM steps with a decaying lr (rho following it), first_step, numpy.savez of the
    state (grad0_<name>, grad_norm0, saved_<name>, ...) and of the perturbed params, load
    into a fresh GsamOptimizer (built like the first), second_step and 9 more steps:
    bitwise the same as 20 steps in a row."""
    # (the Python base keeps no velocity in its state dict: momentum 0 for it)
    c = base_config(kind, clip_mode, lr=0.05, momentum=0.0 if kind == "py" else 0.9)
    s = sam_config("gsam", rho=0.2, rho_min=0.05, alpha=0.5, lr_min=0.005, eps=1e-12)
    specs = specs_of("mixed")
    seq = [grad_pair(specs, np.random.default_rng(100 + t), "zero1" if t == 4 else "")
           for t in range(20)]
    lr_at = lr_decay(0.05)

    def fresh() -> tuple[Any, dict[str, np.ndarray]]:
        _, params, _ = build_params(specs, np.random.default_rng(9))
        return make_pair(c, s)[0], params

    def run(opt: Any, params: dict[str, np.ndarray], start: int, stop: int,
            skip_first: bool = False) -> None:
        for t in range(start, stop):
            if not (skip_first and t == start):
                opt.set_lr(lr_at(t))
                opt.first_step(params, seq[t][0])
            opt.second_step(params, seq[t][1])

    opt, params = fresh()
    run(opt, params, 0, 20)
    straight_params, straight_state = params, opt.state_dict()

    opt, params = fresh()
    run(opt, params, 0, 10)
    before = copies(params)
    opt.set_lr(lr_at(10))
    opt.first_step(params, seq[10][0])
    state = opt.state_dict()
    nonempty = {k for k in params if params[k].size}
    assert {"grad0_" + k for k in nonempty} <= set(state) and "grad_norm0" in state
    assert {"saved_" + k for k in nonempty} <= set(state)
    dts = dtypes_of(params)
    g0_ref = R.to_ref_grads(seq[10][0], dts)
    for k in nonempty:
        assert state["saved_" + k].dtype == params[k].dtype
        assert state["saved_" + k].tobytes() == np.ascontiguousarray(before[k]).tobytes()
        g0k = state["grad0_" + k]
        assert g0k.dtype == params[k].dtype and g0k.shape == params[k].shape
        assert g0k.tobytes() == np.ascontiguousarray(
            np.asarray(seq[10][0][k]).astype(params[k].dtype)).tobytes()
    n0 = state["grad_norm0"]
    assert n0.dtype == np.float64 and n0.shape == ()
    assert abs(float(n0) - R.global_norm(g0_ref)) <= 1e-13 * R.global_norm(g0_ref)
    np.savez(tmp_path / "gsam.npz", **{"opt/" + k: v for k, v in state.items()},
             **{"param/" + k: v for k, v in params.items()})
    del opt, params
    opt, params = fresh()
    with np.load(tmp_path / "gsam.npz") as z:
        opt.load_state_dict({k[4:]: z[k] for k in z.files if k.startswith("opt/")})
        for k in params:
            params[k][...] = z["param/" + k]
    assert opt.pending
    with pytest.raises(OptimizerError):
        opt.first_step(params, seq[10][0])  # a pending step was loaded
    run(opt, params, 10, 20, skip_first=True)
    assert_bitwise(params, straight_params, "resumed params")
    assert_bitwise(opt.state_dict(), straight_state, "resumed state")


def _pending_gsam() -> tuple[Any, dict[str, np.ndarray]]:
    opt, params = gsam_trained("adam")
    opt.first_step(params, good_fn(params)[1])
    return opt, params


@pytest.mark.parametrize("edit", ["no_grad0", "no_saved", "no_norm", "norm_zero",
                                  "norm_negative", "norm_nan", "norm_inf", "norm_vector",
                                  "grad0_nan", "grad0_int", "grad0_extra"])
def test_gsam_corrupt_pending_state_rejected(edit: str) -> None:
    """A pending GSAM state dict missing one of its parts, or with bad values, is rejected
    by a fresh and by a used optimizer, which stay unchanged."""
    opt, _ = _pending_gsam()
    state = opt.state_dict()
    if edit == "no_grad0":
        del state["grad0_" + A]
    elif edit == "no_saved":
        del state["saved_" + Z]
    elif edit == "no_norm":
        del state["grad_norm0"]
    elif edit.startswith("norm_"):
        state["grad_norm0"] = {"norm_zero": np.array(0.0), "norm_negative": np.array(-1.0),
                               "norm_nan": np.array(np.nan), "norm_inf": np.array(np.inf),
                               "norm_vector": np.array([1.0, 2.0])}[edit]
    elif edit == "grad0_nan":
        state["grad0_" + Z] = state["grad0_" + Z].copy()
        state["grad0_" + Z][0] = np.nan
    elif edit == "grad0_int":
        state["grad0_" + Z] = state["grad0_" + Z].astype(np.int64)
    else:
        state["grad0_ghost"] = np.ones(3)
    for target in (GsamOptimizer(AdamOptimizer(), 0.1), gsam_trained("adam")[0]):
        before = R.state_snapshot(target.state_dict())
        pending = target.pending
        with pytest.raises(OptimizerError):
            target.load_state_dict(state)
        assert R.state_snapshot(target.state_dict()) == before and target.pending == pending


# ----------------------------------------------------------------------------- alpha = 0


@pytest.mark.parametrize("kind,clip_mode", [
    (kind, clip_mode)
    for kind in ["sgd", "adam", "adamw", "py"]
    for clip_mode in [None, "value", "norm"]
    if not (kind == "py" and clip_mode is not None)  # the Python base does not clip
])
def test_gsam_alpha_zero_is_sam_bitwise(kind: str, clip_mode: str | None) -> None:
    """GSAM with alpha = 0 steps with g1 itself: params and state bitwise those of
    SamOptimizer (GSAM's pending state has grad0_/grad_norm0 in addition), for the
    two-phase API and for sam_step with interval 2."""
    c = base_config(kind, clip_mode)
    specs = specs_of("mixed")
    if kind == "py":  # SAM hands a Python base the caller's gradients, GSAM its own
        for sp in specs:  # (in the parameter's dtype): the same bits only in that case
            sp["gdtype"] = sp["dtype"]
    runs = []
    for typ in ("sam", "gsam"):
        rng = np.random.default_rng(21)
        _, params, _ = build_params(specs, rng)
        opt, _ = make_pair(c, sam_config(typ, alpha=0.0, rho=0.15, eps=1e-12, interval=2))
        seen = []
        for t in range(30):
            mode = "zero0" if t % 7 == 3 else "zero1" if t % 11 == 5 else ""
            g0, g1 = grad_pair(specs, rng, mode)
            opt.first_step(params, g0)
            pending_state = {k: v for k, v in opt.state_dict().items()
                             if not k.startswith("grad0_") and k != "grad_norm0"}
            perturbed = copies(params)
            opt.second_step(params, g1)
            seen.append((pending_state, perturbed, copies(params), opt.state_dict()))
        fn = Quadratic(specs, 22)
        for _ in range(10):
            opt.sam_step(params, fn)
            seen.append(({}, {}, copies(params), opt.state_dict()))
        if kind == "py":
            seen.append(({}, {}, opt.base_optimizer.seen_grads[-1],  # type: ignore
                          {"n": np.array(len(opt.base_optimizer.seen_grads))}))
        runs.append(seen)
    for t, (a, b) in enumerate(zip(*runs)):
        for part, x, y in zip(("pending state", "perturbed", "params", "state"), a, b):
            assert_bitwise(x, y, f"step {t}: {part}")
