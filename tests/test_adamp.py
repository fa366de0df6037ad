"""AdamPOptimizer against the float64 reference of tests/reference_adamp.py over 100-step
trajectories (float32 and float64, 0-d to 4-d, every layout, bare and with SAM and GSAM),
gradients chosen so that each view (channel, layer, none) projects its arrays, the
projection's geometry, norms free of overflow, state-dict resume, atomic errors naming
the key, parameter groups, clipping and thread-count determinism."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference as R
import reference_adamp as RA
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamPOptimizer,
    GradClipMode,
    GsamOptimizer,
    LambOptimizer,
    LarsOptimizer,
    LookaheadOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    TrainError,
)
from test_optimizers_layerwise import (
    assert_unchanged,
    check,
    quadratic,
    small_params,
    snapshot_all,
    track,
)
from test_trajectories import (
    CHECK_AT,
    STEPS,
    array_specs,
    assert_grads_untouched,
    assert_in_place,
    build_grads,
    build_params,
    dtypes_of,
    sam_configs,
)


@st.composite
def adamp_configs(draw: Any) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.0, 0.95))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        wd=draw(st.one_of(st.none(), st.just(0.0), st.floats(0.0, 0.1))),
        nesterov=draw(st.booleans()),
        # Random gradients have |cos(g, p)|·√size of order 1: 0.1 projects a few arrays, 3.0
        # nearly all of them.
        delta=draw(st.sampled_from([0.1, 1.0, 3.0])),
        wd_ratio=draw(st.one_of(st.just(0.1), st.just(1.0), st.floats(0.0, 1.0))),
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


def make_adamp_pair(c: dict[str, Any], groups: dict[str, dict[str, Any]] | None = None,
                    param_groups: Any = None) -> tuple[AdamPOptimizer, RA.RefAdamP]:
    """(samopt optimizer, reference optimizer); weight_decay None is 0.01 (the crate's)."""
    cfg = OptimizerConfig(
        learning_rate=c["lr"], beta1=c["beta1"], beta2=c["beta2"], epsilon=c["eps"],
        weight_decay=c["wd"], grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.NORM if c["clip_mode"] == "norm" else GradClipMode.VALUE,
    )
    opt = AdamPOptimizer(cfg, c["nesterov"], c["delta"], c["wd_ratio"],
                         param_groups=param_groups)
    ref = RA.RefAdamP(c["lr"], c["beta1"], c["beta2"], c["eps"],
                      0.01 if c["wd"] is None else c["wd"], c["nesterov"], c["delta"],
                      c["wd_ratio"], c["clip"], c["clip_mode"] or "value", groups)
    return opt, ref


BASIC = dict(lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.05, nesterov=True, delta=1.0,
             wd_ratio=0.1, clip_mode=None, clip=None)


def run_adamp(specs: list[dict[str, Any]], c: dict[str, Any], sam: dict[str, Any] | None,
              seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    base, ref_base = make_adamp_pair(c)
    opt: Any = base
    ref: Any = ref_base
    if sam is not None:
        opt = SamOptimizer(base, sam["rho"], adaptive=sam["adaptive"], eta=sam["eta"])
        ref = R.RefSAM(ref_base, sam["rho"], sam["adaptive"], sam["eta"])
    seq1 = [build_grads(specs, rng) for _ in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    coupled = c["clip_mode"] == "norm" or bool(sam and sam["adaptive"])
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        if sam is not None:
            ref.first_step(ref_params, R.to_ref_grads(seq1[t], dts))
            opt.first_step(params, seq1[t])
            track(scales, ref_params, ref)
            if t in CHECK_AT:
                check(params, opt, ref_params, ref, f"first_step {t}", scales, coupled)
            ref.second_step(ref_params, R.to_ref_grads(seq2[t], dts))
            opt.second_step(params, seq2[t])
        else:
            ref.step(ref_params, R.to_ref_grads(seq1[t], dts))
            opt.step(params, seq1[t])
        track(scales, ref_params, ref)
        if t in CHECK_AT:
            check(params, opt, ref_params, ref, f"adamp step {t}", scales, coupled)
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_adamp_trajectory_matches_reference(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(adamp_configs(), label="config")
    run_adamp(specs, c, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_adamp_under_sam_matches_reference(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(adamp_configs(), label="config")
    s = data.draw(sam_configs(), label="sam")
    run_adamp(specs, c, s, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_adamp_under_gsam_matches_reference(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(adamp_configs(), label="config")
    alpha = data.draw(st.sampled_from([0.0, 0.4, 1.0]), label="alpha")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    base, ref_base = make_adamp_pair(c)
    opt = GsamOptimizer(base, 0.05, alpha=alpha)
    ref = R.RefGSAM(ref_base, 0.05, alpha=alpha)
    dts = dtypes_of(params)
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        g1, g2 = build_grads(specs, rng), build_grads(specs, rng)
        ref.first_step(ref_params, R.to_ref_grads(g1, dts))
        opt.first_step(params, g1)
        ref.second_step(ref_params, R.to_ref_grads(g2, dts))
        opt.second_step(params, g2)
        track(scales, ref_params, ref)
        if t in CHECK_AT:
            check(params, opt, ref_params, ref, f"GSAM step {t}", scales, coupled=True)
    assert_in_place(params, holders)


# name, shape, dtype, layout, and the view that projects the array under `view_gradients`.
VIEWS: list[tuple[str, tuple[int, ...], Any, str, str | None]] = [
    ("chan", (6, 5), np.float64, "C", "channel"),
    ("chan.f", (5, 4), np.float32, "F", "channel"),
    ("conv", (8, 3, 3, 3), np.float32, "strided", "channel"),
    ("conv.t", (4, 3, 2), np.float64, "transposed", "channel"),
    ("layer", (4, 6), np.float64, "transposed", "layer"),
    ("layer.conv", (4, 2, 3, 3), np.float32, "C", "layer"),
    ("neither", (3, 7), np.float64, "reversed", None),
    ("bias", (7,), np.float64, "C", None),
    ("scale", (), np.float32, "C", None),
]


def view_gradients(ref_params: dict[str, np.ndarray], rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
    """Per VIEWS: "channel", each row of the first axis orthogonal to its weight row;
    "layer", each row along its weight row, with signs that cancel over the whole array
    (orthogonal to it as a whole, cosine near 1 per row), plus a little tangent noise;
    "neither", the weight plus noise; the vector's orthogonal to it (never projected)."""
    out = {}
    for name, shape, _, _, view in VIEWS:
        p, noise = ref_params[name], rng.standard_normal(shape)
        if p.ndim < 2:
            unit = p / max(np.linalg.norm(p), 1e-300)
            out[name] = noise - unit * np.sum(unit * noise) if p.ndim else noise
            continue
        if view is None:
            out[name] = p + 0.1 * noise
            continue
        rows, noise_rows = p.reshape(shape[0], -1), noise.reshape(shape[0], -1)
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        tangent = noise_rows - unit * np.sum(unit * noise_rows, axis=1, keepdims=True)
        if view == "channel":
            out[name] = tangent.reshape(shape)
            continue
        squares = np.sum(rows * rows, axis=1)
        signs = np.resize([1.0, -1.0], shape[0])
        signs -= np.sum(signs * squares) / np.sum(squares)
        out[name] = (signs[:, None] * rows + 0.1 * tangent).reshape(shape)
    return out


@pytest.mark.parametrize("sam", [False, True])
def test_each_view_projects_its_arrays_as_the_reference_does(sam: bool) -> None:
    """100 steps of arrays each projected by one view (the channel view per row, the layer
    view as a whole, neither, and vectors and scalars never), in every layout."""
    c = dict(BASIC, lr=0.005)
    rng = np.random.default_rng(11)
    holders = {name: R.make_array(rng.standard_normal(shape), dtype, layout)
               for name, shape, dtype, layout, _ in VIEWS}
    params = {k: h.array for k, h in holders.items()}
    ref_params = {k: h.array.astype(np.float64) for k, h in holders.items()}
    base, ref_base = make_adamp_pair(c)
    opt: Any = SamOptimizer(base, 0.05) if sam else base
    ref: Any = R.RefSAM(ref_base, 0.05, False, 0.0) if sam else ref_base
    expected = {name: view for name, _, _, _, view in VIEWS}
    dts = dtypes_of(params)
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        g1, g2 = view_gradients(ref_params, rng), view_gradients(ref_params, rng)
        if sam:
            ref.first_step(ref_params, R.to_ref_grads(g1, dts))
            opt.first_step(params, g1)
            ref.second_step(ref_params, R.to_ref_grads(g2, dts))
            opt.second_step(params, g2)
        else:
            ref.step(ref_params, R.to_ref_grads(g2, dts))
            opt.step(params, g2)
        assert ref_base.projected == expected, t
        track(scales, ref_params, ref)
        if t in CHECK_AT:
            check(params, opt, ref_params, ref, f"views step {t}", scales)
    assert_in_place(params, holders)


def test_the_channel_view_projects_rows_of_any_layout_alike() -> None:
    """A weight whose rows (along the first axis of the array as NumPy indexes it) are each
    orthogonal to their gradient steps row by row, whatever its memory layout."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((5, 4, 3))
    rows = w.reshape(5, -1)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    noise = rng.standard_normal(rows.shape)
    g = (noise - unit * np.sum(unit * noise, axis=1, keepdims=True)).reshape(w.shape)
    ref = RA.RefAdamP(0.01, 0.9, 0.999, 1e-8, 0.1, False, 0.1, 0.5)
    expected = {"w": w.copy()}
    ref.step(expected, {"w": g})
    assert ref.projected["w"] == "channel"
    for layout in R.LAYOUTS:
        holder = R.make_array(w, np.float64, layout)
        opt = AdamPOptimizer(OptimizerConfig(learning_rate=0.01, weight_decay=0.1), False,
                             0.1, 0.5)
        opt.step({"w": holder.array}, {"w": g})
        assert holder.outside_untouched(), layout
        assert R.rel_err(holder.array, expected["w"]) <= 1e-12, layout
        # Each row steps tangentially to itself: only its decay changes its norm.
        step = (holder.array - w * (1 - 0.01 * 0.1 * 0.5)).reshape(5, -1)
        radial = np.sum(step * rows, axis=1)
        assert np.all(np.abs(radial) <= 1e-9 * np.sum(rows * rows, axis=1)), layout


def test_a_gradient_orthogonal_to_a_weight_projects_its_update_and_its_decay() -> None:
    """A scale-invariant weight (its gradient orthogonal to it) steps tangentially, with its
    decay scaled by wd_ratio; a vector (fewer than two axes) is never projected."""
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((6, 5)), rng.standard_normal(30)
    unit = w / np.linalg.norm(w)
    gw = rng.standard_normal(w.shape)
    gw -= unit * np.sum(unit * gw)
    gb = gw.ravel() - b * np.sum(b * gw.ravel()) / np.sum(b * b)
    cfg = OptimizerConfig(learning_rate=0.01, weight_decay=0.0)
    params = {"w": w.copy(), "b": b.copy()}
    AdamPOptimizer(cfg, False, 0.1, 0.1).step(params, {"w": gw, "b": gb})
    step_w, step_b = params["w"] - w, params["b"] - b
    # Radial only through ε: p·u' = (p·u)·(1 − (‖p‖/(‖p‖+ε))²) ≈ (p·u)·2ε/‖p‖.
    assert abs(np.sum(step_w * w)) <= 1e-8 * np.linalg.norm(step_w) * np.linalg.norm(w)
    assert abs(np.sum(step_b * b)) > 1e-3 * np.linalg.norm(step_b) * np.linalg.norm(b)
    # Pure decay (a zero gradient has cosine 0, so the weight is projected): wd_ratio of it.
    decayed = {"w": w.copy(), "b": b.copy()}
    cfg = OptimizerConfig(learning_rate=0.01, weight_decay=0.5)
    AdamPOptimizer(cfg, True, 0.1, 0.1).step(decayed, {"w": np.zeros_like(w),
                                                       "b": np.zeros_like(b)})
    np.testing.assert_allclose(decayed["w"], w * (1 - 0.01 * 0.5 * 0.1), rtol=1e-15)
    np.testing.assert_allclose(decayed["b"], b * (1 - 0.01 * 0.5), rtol=1e-15)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_the_sums_survive_huge_and_tiny_weights(scale: float) -> None:
    """‖p‖² and each row's leave float64's range: the read passes sum again, rescaled, and
    the row-by-row projection matches the reference's overflow-free norms."""
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((40, 30)) * scale, "v": rng.standard_normal((9, 9))}
    c = dict(BASIC, delta=3.0)
    opt, ref = make_adamp_pair(c)
    ref_params = {k: v.copy() for k, v in params.items()}
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        opt.step(params, grads)
        ref.step(ref_params, grads)
        assert ref.projected["w"] == "channel"
        for k in params:
            assert R.rel_err(params[k], ref_params[k]) <= 1e-12, k


def test_the_sums_read_the_restored_values_not_the_perturbed_ones() -> None:
    fused, _ = make_adamp_pair(BASIC)
    plain, _ = make_adamp_pair(BASIC)
    sam = SamOptimizer(fused, rho=5.0)
    params, twin = small_params(), small_params()
    fn = quadratic({k: v * 0 + 1.0 for k, v in params.items()})
    for _ in range(5):
        _, g = fn(params)
        sam.first_step(params, g)
        _, g2 = fn(params)
        sam.second_step(params, g2)
        plain.step(twin, g2)
        assert R.state_snapshot(params) == R.state_snapshot(twin)
    assert R.state_snapshot(fused.state_dict()) == R.state_snapshot(plain.state_dict())


def test_adamp_groups_and_clipping_match_reference() -> None:
    c = dict(BASIC, clip_mode="norm", clip=0.7, wd=0.05)
    override = {"lr": 0.005, "weight_decay": 0.0, "nesterov": False}
    ref_override = {"lr": 0.005, "weight_decay": 0.0, "nesterov": False}
    opt, ref = make_adamp_pair(c, {"w": ref_override}, [{"params": ["w"], **override}])
    params = small_params()
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    fn = quadratic({k: v * 0 + 3.0 for k, v in params.items()})
    for _ in range(30):
        _, g = fn(params)
        opt.step(params, g)
        ref.step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
    R.assert_params_close(params, ref_params, "groups", R.FLOAT32_TOL)
    opt.set_lr(0.04)
    assert opt.get_lr() == 0.04 and float(opt.state_dict()["param_groups.0.lr"]) == 0.01


def test_adamp_defaults_are_the_crates() -> None:
    opt = AdamPOptimizer()
    assert (opt.nesterov, opt.delta, opt.wd_ratio) == (True, 0.1, 1.0)
    ref = RA.RefAdamP(1e-3, 0.9, 0.999, 1e-8, 0.01)
    params = small_params()
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    fn = quadratic({k: v * 0 - 2.0 for k, v in params.items()})
    for _ in range(10):
        _, g = fn(params)
        opt.step(params, g)
        ref.step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
    R.assert_params_close(params, ref_params, "defaults", R.FLOAT32_TOL)
    assert set(opt.state_dict()) == {"lr", "t", "m_w", "v_w", "m_b", "v_b", "m_s", "v_s"}


def test_adamp_resumes_bit_exactly_under_sam_and_lookahead(tmp_path: Any) -> None:
    c = dict(BASIC, wd=None, clip_mode="value", clip=1.0)
    fn = quadratic({k: v * 0 - 1.0 for k, v in small_params().items()})

    def make() -> LookaheadOptimizer:
        return LookaheadOptimizer(SamOptimizer(make_adamp_pair(c)[0], 0.05), 0.5, 3)

    straight, p_straight = make(), small_params()
    for _ in range(20):
        straight.sam_step(p_straight, fn)
    first, p = make(), small_params()
    for _ in range(10):
        first.sam_step(p, fn)
    state = first.state_dict()
    assert {"t", "m_w", "v_w"} <= set(state) and state["m_b"].dtype == np.float32
    np.savez(tmp_path / "s.npz", **state)
    resumed = make()
    resumed.load_state_dict(dict(np.load(tmp_path / "s.npz")))
    pickled = pickle.loads(pickle.dumps(first))
    p_pickled = {k: v.copy() for k, v in p.items()}
    for _ in range(10):
        resumed.sam_step(p, fn)
        pickled.sam_step(p_pickled, fn)
    assert R.state_snapshot(p) == R.state_snapshot(p_straight) == R.state_snapshot(p_pickled)
    assert R.state_snapshot(resumed.state_dict()) == R.state_snapshot(straight.state_dict())


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: AdamPOptimizer(delta=-0.1), "delta"),
        (lambda: AdamPOptimizer(delta=float("nan")), "delta"),
        (lambda: AdamPOptimizer(delta=float("inf")), "delta"),
        (lambda: AdamPOptimizer(delta="0.1"), "delta"),
        (lambda: AdamPOptimizer(delta=True), "delta"),
        (lambda: AdamPOptimizer(wd_ratio=-0.5), "wd_ratio"),
        (lambda: AdamPOptimizer(wd_ratio=float("nan")), "wd_ratio"),
        (lambda: AdamPOptimizer(wd_ratio=None), "wd_ratio"),
        # The crate's nesterov is an f64 "coefficient" used as a switch: samopt takes a bool.
        (lambda: AdamPOptimizer(nesterov=0.9), "nesterov"),
        (lambda: AdamPOptimizer(nesterov=1), "nesterov"),
        (lambda: AdamPOptimizer(nesterov="yes"), "nesterov"),
        (lambda: AdamPOptimizer(nesterov=None), "nesterov"),
        (lambda: AdamPOptimizer(OptimizerConfig(nesterov=True)), "nesterov"),
        (lambda: AdamPOptimizer(OptimizerConfig(beta1=1.0)), "beta1"),
        (lambda: AdamPOptimizer(OptimizerConfig(beta2=-0.1)), "beta2"),
        (lambda: AdamPOptimizer(OptimizerConfig(epsilon=0.0)), "epsilon"),
        (lambda: AdamPOptimizer(OptimizerConfig(learning_rate=-1.0)), "learning_rate"),
        (lambda: AdamPOptimizer(OptimizerConfig(weight_decay=-0.1)), "weight_decay"),
        (lambda: AdamPOptimizer(param_groups=[{"params": ["w"], "momentum": 0.5}]), "momentum"),
        (lambda: AdamPOptimizer(param_groups=[{"params": ["w"], "nesterov": 1}]), "nesterov"),
        (lambda: AdamPOptimizer(param_groups=[{"params": ["w"], "beta1": 1.5}]), "beta1"),
        (lambda: AdamPOptimizer(param_groups=[{"params": ["w"], "lr": -1.0}]), "lr"),
        (lambda: AdamPOptimizer("config"), "config"),  # type: ignore[arg-type]
    ],
)
def test_adamp_refuses_bad_hyperparameters(make: Any, key: str) -> None:
    with pytest.raises(TrainError) as info:
        make()
    assert isinstance(info.value, OptimizerError) and info.value.key == key


def test_adamp_errors_change_nothing() -> None:
    opt = SamOptimizer(make_adamp_pair(BASIC)[0], 0.05)
    params = small_params()
    fn = quadratic({k: v * 0 for k, v in params.items()})
    for _ in range(2):
        opt.sam_step(params, fn)
    _, good = fn(params)
    bad = dict(good, w=np.where(np.eye(4, 3) > 0, np.nan, good["w"]))
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.base_optimizer.step(params, bad)
    assert info.value.key == "w"
    assert_unchanged(before, params, bad, opt)
    opt.first_step(params, good)
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.second_step(params, bad)
    assert_unchanged(before, params, bad, opt)
    opt.restore(params)
    wrong = dict(good, w=np.ones((4, 4)))
    before = snapshot_all(params, wrong, opt)
    with pytest.raises(OptimizerError) as info:
        opt.step(params, wrong)
    assert info.value.key == "w"
    assert_unchanged(before, params, wrong, opt)
    state = opt.state_dict()
    for key, value in [("v_w", np.full((4, 3), np.nan)), ("v_w", -np.ones((4, 3))),
                       ("t", np.array(-1)), ("v_w", np.ones(3)), ("lr", np.array(-0.1))]:
        broken = dict(state, **{key: value})
        fresh = SamOptimizer(make_adamp_pair(BASIC)[0], 0.05)
        before_state = R.state_snapshot(fresh.state_dict())
        with pytest.raises(TrainError) as info:
            fresh.load_state_dict(broken)
        assert info.value.key in (key, "m_w")
        assert R.state_snapshot(fresh.state_dict()) == before_state


DETERMINISM = r"""
import hashlib
import numpy as np
from samopt import AdamPOptimizer, OptimizerConfig, SamOptimizer
rng = np.random.default_rng(5)
shapes = [(300, 1000), (7,), (101, 991), (64, 32, 32), (5, 3)]
params = {f"p{i}": rng.standard_normal(s).astype([np.float32, np.float64][i % 2])
          for i, s in enumerate(shapes)}
# Projected row by row (each gradient row orthogonal to its weight row), C and Fortran.
params["rows"] = rng.standard_normal((257, 3000)).astype(np.float32)
params["rows.f"] = np.asfortranarray(rng.standard_normal((129, 70, 10)))
opt = SamOptimizer(AdamPOptimizer(OptimizerConfig(0.01), True, 1.0, 0.1), 0.05)
for t in range(7):
    r = np.random.default_rng(t)
    grads = {k: r.standard_normal(v.shape) for k, v in params.items()}
    for k in ("rows", "rows.f"):
        w = params[k].astype(np.float64).reshape(len(params[k]), -1)
        n = grads[k].reshape(w.shape)
        unit = w / np.linalg.norm(w, axis=1, keepdims=True)
        grads[k] = (n - unit * np.sum(unit * n, axis=1, keepdims=True)).reshape(params[k].shape)
    opt.first_step(params, grads); opt.second_step(params, grads)
h = hashlib.sha256()
for k in sorted(params):
    h.update(params[k].tobytes())
for k, v in sorted(opt.state_dict().items()):
    h.update(k.encode()); h.update(np.ascontiguousarray(v).tobytes())
print(h.hexdigest())
"""


def test_adamp_is_deterministic_over_thread_counts() -> None:
    found = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", DETERMINISM], env=env,
                             capture_output=True, text=True, check=True)
        found.add(run.stdout.strip())
    assert len(found) == 1, found


@pytest.mark.parametrize("kind", ["adamp", "lamb", "lars"])
@pytest.mark.parametrize("clip_mode", [None, "value", "norm"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_read_pass_refuses_a_non_finite_gradient_even_one_clipping_would_bound(
        kind: str, clip_mode: str | None, bad: float) -> None:
    """Without norm clipping the layer-wise read pass is also the finiteness check: an
    infinite gradient that value clipping would clamp to ±c is refused like a NaN, with the
    parameter's name, and nothing changes."""
    cfg = OptimizerConfig(
        learning_rate=0.01, grad_clip=None if clip_mode is None else 1.0,
        grad_clip_mode=GradClipMode.NORM if clip_mode == "norm" else GradClipMode.VALUE)
    opt = {"adamp": lambda: AdamPOptimizer(cfg), "lamb": lambda: LambOptimizer(cfg),
           "lars": lambda: LarsOptimizer(cfg)}[kind]()
    params = small_params()
    grads = {k: np.ones_like(v) for k, v in params.items()}
    opt.step(params, grads)
    grads["b"] = grads["b"].copy()
    grads["b"][2] = bad
    before = snapshot_all(params, grads, opt)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step(params, grads)
    assert info.value.key == "b"
    assert_unchanged(before, params, grads, opt)
