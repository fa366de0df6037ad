"""AdamPOptimizer against the float64 reference of tests/reference_adamp.py over 100-step
trajectories (float32 and float64, 0-d to 4-d, every layout, bare and with SAM and GSAM),
the projection's geometry, norms free of overflow, state-dict resume, atomic errors naming
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
    """‖p‖² leaves float64's range: the read pass sums again, rescaled, and the projection
    matches the reference's overflow-free norms."""
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((40, 30)) * scale, "v": rng.standard_normal((9, 9))}
    c = dict(BASIC, delta=3.0)
    opt, ref = make_adamp_pair(c)
    ref_params = {k: v.copy() for k, v in params.items()}
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        opt.step(params, grads)
        ref.step(ref_params, grads)
        assert ref.projected["w"]
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
opt = SamOptimizer(AdamPOptimizer(OptimizerConfig(0.01), True, 1.0, 0.1), 0.05)
for t in range(7):
    r = np.random.default_rng(t)
    grads = {k: r.standard_normal(v.shape) for k, v in params.items()}
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
