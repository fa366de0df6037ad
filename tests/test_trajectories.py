"""samopt against the float64 reference (tests/reference.py) over 100-step trajectories,
SAM's exact restore, Python-written base optimizers, empty inputs, ignored gradients and
compute_gradient_norm's numerics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import reference as R
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    compute_gradient_norm,
)

STEPS = 100
CHECK_AT = {0, 1, 9, 50, STEPS - 1}
NAMES = ["w", "layer1.weight", "layer1.bias", "b", "emb/λ", "z0", "a_b", "head.out"]
MAX_DIM = {0: 1, 1: 200, 2: 12, 3: 5, 4: 3}


# ----------------------------------------------------------------------------- strategies


@st.composite
def array_specs(draw: Any, max_arrays: int = 6) -> list[dict[str, Any]]:
    n = draw(st.integers(1, max_arrays))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    specs = []
    for name in names:
        ndim = draw(st.integers(0, 4))
        shape = tuple(draw(st.integers(0, MAX_DIM[ndim])) for _ in range(ndim))
        specs.append(
            dict(
                name=name,
                shape=shape,
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                layout=draw(st.sampled_from(R.LAYOUTS)),
                gdtype=draw(st.sampled_from([np.float16, np.float32, np.float64])),
                glayout=draw(st.sampled_from(R.LAYOUTS)),
                gscale=draw(st.sampled_from([0.01, 1.0, 30.0])),
            )
        )
    if all(math.prod(s["shape"]) == 0 for s in specs):
        specs[0]["shape"] = (3,)  # at least one non-empty array
    return specs


# Adam with an L2 penalty and a large learning rate drives small weights back and forth
# across zero, where g = clip(g) + wd·p cancels: the trajectory itself is then unstable. A
# 1e-7 relative change of the starting values (float32's rounding) moved the float64
# reference's own trajectory by 2.4e-4 relative within 50 SAM steps (lr 0.156, wd 0.01), so
# no float32 implementation can stay within 2e-5 of it there. Below this lr it is stable.
L2_ADAM_MAX_LR = 0.02
# Below it too when beta1 is near 0: Adam is then close to sign descent, and the sign of a
# cancelling g + wd·p follows float32's rounding. Hypothesis found beta1 0, lr 0.0195,
# wd 0.01, norm clipping at 0.125, float16 gradients of scale 0.01: 2.5e-5 off the float64
# reference after 100 SAM steps. L2 Adam is drawn with beta1 >= 0.5 (the quadratic test's
# bound, for the same reason).
L2_ADAM_MIN_BETA1 = 0.5


@st.composite
def base_configs(draw: Any, kind: str) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    wd = draw(st.one_of(st.none(), st.just(0.01), st.floats(0.0, 0.1)))
    l2_adam = kind == "adam" and bool(wd)
    return dict(
        kind=kind,
        lr=draw(st.floats(1e-4, L2_ADAM_MAX_LR if l2_adam else 0.2)),
        momentum=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95))),
        beta1=draw(st.one_of(st.just(0.9),
                             st.floats(L2_ADAM_MIN_BETA1 if l2_adam else 0.0, 0.95))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        wd=wd,
        nesterov=kind == "sgd" and draw(st.booleans()),
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


@st.composite
def sam_configs(draw: Any) -> dict[str, Any]:
    adaptive = draw(st.booleans())
    return dict(
        rho=draw(st.one_of(st.just(0.05), st.floats(0.01, 0.5))),
        adaptive=adaptive,
        eta=draw(st.sampled_from([0.0, 0.01])) if adaptive else 0.0,
    )


# ----------------------------------------------------------------------------- builders


def make_config(c: dict[str, Any]) -> OptimizerConfig:
    return OptimizerConfig(
        learning_rate=c["lr"],
        momentum=c["momentum"],
        beta1=c["beta1"],
        beta2=c["beta2"],
        epsilon=c["eps"],
        weight_decay=c["wd"],
        nesterov=c.get("nesterov", False),
        grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.NORM if c["clip_mode"] == "norm" else GradClipMode.VALUE,
    )


def make_pair(c: dict[str, Any], sam: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(samopt optimizer, reference optimizer) for a drawn configuration."""
    cfg = make_config(c)
    mode = c["clip_mode"] or "value"
    wd = R.effective_weight_decay(c["kind"], c["wd"])
    if c["kind"] == "sgd":
        opt: Any = SgdOptimizer(cfg)
        ref: Any = R.RefSGD(c["lr"], c["momentum"], c["clip"], mode, weight_decay=wd,
                            nesterov=c.get("nesterov", False))
    elif c["kind"] == "adam":
        opt = AdamOptimizer(cfg)
        ref = R.RefAdam(c["lr"], c["beta1"], c["beta2"], c["eps"], wd, clip=c["clip"],
                        clip_mode=mode)
    else:
        opt = AdamWOptimizer(cfg)
        ref = R.RefAdamW(c["lr"], c["beta1"], c["beta2"], c["eps"], wd, c["clip"], mode)
    if sam is not None:
        opt = SamOptimizer(opt, sam["rho"], adaptive=sam["adaptive"], eta=sam["eta"])
        ref = R.RefSAM(ref, sam["rho"], sam["adaptive"], sam["eta"])
    return opt, ref


def build_params(specs: list[dict[str, Any]], rng: np.random.Generator
                 ) -> tuple[dict[str, R.Holder], dict[str, np.ndarray]]:
    holders = {}
    for s in specs:
        vals = rng.standard_normal(s["shape"]) * rng.choice([0.1, 1.0, 5.0])
        holders[s["name"]] = R.make_array(vals, s["dtype"], s["layout"])
    # float64 reference copies of the values actually stored
    ref_params = {k: h.array.astype(np.float64) for k, h in holders.items()}
    return holders, ref_params


def build_grads(specs: list[dict[str, Any]], rng: np.random.Generator,
                zero: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        vals = np.zeros(s["shape"]) if zero else rng.standard_normal(s["shape"]) * s["gscale"]
        out[s["name"]] = R.make_array(vals, s["gdtype"], s["glayout"]).array
    return out


def dtypes_of(params: dict[str, np.ndarray]) -> dict[str, np.dtype]:
    return {k: v.dtype for k, v in params.items()}


def track(scales: R.ScaleTracker, ref_params: Any, ref: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref.state_dict(), "state:")


def check_against_reference(params: dict[str, np.ndarray], opt: Any, ref_params: Any,
                            ref: Any, what: str, scales: R.ScaleTracker,
                            coupled: bool = False) -> None:
    tol = R.coupled_f64_tol(params, coupled)
    R.assert_params_close(params, ref_params, what, tol, scales)
    R.assert_state_close(opt.state_dict(), ref.state_dict(), params, what, tol, scales)


def assert_grads_untouched(seq: list[dict[str, np.ndarray]],
                           copies: list[dict[str, np.ndarray]]) -> None:
    for t, (g, c) in enumerate(zip(seq, copies)):
        for k in g:
            assert g[k].dtype == c[k].dtype and g[k].shape == c[k].shape
            assert g[k].tobytes() == c[k].tobytes(), f"gradient {k!r} of step {t} modified"


def assert_in_place(params: dict[str, np.ndarray], holders: dict[str, R.Holder]) -> None:
    assert list(params) == list(holders), "the params mapping was resized or reordered"
    for k, h in holders.items():
        assert params[k] is h.array, f"params[{k!r}] was rebound: updates must be in place"
        assert h.outside_untouched(), f"{k!r}: memory outside the view was written"


# ----------------------------------------------------------------------------- trajectories


def run_base(specs: list[dict[str, Any]], c: dict[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    opt, ref = make_pair(c)
    seq = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq]
    dts = dtypes_of(params)
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t, g in enumerate(seq):
        ref.step(ref_params, R.to_ref_grads(g, dts))
        track(scales, ref_params, ref)
        opt.step(params, g)
        if t in CHECK_AT:
            check_against_reference(params, opt, ref_params, ref, f"{c['kind']} step {t}",
                                    scales)
    assert_in_place(params, holders)
    assert_grads_untouched(seq, copies)


def run_sam(specs: list[dict[str, Any]], c: dict[str, Any], s: dict[str, Any], seed: int,
            zero_every: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    opt, ref = make_pair(c, s)
    seq1 = [build_grads(specs, rng, zero=zero_every > 0 and t % zero_every == 3)
            for t in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    coupled = s["adaptive"]  # the norm over |p|*g couples the arrays through their values
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        ref.first_step(ref_params, R.to_ref_grads(seq1[t], dts))
        track(scales, ref_params, ref)
        assert opt.first_step(params, seq1[t]) is None
        if t in CHECK_AT or (zero_every and t % zero_every == 3):
            check_against_reference(params, opt, ref_params, ref, f"SAM first_step {t}",
                                    scales, coupled)
        ref.second_step(ref_params, R.to_ref_grads(seq2[t], dts))
        track(scales, ref_params, ref)
        if t % 2:
            opt.second_step(params, seq2[t])
        else:
            opt.step(params, seq2[t])  # step == second_step
        if t in CHECK_AT:
            check_against_reference(params, opt, ref_params, ref, f"SAM second_step {t}",
                                    scales, coupled)
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@settings(max_examples=200)
@given(data=st.data())
def test_base_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(kind), label="config")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    run_base(specs, c, seed)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@settings(max_examples=300)
@given(data=st.data())
def test_sam_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(kind), label="config")
    s = data.draw(sam_configs(), label="sam")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    zero_every = data.draw(st.sampled_from([0, 0, 7]), label="zero_every")
    run_sam(specs, c, s, seed, zero_every)


@pytest.mark.parametrize(
    "kind,clip_mode,adaptive,eta",
    [
        (kind, clip, adaptive, eta)
        for kind in ("sgd", "adam", "adamw")
        for clip in (None, "value", "norm")
        for adaptive, eta in ((False, 0.0), (True, 0.0), (True, 0.01))
    ],
)
@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
def test_sam_trajectory_every_combination(kind: str, clip_mode: str | None, adaptive: bool,
                                          eta: float, dtypes: str) -> None:
    """Each (base, clipping, SAM variant) once, on a fixed mixed-layout dict of mixed
    dtypes, and of float64 only (float64 tolerance whatever the coupling)."""
    specs = [
        dict(name="conv.w", shape=(3, 2, 4, 2), dtype=np.float32, layout="strided",
             gdtype=np.float16, glayout="F", gscale=1.0),
        dict(name="fc.w", shape=(6, 5), dtype=np.float64, layout="transposed",
             gdtype=np.float32, glayout="strided", gscale=30.0),
        dict(name="fc.b", shape=(5,), dtype=np.float64, layout="reversed",
             gdtype=np.float64, glayout="C", gscale=0.01),
        dict(name="scale", shape=(), dtype=np.float32, layout="C",
             gdtype=np.float64, glayout="C", gscale=1.0),
        dict(name="empty", shape=(0, 3), dtype=np.float32, layout="F",
             gdtype=np.float32, glayout="C", gscale=1.0),
        dict(name="f", shape=(4, 3), dtype=np.float64, layout="F",
             gdtype=np.float16, glayout="transposed", gscale=1.0),
    ]
    if dtypes == "float64":
        for sp in specs:
            sp["dtype"] = np.float64
    c = dict(kind=kind, lr=0.05, momentum=0.9, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.05,
             clip_mode=clip_mode, clip=None if clip_mode is None else 0.5)
    run_sam(specs, c, dict(rho=0.1, adaptive=adaptive, eta=eta), seed=1234, zero_every=7)


# Gradients that depend on the parameters: a diagonal quadratic 0.5*a*(p-c)^2, computed
# from samopt's parameters (as a training loop would) and fed to both samopt and the
# reference. For SAM the second gradient is taken at the perturbed point.


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@settings(max_examples=120)
@given(data=st.data())
def test_quadratic_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(max_arrays=4), label="arrays")
    c = data.draw(base_configs(kind), label="config")
    c["lr"] = min(c["lr"], 0.05)
    # With beta1 near 0 Adam is close to sign descent, which near the quadratic's minimum
    # flips with the sign of each rounded gradient: the float64 reference's own trajectory
    # moved by 8e-3 relative over 100 steps when its starting values changed by 1e-7
    # (beta1 0, beta2 0.625, float16 gradients), so no float32 run can follow it there.
    if kind != "sgd":
        c["beta1"] = max(c["beta1"], 0.5)
    s = data.draw(st.one_of(st.none(), sam_configs()), label="sam")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    curv = {sp["name"]: rng.uniform(0.5, 2.0, sp["shape"]) for sp in specs}
    center = {sp["name"]: rng.standard_normal(sp["shape"]) for sp in specs}
    gmeta = {sp["name"]: sp for sp in specs}

    def grad_of(ps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: R.make_array(curv[k] * (p.astype(np.float64) - center[k]),
                            gmeta[k]["gdtype"], gmeta[k]["glayout"]).array
            for k, p in ps.items()
        }

    opt, ref = make_pair(c, s)
    dts = dtypes_of(params)
    coupled = s is not None or c["clip_mode"] == "norm"  # gradients depend on the params
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    start = {k: v.copy() for k, v in params.items()}
    start_dist = max(float(np.max(np.abs(p - center[k]), initial=0.0))
                     for k, p in ref_params.items())
    for t in range(STEPS):
        if s is not None:
            g1 = grad_of(params)
            ref.first_step(ref_params, R.to_ref_grads(g1, dts))
            track(scales, ref_params, ref)
            opt.first_step(params, g1)
            if t in CHECK_AT:
                check_against_reference(params, opt, ref_params, ref, f"quadratic fs {t}",
                                        scales, coupled)
        g = grad_of(params)
        gc = {k: v.copy() for k, v in g.items()}
        ref.step(ref_params, R.to_ref_grads(g, dts))
        track(scales, ref_params, ref)
        opt.step(params, g)
        assert_grads_untouched([g], [gc])
        if t in CHECK_AT:
            check_against_reference(params, opt, ref_params, ref, f"quadratic step {t}",
                                    scales, coupled)
    assert_in_place(params, holders)
    # sanity: the optimisation actually moved the parameters towards the minimum
    end_dist = max(float(np.max(np.abs(p.astype(np.float64) - center[k]), initial=0.0))
                   for k, p in params.items())
    assert any(np.any(params[k] != start[k]) for k in params if params[k].size)
    assert end_dist <= 2.0 * start_dist + 1.0


# ----------------------------------------------------------------------------- SAM restore


def _random_params(seed: int, n: int = 2000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vals = rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))
    return {
        "a32": R.make_array(vals[: n // 2].reshape(10, -1), np.float32, "strided").array,
        "b64": R.make_array(vals[n // 2:].reshape(-1, 10), np.float64, "transposed").array,
        "c32": R.make_array(vals[:7], np.float32, "reversed").array,
        "d64": R.make_array(vals[5], np.float64, "C").array,
    }


def _grads_like(params: dict[str, np.ndarray], seed: int, dtype: Any = None
                ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.standard_normal(p.shape) * 3).astype(dtype or p.dtype)
            for k, p in params.items()}


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_restore_is_bitwise_exact_with_zero_lr_base(kind: str, adaptive: bool,
                                                    eta: float) -> None:
    cfg = OptimizerConfig(learning_rate=0.0, momentum=0.0, weight_decay=0.0)
    base = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}[kind](cfg)
    sam = SamOptimizer(base, rho=0.5, adaptive=adaptive, eta=eta)
    params = _random_params(7)
    inexact_steps = 0
    for step in range(3):
        before = {k: v.copy() for k, v in params.items()}
        g = _grads_like(params, 100 + step, np.float16)
        sam.first_step(params, g)
        assert any(np.any(params[k] != before[k]) for k in params)
        # sanity of the test data: restoring by subtracting the perturbation would not be
        # exact, (w+e)-e != w, for some element of some step
        ref_p = {k: v.astype(np.float64) for k, v in before.items()}
        R.RefSAM(None, 0.5, adaptive, eta).first_step(ref_p, R.to_ref_grads(
            g, {k: v.dtype for k, v in params.items()}))
        for k, w in before.items():
            e = ref_p[k] - w.astype(np.float64)
            back = (params[k].astype(np.float64) - e).astype(w.dtype)
            if np.any(back != w):
                inexact_steps += 1
                break
        sam.second_step(params, _grads_like(params, 200 + step))
        for k in params:
            assert params[k].tobytes() == before[k].tobytes(), f"{k!r} not restored exactly"
    assert inexact_steps > 0, "test data too easy: (w+e)-e == w everywhere in every step"


class RecordingSGD:
    """A base optimizer written in Python: plain SGD that records what it is given."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr
        self.seen: list[dict[str, np.ndarray]] = []
        self.seen_ids: list[dict[str, int]] = []
        self.seen_grads: list[dict[str, np.ndarray]] = []
        self.zero_grad_calls = 0
        self.loaded: list[dict[str, np.ndarray]] = []

    def step(self, params: Any, grads: Any) -> None:
        self.seen.append({k: np.array(v, copy=True) for k, v in params.items()})
        self.seen_ids.append({k: id(v) for k, v in params.items()})
        self.seen_grads.append({k: np.array(grads[k], copy=True) for k in params})
        for k, p in params.items():
            p -= self.lr * np.asarray(grads[k], dtype=p.dtype)

    def zero_grad(self) -> None:
        self.zero_grad_calls += 1

    def get_lr(self) -> float:
        return self.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"lr": np.array(self.lr)}

    def load_state_dict(self, state: Any) -> None:
        self.loaded.append(dict(state))
        self.lr = float(state["lr"])


def test_python_base_optimizer_sees_original_params() -> None:
    base = RecordingSGD(0.1)
    assert isinstance(base, samopt.Optimizer)
    sam = SamOptimizer(base, rho=0.3)
    params = _random_params(11)
    ids = {k: id(v) for k, v in params.items()}
    for step in range(4):
        before = {k: v.copy() for k, v in params.items()}
        g1 = _grads_like(params, 10 + step)
        g2 = _grads_like(params, 20 + step, np.float64)
        sam.first_step(params, g1)
        assert len(base.seen) == step, "first_step must not call the base optimizer"
        assert any(np.any(params[k] != before[k]) for k in params)
        sam.second_step(params, g2)
        assert len(base.seen) == step + 1
        seen = base.seen[-1]
        assert set(seen) == set(params)
        for k in params:
            assert seen[k].dtype == before[k].dtype
            assert seen[k].tobytes() == before[k].tobytes(), (
                f"base saw a {k!r} that is not the pre-first_step value")
            assert base.seen_ids[-1][k] == ids[k], "base must get the caller's arrays"
            np.testing.assert_array_equal(base.seen_grads[-1][k], g2[k])
            expected = before[k] - 0.1 * g2[k].astype(before[k].dtype)
            assert params[k].tobytes() == expected.tobytes(), "base's in-place update lost"
            assert params[k] is not None and id(params[k]) == ids[k]


def test_python_base_delegation_and_state() -> None:
    base = RecordingSGD(0.1)
    sam = SamOptimizer(base, rho=0.2)
    assert sam.base_optimizer is base
    assert sam.get_lr() == 0.1
    sam.set_lr(0.25)
    assert base.lr == 0.25 and sam.get_lr() == 0.25
    sam.zero_grad()
    assert base.zero_grad_calls == 1
    params = {"w": np.arange(1.0, 5.0)}
    sam.first_step(params, {"w": np.ones(4)})
    sd = R.without_extra_keys(sam.state_dict())
    assert set(sd) == {"lr", "rho", "saved_w"}
    assert float(sd["lr"]) == 0.25 and float(sd["rho"]) == 0.2
    np.testing.assert_array_equal(sd["saved_w"], np.arange(1.0, 5.0))
    sam.second_step(params, {"w": np.ones(4)})
    np.testing.assert_array_equal(params["w"], np.arange(1.0, 5.0) - 0.25)
    assert set(R.without_extra_keys(sam.state_dict())) == {"lr", "rho"}


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_second_step_without_pending_is_plain_base_step(kind: str) -> None:
    cls = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}[kind]
    cfg = OptimizerConfig(learning_rate=0.05, grad_clip=1.0, grad_clip_mode=GradClipMode.NORM)
    p1 = _random_params(3)
    p2 = _random_params(3)  # same values and memory layouts
    bare = cls(cfg)
    sam = SamOptimizer(cls(cfg), rho=0.1)
    for step in range(3):
        g = _grads_like(p1, step)
        bare.step(p1, g)
        sam.second_step(p2, g)
        # a first_step with all-zero gradients leaves nothing pending: same again
        sam.first_step(p2, {k: np.zeros_like(v) for k, v in p2.items()})
        assert not any(k.startswith("saved_") for k in sam.state_dict())
        g = _grads_like(p1, 50 + step)
        bare.step(p1, g)
        sam.step(p2, g)
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes()
    sd_bare, sd_sam = bare.state_dict(), R.without_extra_keys(sam.state_dict())
    assert set(sd_sam) == set(sd_bare) | {"rho"}
    for k in sd_bare:
        assert sd_bare[k].tobytes() == sd_sam[k].tobytes() and sd_bare[k].dtype == sd_sam[k].dtype


def test_sam_attributes() -> None:
    base = SgdOptimizer()
    sam = SamOptimizer(base, 0.07, adaptive=True, eta=0.01)
    assert sam.base_optimizer is base
    assert sam.rho == 0.07 and sam.adaptive is True and sam.eta == 0.01
    sam2 = SamOptimizer(base)
    assert sam2.rho == 0.05 and sam2.adaptive is False and sam2.eta == 0.0
    for o in (base, AdamOptimizer(), AdamWOptimizer(), sam):
        assert isinstance(o, samopt.Optimizer)
    cfg = OptimizerConfig()
    assert (cfg.learning_rate, cfg.momentum, cfg.beta1, cfg.beta2, cfg.epsilon,
            cfg.weight_decay, cfg.grad_clip, cfg.grad_clip_mode, cfg.nesterov) == (
        1e-3, 0.9, 0.9, 0.999, 1e-8, None, None, GradClipMode.VALUE, False)
    assert SgdOptimizer().get_lr() == 1e-3
    assert SgdOptimizer(cfg).config == cfg


# ----------------------------------------------------------------------------- empty / ignored


def _all_optimizers() -> list[Any]:
    cfg = OptimizerConfig(learning_rate=0.05, grad_clip=0.5, grad_clip_mode=GradClipMode.NORM)
    out: list[Any] = []
    for cls in (SgdOptimizer, AdamOptimizer, AdamWOptimizer):
        out.append(cls(cfg))
        out.append(SamOptimizer(cls(cfg), 0.1))
        out.append(SamOptimizer(cls(cfg), 0.1, adaptive=True, eta=0.01))
    return out


@pytest.mark.parametrize("idx", range(9))
def test_empty_dicts_change_nothing(idx: int) -> None:
    opt = _all_optimizers()[idx]
    params = {"w": np.array([1.0, -2.0])}
    opt.step(params, {"w": np.array([0.5, 0.25])})  # some state first
    before = R.state_snapshot(opt.state_dict())
    for _ in range(3):
        if isinstance(opt, SamOptimizer):
            opt.first_step({}, {})
            assert R.state_snapshot(opt.state_dict()) == before
            opt.second_step({}, {})
        else:
            opt.step({}, {})
        assert R.state_snapshot(opt.state_dict()) == before
    assert compute_gradient_norm({}) == 0.0


@pytest.mark.parametrize("idx", range(9))
def test_size_zero_arrays_change_nothing(idx: int) -> None:
    """Adding size-0 parameters changes neither them nor anything else, bitwise."""
    opt_a, opt_b = _all_optimizers()[idx], _all_optimizers()[idx]
    pa = _random_params(5)
    pb = _random_params(5)  # same values and memory layouts
    empties = {"e0": np.zeros((0,), np.float32), "e1": np.zeros((3, 0, 2), np.float64),
               "e2": np.zeros((0, 4), np.float32).T}
    pb.update(empties)
    for step in range(4):
        g1 = _grads_like(pa, step)
        g2 = _grads_like(pa, 100 + step)
        gb1 = dict(g1, e0=np.zeros(0, np.float16), e1=np.zeros((3, 0, 2)),
                   e2=np.zeros((4, 0), np.float32))
        gb2 = dict(g2, e0=np.zeros(0, np.float16), e1=np.zeros((3, 0, 2)),
                   e2=np.zeros((4, 0), np.float32))
        if isinstance(opt_a, SamOptimizer):
            opt_a.first_step(pa, g1)
            opt_b.first_step(pb, gb1)
        opt_a.step(pa, g2)
        opt_b.step(pb, gb2)
    for k in pa:
        assert pa[k].tobytes() == pb[k].tobytes()
    for k, v in empties.items():
        assert pb[k] is v and v.size == 0
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for k in sa:
        assert sa[k].tobytes() == sb[k].tobytes() and sa[k].dtype == sb[k].dtype
    for k in set(sb) - set(sa):
        assert np.asarray(sb[k]).size == 0, f"extra state {k!r} for a size-0 array"


@pytest.mark.parametrize("idx", range(9))
def test_gradients_of_absent_names_are_ignored(idx: int) -> None:
    """Extra gradients (huge, NaN, even an integer array) neither raise nor enter norms."""
    opt_a, opt_b = _all_optimizers()[idx], _all_optimizers()[idx]
    pa = _random_params(9)
    pb = _random_params(9)  # same values and memory layouts
    extra = {"ghost": np.full(10, 1e6), "nan_ghost": np.array([np.nan, np.inf]),
             "int_ghost": np.arange(3)}
    for step in range(4):
        g1 = _grads_like(pa, step)
        g2 = _grads_like(pa, 100 + step)
        if isinstance(opt_a, SamOptimizer):
            opt_a.first_step(pa, g1)
            opt_b.first_step(pb, {**extra, **g1})
        opt_a.step(pa, g2)
        opt_b.step(pb, {**g2, **extra})
    for k in pa:
        assert pa[k].tobytes() == pb[k].tobytes(), f"{k!r}: absent-name gradient had an effect"
    assert R.state_snapshot(opt_a.state_dict()) == R.state_snapshot(opt_b.state_dict())


def test_norm_clipping_uses_only_this_steps_params() -> None:
    """NORM clipping's global norm is over the parameters of this step only."""
    cfg = OptimizerConfig(learning_rate=1.0, momentum=0.0, grad_clip=1.0,
                          grad_clip_mode=GradClipMode.NORM)
    opt = SgdOptimizer(cfg)
    big = {"big": np.zeros(3)}
    opt.step(big, {"big": np.array([100.0, 0.0, 0.0])})
    np.testing.assert_allclose(big["big"], [-1.0, 0.0, 0.0], rtol=1e-15)
    small = {"small": np.zeros(2)}
    opt.step(small, {"small": np.array([0.3, 0.4]), "big": np.array([100.0, 0.0, 0.0])})
    np.testing.assert_allclose(small["small"], [-0.3, -0.4], rtol=1e-15)
    both = {"a": np.zeros(2), "b": np.zeros(1)}
    opt2 = SgdOptimizer(cfg)
    opt2.step(both, {"a": np.array([3.0, 0.0]), "b": np.array([4.0])})
    np.testing.assert_allclose(both["a"], [-0.6, 0.0], rtol=1e-15)
    np.testing.assert_allclose(both["b"], [-0.8], rtol=1e-15)


def test_small_hand_computed_values() -> None:
    """A few values worked out by hand from SPEC's formulas (independent of reference.py)."""
    # SGD: v = 0.5*0 + 0.1*2 = 0.2 ; p = 1 - 0.2 ; then v = 0.5*0.2 + 0.1*2 = 0.3 ; p = 0.5
    p = {"w": np.array([1.0])}
    o = SgdOptimizer(OptimizerConfig(learning_rate=0.1, momentum=0.5))
    o.step(p, {"w": np.array([2.0])})
    o.step(p, {"w": np.array([2.0])})
    np.testing.assert_allclose(p["w"], [0.5], rtol=1e-15)
    np.testing.assert_allclose(o.state_dict()["velocity_w"], [0.3], rtol=1e-15)
    # Adam step 1: m = 0.1 g, v = 0.001 g^2, lr_t = lr*sqrt(0.001)/0.1 -> p -= lr*g/(|g|+eps')
    p = {"w": np.array([1.0, 1.0])}
    o = AdamOptimizer(OptimizerConfig(learning_rate=0.01, epsilon=1e-12))
    o.step(p, {"w": np.array([4.0, -0.5])})
    np.testing.assert_allclose(p["w"], [0.99, 1.01], rtol=1e-10)
    # AdamW step 1 adds -lr*wd*p_old
    p = {"w": np.array([2.0])}
    o = AdamWOptimizer(OptimizerConfig(learning_rate=0.01, epsilon=1e-12, weight_decay=0.1))
    o.step(p, {"w": np.array([3.0])})
    np.testing.assert_allclose(p["w"], [2.0 - 0.01 - 0.01 * 0.1 * 2.0], rtol=1e-10)
    # SAM: g = (3, 4) -> n = 5, p += 0.5*g/5
    p = {"w": np.array([1.0, 1.0])}
    s = SamOptimizer(SgdOptimizer(), 0.5)
    s.first_step(p, {"w": np.array([3.0, 4.0])})
    np.testing.assert_allclose(p["w"], [1.3, 1.4], rtol=1e-15)
    # ASAM eta=0: T = |p| = (1, 2); T*g = (3, 8), n = sqrt(73); p += 0.5*T^2*g/n
    p = {"w": np.array([1.0, -2.0])}
    s = SamOptimizer(SgdOptimizer(), 0.5, adaptive=True)
    s.first_step(p, {"w": np.array([3.0, 4.0])})
    n = math.sqrt(73.0)
    np.testing.assert_allclose(p["w"], [1.0 + 0.5 * 3 / n, -2.0 + 0.5 * 16 / n], rtol=1e-14)
    # VALUE clipping clamps each element
    p = {"w": np.array([0.0, 0.0, 0.0])}
    o = SgdOptimizer(OptimizerConfig(learning_rate=1.0, momentum=0.0, grad_clip=0.5))
    o.step(p, {"w": np.array([2.0, -0.25, -9.0])})
    np.testing.assert_allclose(p["w"], [-0.5, 0.25, 0.5], rtol=1e-15)


# ----------------------------------------------------------------------------- gradient norm


def test_gradient_norm_no_overflow_or_underflow() -> None:
    r = compute_gradient_norm({"g": np.array([1e200, 1e200])})
    assert isinstance(r, float)
    assert abs(r - math.sqrt(2) * 1e200) <= 1e-15 * math.sqrt(2) * 1e200
    r = compute_gradient_norm({"g": np.array([1e-200])})
    assert abs(r - 1e-200) <= 1e-15 * 1e-200
    r = compute_gradient_norm({"a": np.array([1e308]), "b": np.array([1e308])})
    assert math.isfinite(r) and abs(r - math.sqrt(2) * 1e308) <= 1e-15 * r
    r = compute_gradient_norm({"a": np.array([3e-300, 4e-300])})
    assert abs(r - 5e-300) <= 1e-15 * 5e-300
    r = compute_gradient_norm({"a": np.array([1e200]), "b": np.array([1e-200, 3.0])})
    assert r == 1e200
    assert compute_gradient_norm({"a": np.array([5e-324])}) == 5e-324
    assert compute_gradient_norm({"a": np.zeros(5), "b": np.zeros((0, 3))}) == 0.0
    assert compute_gradient_norm({"a": np.array(-2.5)}) == 2.5


def test_gradient_norm_low_precision_inputs_accumulate_in_float64() -> None:
    # float16: 300^2 * 1000 overflows float16 (and float32 would be fine); the exact
    # float64 answer is sqrt(1000)*300.
    g16 = np.full(1000, 300.0, np.float16)
    assert abs(compute_gradient_norm({"g": g16}) - math.sqrt(1000) * 300) <= 1e-13 * 1e4
    g32 = np.full(10, 3e38, np.float32)  # squares overflow float32
    exp = math.sqrt(10) * float(np.float32(3e38))
    assert abs(compute_gradient_norm({"g": g32}) - exp) <= 1e-15 * exp
    g32 = np.full(4, 1e-30, np.float32)  # squares underflow float32
    exp = 2 * float(np.float32(1e-30))
    assert abs(compute_gradient_norm({"g": g32}) - exp) <= 1e-15 * exp
    # many float32 values: float64 accumulation is far more accurate than float32's
    rng = np.random.default_rng(0)
    g = rng.standard_normal(300_000).astype(np.float32)
    exact = math.sqrt(math.fsum(float(x) ** 2 for x in g.astype(np.float64)))
    assert abs(compute_gradient_norm({"g": g}) - exact) <= 1e-12 * exact
    # mixed dtypes and layouts in one dict
    parts = {"h": np.arange(6, dtype=np.float16).reshape(2, 3).T,
             "s": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
             "d": np.arange(20.0)[::-3], "z": np.array(7.0)}
    exact = math.sqrt(math.fsum(float(x) ** 2 for v in parts.values()
                                for x in np.asarray(v, np.float64).ravel()))
    assert abs(compute_gradient_norm(parts) - exact) <= 1e-15 * exact


def test_gradient_norm_nan_inf() -> None:
    assert math.isnan(compute_gradient_norm({"a": np.array([1.0, np.nan])}))
    assert compute_gradient_norm({"a": np.array([1.0, np.inf])}) == math.inf
    assert compute_gradient_norm({"a": np.array([-np.inf]), "b": np.ones(3)}) == math.inf
    assert math.isnan(compute_gradient_norm({"a": np.array([np.inf]), "b": np.array([np.nan])}))
    assert math.isnan(compute_gradient_norm({"a": np.array([np.nan]), "b": np.array([np.inf])}))
    assert math.isnan(compute_gradient_norm({"a": np.array([np.nan], np.float16)}))
    assert compute_gradient_norm({"a": np.array([np.inf], np.float32)}) == math.inf
    assert math.isnan(compute_gradient_norm({"a": np.array([1e300, np.nan, 1e300])}))


def test_gradient_norm_insertion_order_and_no_mutation() -> None:
    rng = np.random.default_rng(1)
    arrays = {f"g{i}": (rng.standard_normal(rng.integers(1, 50_000)) *
                        10.0 ** rng.integers(-5, 5)).astype(rng.choice(
                            [np.float16, np.float32, np.float64]))
              for i in range(12)}
    copies = {k: v.copy() for k, v in arrays.items()}
    r = compute_gradient_norm(arrays)
    keys = list(arrays)
    for perm in (keys[::-1], sorted(keys, key=lambda k: hash(k) % 97)):
        assert compute_gradient_norm({k: arrays[k] for k in perm}) == r
    for k in arrays:
        assert arrays[k].tobytes() == copies[k].tobytes()
    exact = math.sqrt(math.fsum(float(np.sum(v.astype(np.float64) ** 2))
                                for v in arrays.values()))
    assert abs(r - exact) <= 1e-12 * exact
