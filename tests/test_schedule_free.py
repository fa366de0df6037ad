"""Schedule-Free AdamW (issue 17) against the float64 reference of
tests/reference_schedule_free.py (the paper's three sequences, kept explicitly) over 100
steps, bare and wrapped in SAM, adaptive SAM and GSAM (float32 and float64; 0-d to 4-d;
mixed layouts; clipping; warmup; parameter groups), eval/train round trips, state dicts
that resume bit-exactly, every bad hyperparameter refused with nothing changed, and
bitwise determinism over thread counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference as R
import reference_schedule_free as RS
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    GradClipMode,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    ScheduleFreeAdamW,
    ScheduleFreeConfig,
    TrainError,
)
from test_optimizers_elementwise import MIXED_SPECS, VARIANTS, fresh_params, param_of
from test_trajectories import (
    array_specs,
    assert_grads_untouched,
    assert_in_place,
    build_grads,
    build_params,
    dtypes_of,
    sam_configs,
)

STEPS = 100
CHECK_AT = {0, 1, 4, 5, 9, 50, STEPS - 1}
PREFIXES = (*RS.SLOTS, "saved_", "grad0_")


# ----------------------------------------------------------------------------- builders


def make_config(c: dict[str, Any]) -> ScheduleFreeConfig:
    return ScheduleFreeConfig(
        learning_rate=c["lr"], beta1=c["beta1"], beta2=c["beta2"], epsilon=c["eps"],
        weight_decay=c["wd"], warmup_steps=c["warmup"], grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.VALUE if c["clip_mode"] == "value" else GradClipMode.NORM)


def make_reference(c: dict[str, Any],
                   groups: dict[str, dict[str, Any]] | None = None) -> RS.RefScheduleFreeAdamW:
    return RS.RefScheduleFreeAdamW(
        c["lr"], c["beta1"], c["beta2"], c["eps"], c["wd"], c["warmup"], c["clip"],
        c["clip_mode"] or "norm", groups=groups)


def wrap(opt: Any, ref: Any, variant: dict[str, Any] | None) -> tuple[Any, Any]:
    if variant is None:
        return opt, ref
    if variant.get("gsam"):
        return (GsamOptimizer(opt, rho_max=variant["rho"], alpha=0.4),
                R.RefGSAM(ref, rho_max=variant["rho"], alpha=0.4))
    return (SamOptimizer(opt, variant["rho"], adaptive=variant["adaptive"],
                         eta=variant["eta"]),
            R.RefSAM(ref, variant["rho"], variant["adaptive"], variant["eta"]))


def track(scales: R.ScaleTracker, ref_params: Any, ref: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref.state_dict(), "state:")


def assert_close(params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 ref_params: Any, ref_state: dict[str, np.ndarray], what: str,
                 scales: R.ScaleTracker, f64_tol: float) -> None:
    R.assert_params_close(params, ref_params, what, f64_tol, scales)
    for k in ref_state:
        if k not in state:
            name = param_of(k, PREFIXES, params)
            assert name is not None and params[name].size == 0, f"{what}: missing {k!r}"
    for k, v in state.items():
        if k == "sam_calls":
            continue
        assert k in ref_state, f"{what}: unexpected state key {k!r}"
        r = ref_state[k]
        if k in ("lr", "rho", "training_mode"):
            assert v.dtype == np.float64 and float(v) == float(r), f"{what}: {k!r}"
        elif k == "t":
            assert v.dtype == np.int64 and v.shape == () and int(v) == int(r), f"{what}: t"
        elif k in ("grad_norm0", "weight_sum"):
            assert R.rel_err(v, r) <= 1e-12, f"{what}: {k!r}"
        else:
            name = param_of(k, PREFIXES, params)
            assert name is not None, f"{what}: {k!r}"
            p = params[name]
            assert v.dtype == p.dtype and v.shape == p.shape, f"{what}: {k!r} {v.dtype}"
            floor = scales.get("state:" + k)
            if k.startswith("z_minus_y_"):
                # The reference's z - x is a difference of two values of the parameter's
                # size (it keeps z and x, as the paper): its own rounding is relative to
                # the parameter, and so z = y + (z - y) is checked to the SPEC's tolerance.
                floor = max(floor, scales.get("param:" + name))
            e = R.rel_err(v, r, floor)
            assert e <= R.tol_for(p.dtype, f64_tol), f"{what}: state {k!r} rel err {e:.3g}"


# ----------------------------------------------------------------------------- trajectories


def run(specs: list[dict[str, Any]], c: dict[str, Any], variant: dict[str, Any] | None,
        seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    opt, ref = wrap(ScheduleFreeAdamW(make_config(c)), make_reference(c), variant)
    sam = variant is not None
    seq1 = [build_grads(specs, rng, zero=sam and t % 7 == 3) for t in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    tol = R.coupled_f64_tol(params, bool(variant and variant.get("adaptive")))
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        if sam:
            ref.first_step(ref_params, R.to_ref_grads(seq1[t], dts))
            track(scales, ref_params, ref)
            opt.first_step(params, seq1[t])
            if t in CHECK_AT:
                assert_close(params, opt.state_dict(), ref_params, ref.state_dict(),
                             f"first_step {t}", scales, tol)
        ref.step(ref_params, R.to_ref_grads(seq2[t], dts))
        track(scales, ref_params, ref)
        opt.step(params, seq2[t])
        if t in CHECK_AT:
            assert_close(params, opt.state_dict(), ref_params, ref.state_dict(),
                         f"step {t}", scales, tol)
    # The average: eval moves the very same arrays to x.
    base = opt.base_optimizer if sam else opt
    base.eval(params)
    ref.base.eval(ref_params) if sam else ref.eval(ref_params)
    scales.update(ref_params, "param:")
    R.assert_params_close(params, ref_params, "eval", tol, scales)
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    return dict(
        lr=draw(st.floats(1e-4, 0.1)),
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.05, 0.98))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        wd=draw(st.one_of(st.just(0.01), st.just(0.0), st.floats(0.0, 0.1))),
        warmup=draw(st.sampled_from([0, 1, 10, 250])),
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


@settings(max_examples=40)
@given(data=st.data())
def test_trajectory_matches_reference(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(configs(), label="config")
    run(specs, c, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@settings(max_examples=40)
@given(data=st.data())
def test_sam_trajectory_matches_reference(data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(configs(), label="config")
    variant = data.draw(sam_configs(), label="sam")
    run(specs, c, variant, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("clip_mode", [None, "value", "norm"])
@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
def test_every_combination(clip_mode: str | None, variant: str, dtypes: str) -> None:
    """Clipping × (bare, SAM, ASAM, GSAM) on a fixed dict of mixed layouts, of mixed
    dtypes and of float64 only, weight decay and warmup on."""
    specs = [dict(s) for s in MIXED_SPECS]
    if dtypes == "float64":
        for s in specs:
            s["dtype"] = np.float64
    c = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.05, warmup=20,
             clip_mode=clip_mode, clip=None if clip_mode is None else 0.5)
    run(specs, c, VARIANTS[variant], seed=1234)


def test_parameter_groups_match_reference() -> None:
    """A group with its own lr, betas, epsilon and weight decay (and so its own sum of
    weights); names in no group use the optimizer's own."""
    rng = np.random.default_rng(5)
    holders, ref_params = build_params(MIXED_SPECS, rng)
    params = {k: h.array for k, h in holders.items()}
    c = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.02, warmup=5, clip_mode="norm",
             clip=2.0)
    group = {"lr": 0.03, "beta1": 0.5, "beta2": 0.9, "epsilon": 1e-3, "weight_decay": 0.0}
    opt = ScheduleFreeAdamW(make_config(c), param_groups=[{"params": ["fc.w", "scale"],
                                                           **group}])
    ref_group = {("eps" if k == "epsilon" else k): v for k, v in group.items()}
    ref = make_reference(c, groups={"fc.w": ref_group, "scale": ref_group})
    scales = R.ScaleTracker()
    dts = dtypes_of(params)
    for _ in range(STEPS):
        g = build_grads(MIXED_SPECS, rng)
        ref.step(ref_params, R.to_ref_grads(g, dts))
        track(scales, ref_params, ref)
        opt.step(params, g)
    state = opt.state_dict()
    assert float(state.pop("param_groups.0.lr")) == group["lr"]
    group_sum = ref.weight_sum["fc.w"]
    assert R.rel_err(state.pop("param_groups.0.weight_sum"), np.array(group_sum)) <= 1e-12
    assert_close(params, state, ref_params, ref.state_dict(), "groups", scales,
                 R.FLOAT64_TOL)
    opt.eval(params)
    ref.eval(ref_params)
    R.assert_params_close(params, ref_params, "groups eval", R.FLOAT64_TOL, scales)


def test_hand_computed_first_steps() -> None:
    """Step 1 from p = 1, g = 0.5 (lr 0.1, β1 0.9, β2 0.99, ε 1e-8, wd 0.01): c = 1, so
    x = z = y = 1 − γ_1·(g/(√v+ε) + wd) with γ_1 = 0.1·√0.01 and √v = 0.1·g; step 2 with
    g = 0 and warmup off: v shrinks, z moves by wd·y only, and y = 0.1·z + 0.9·x."""
    opt = ScheduleFreeAdamW(ScheduleFreeConfig(learning_rate=0.1, beta2=0.99))
    params = {"w": np.array([1.0])}
    opt.step(params, {"w": np.array([0.5])})
    gamma1 = 0.1 * np.sqrt(1 - 0.99)
    y1 = 1 - gamma1 * (0.5 / (0.05 + 1e-8) + 0.01)
    assert abs(params["w"][0] - y1) <= 1e-15
    assert opt.state_dict()["z_minus_y_w"][0] == 0.0
    opt.step(params, {"w": np.array([0.0])})
    gamma2 = 0.1 * np.sqrt(1 - 0.99**2)
    z2 = y1 - gamma2 * 0.01 * y1
    c2 = gamma2**2 / (gamma1**2 + gamma2**2)
    x2 = (1 - c2) * y1 + c2 * z2
    assert abs(params["w"][0] - (0.1 * z2 + 0.9 * x2)) <= 1e-15
    opt.eval(params)
    assert abs(params["w"][0] - x2) <= 1e-15


def test_defaults_follow_the_crate() -> None:
    assert ScheduleFreeConfig() == ScheduleFreeConfig(
        learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.01,
        warmup_steps=0, grad_clip=None, grad_clip_mode=GradClipMode.NORM)
    opt = ScheduleFreeAdamW()
    assert opt.get_lr() == 1e-3 and opt.training
    for name in ("ScheduleFreeAdamW", "ScheduleFreeConfig"):
        assert name in samopt.__all__
    # The paper's weight decay at y, decoupled: with g = 0, one step is y·(1 − γ_1·wd).
    params = {"w": np.array([2.0, -3.0])}
    ScheduleFreeAdamW(ScheduleFreeConfig(learning_rate=0.1)).step(params, {"w": np.zeros(2)})
    gamma1 = 0.1 * np.sqrt(1 - 0.999)
    assert np.allclose(params["w"], [2.0 * (1 - gamma1 * 0.01), -3.0 * (1 - gamma1 * 0.01)],
                       rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- eval/train


def trained(variant: str = "bare", steps: int = 10) -> tuple[Any, dict[str, np.ndarray]]:
    opt, params = build(variant), fresh_params()
    long_run(opt, params, 0, steps)
    return opt, params


def test_eval_train_round_trip() -> None:
    """eval puts the arrays at x = y − (1−β1)/β1·(z−y) (each group its own β1), train back
    at y within one rounding per element; twice is once; a step in eval mode is refused
    with nothing changed; the mode is in the state dict."""
    opt, params = trained()
    y = {k: p.astype(np.float64) for k, p in params.items()}
    state = opt.state_dict()
    opt.eval(params)
    assert not opt.training and float(opt.state_dict()["training_mode"]) == 0.0
    for k, p in params.items():
        b1 = 0.6 if k == "fc.b" else 0.85
        if p.size:
            d = state["z_minus_y_" + k].astype(np.float64)
            x = y[k] - (1 - b1) / b1 * d
            assert R.rel_err(p.astype(np.float64), x) <= R.tol_for(p.dtype, 1e-15), k
    x_snapshot = R.snapshot(params)
    opt.eval(params)
    R.assert_same_snapshot(x_snapshot, R.snapshot(params), "eval twice")
    grads = {k: np.ones(p.shape, p.dtype) for k, p in params.items()}
    with pytest.raises(OptimizerError, match=r"call train\(\)"):
        opt.step(params, grads)
    with pytest.raises(OptimizerError, match=r"call train\(\)"):
        SamOptimizer(opt, 0.05).step(params, grads)
    R.assert_same_snapshot(x_snapshot, R.snapshot(params), "step in eval mode")
    opt.train(params)
    assert opt.training
    for k, p in params.items():
        back = p.astype(np.float64)
        before = y[k]
        ulp = np.finfo(p.dtype).eps * max(1.0, float(np.max(np.abs(before), initial=0.0)))
        assert np.max(np.abs(back - before), initial=0.0) <= 4 * ulp, k
    long_run(opt, params, 10, 12)


def test_eval_of_names_never_stepped_is_a_no_op() -> None:
    """x = y = z before a parameter's first step: eval and train leave it, and its state is
    the zeros a first step would start from (a state dict that loads, and resumes alike)."""
    opt = ScheduleFreeAdamW()
    params = {"w": np.array([1.0, 2.0], np.float32)}
    opt.eval(params)
    assert params["w"].tolist() == [1.0, 2.0]
    state = opt.state_dict()
    assert state["z_minus_y_w"].tolist() == [0.0, 0.0] and state["v_w"].tolist() == [0.0, 0.0]
    fresh = ScheduleFreeAdamW()
    fresh.load_state_dict(state)
    opt.train(params)
    assert params["w"].tolist() == [1.0, 2.0]
    twin = {"w": params["w"].copy()}
    fresh.train(twin)
    grads = {"w": np.array([0.5, -1.0], np.float32)}
    opt.step(params, grads)
    fresh.step(twin, grads)
    untouched = {"w": np.array([1.0, 2.0], np.float32)}
    ScheduleFreeAdamW().step(untouched, grads)
    assert params["w"].tobytes() == twin["w"].tobytes() == untouched["w"].tobytes()


# ----------------------------------------------------------------------------- state


def build(variant: str) -> Any:
    config = ScheduleFreeConfig(learning_rate=0.02, beta1=0.85, beta2=0.99,
                                weight_decay=0.05, warmup_steps=4, grad_clip=3.0)
    opt = ScheduleFreeAdamW(config, param_groups=[{"params": ["fc.b"], "lr": 0.01,
                                                   "beta1": 0.6}])
    if variant == "sam":
        return SamOptimizer(opt, 0.05)
    if variant == "gsam":
        return GsamOptimizer(opt, rho_max=0.05)
    return opt


def long_run(opt: Any, params: dict[str, np.ndarray], start: int, stop: int) -> None:
    for t in range(start, stop):
        rng = np.random.default_rng(t)
        grads = {k: (rng.standard_normal(p.shape) * 2).astype([np.float16, np.float32,
                                                               np.float64][t % 3])
                 for k, p in params.items()}
        if t == 5:
            opt.set_lr(opt.get_lr() * 0.7)
        if isinstance(opt, SamOptimizer | GsamOptimizer):
            opt.first_step(params, grads)
            grads = {k: v * 0.5 for k, v in grads.items()}
        opt.step(params, grads)


@pytest.mark.parametrize("variant", ["bare", "sam", "gsam"])
def test_resume_is_bit_exact(tmp_path: Any, variant: str) -> None:
    """10 steps, numpy.savez, load into a fresh optimizer, 10 more == 20 steps; also for a
    checkpoint taken in eval mode (the arrays at x), resumed with train()."""
    straight, p1 = build(variant), fresh_params()
    long_run(straight, p1, 0, 20)
    first, p2 = build(variant), fresh_params()
    long_run(first, p2, 0, 10)
    np.savez(tmp_path / "opt.npz", **first.state_dict())
    keys = set(first.state_dict())
    assert {"z_minus_y_fc.w", "v_fc.w", "t", "weight_sum", "param_groups.0.weight_sum",
            "training_mode", "lr", "param_groups.0.lr"} <= keys
    resumed = build(variant)
    with np.load(tmp_path / "opt.npz") as f:
        resumed.load_state_dict(dict(f))
    long_run(resumed, p2, 10, 20)
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes(), k
    assert R.state_snapshot(straight.state_dict()) == R.state_snapshot(resumed.state_dict())
    # In eval mode: the arrays and the state dict are a checkpoint of x.
    base = straight.base_optimizer if variant != "bare" else straight
    base.eval(p1)
    at_x = {k: v.copy() for k, v in p1.items()}
    again = build(variant)
    again.load_state_dict(straight.state_dict())
    again_base = again.base_optimizer if variant != "bare" else again
    assert not again_base.training
    base.train(p1)
    again_base.train(at_x)
    for k in p1:
        assert p1[k].tobytes() == at_x[k].tobytes(), k


# ----------------------------------------------------------------------------- errors


def bad_configs() -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for key, value in [("learning_rate", -1e-3), ("learning_rate", float("nan")),
                       ("beta1", 1.0), ("beta1", 0.0), ("beta1", -0.1), ("beta2", 1.0),
                       ("beta2", -0.5), ("epsilon", 0.0), ("epsilon", float("inf")),
                       ("weight_decay", -0.01), ("weight_decay", float("inf")),
                       ("warmup_steps", -1), ("warmup_steps", 1.5), ("warmup_steps", True),
                       ("grad_clip", 0.0), ("grad_clip_mode", "norm"),
                       ("learning_rate", "1"), ("learning_rate", 1e120)]:
        out.append((f"ScheduleFreeConfig {key}={value!r}",
                    lambda key=key, value=value: ScheduleFreeConfig(**{key: value}), key))
    out.append(("from an OptimizerConfig", lambda: ScheduleFreeAdamW(OptimizerConfig()),
                "config"))
    out.append(("momentum group key", lambda: ScheduleFreeAdamW(
        param_groups=[{"params": ["w"], "momentum": 0.5}]), "momentum"))
    out.append(("warmup_steps group key", lambda: ScheduleFreeAdamW(
        param_groups=[{"params": ["w"], "warmup_steps": 5}]), "warmup_steps"))
    for key, value in [("lr", -0.1), ("beta1", 1.0), ("beta1", 0.0), ("beta2", -0.5),
                       ("epsilon", 0.0), ("weight_decay", -1.0), ("lr", float("nan")),
                       ("lr", 1e120)]:
        out.append((f"group {key}={value!r}", lambda key=key, value=value: ScheduleFreeAdamW(
            param_groups=[{"params": ["w"], key: value}]), key))
    return out


BAD_CONFIGS = bad_configs()


@pytest.mark.parametrize("make,key", [(m, k) for _, m, k in BAD_CONFIGS],
                         ids=[what for what, _, _ in BAD_CONFIGS])
def test_bad_hyperparameters_raise_train_error_naming_the_key(make: Any, key: str) -> None:
    with pytest.raises(TrainError) as info:
        make()
    assert info.value.key == key, str(info.value)


def test_a_learning_rate_whose_squares_overflow_is_refused_and_changes_nothing() -> None:
    """Σγ² must stay finite: set_lr (also a group's rate scaled past the bound) and a
    loaded lr of 1e120 are refused, naming the key, with the optimizer unchanged."""
    opt = ScheduleFreeAdamW(ScheduleFreeConfig(learning_rate=1e-3),
                            param_groups=[{"params": ["w"], "lr": 1e-2}])
    params = {"w": np.ones(3), "b": np.ones(2)}
    opt.step(params, {"w": np.full(3, 0.5), "b": np.full(2, 0.5)})
    before = opt.state_dict()
    for lr, key in [(1e120, "lr"), (2e99, "param_groups.0.lr")]:
        with pytest.raises(TrainError) as info:
            opt.set_lr(lr)
        assert info.value.key == key
    state = opt.state_dict()
    state["param_groups.0.lr"] = np.array(1e120)
    with pytest.raises(TrainError) as info:
        opt.load_state_dict(state)
    assert info.value.key == "param_groups.0.lr"
    after = opt.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert np.asarray(before[k]).tobytes() == np.asarray(after[k]).tobytes(), k


@pytest.mark.parametrize("variant", ["bare", "sam"])
def test_errors_change_nothing(variant: str) -> None:
    """A NaN gradient, a bad lr and every bad state dict: params, grads and state bitwise
    unchanged."""
    opt, params = trained(variant, 3)
    before, state_before = R.snapshot(params), R.state_snapshot(opt.state_dict())
    grads = {k: np.ones(p.shape, p.dtype) for k, p in params.items()}
    grads["fc.b"] = np.array([1.0, np.nan, 0.0, 0.0, 0.0])
    grads_before = R.snapshot(grads)
    if variant == "sam":
        with pytest.raises(NonFiniteGradientError):
            opt.first_step(params, grads)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step(params, grads)
    assert info.value.key == "fc.b"
    R.assert_same_snapshot(grads_before, R.snapshot(grads), "grads")
    with pytest.raises(TrainError):
        opt.set_lr(-1.0)
    good = opt.state_dict()
    negative = good["v_fc.w"].copy()
    negative[0, 0] = -1.0
    broken: list[tuple[dict[str, Any], str]] = [
        ({**good, "bogus_fc.w": good["v_fc.w"]}, "bogus_fc.w"),
        ({**good, "lr": np.array(-1.0)}, "lr"),
        ({**good, "t": np.array(-3)}, "t"),
        ({**good, "weight_sum": np.array(-1.0)}, "weight_sum"),
        ({**good, "weight_sum": np.array(np.nan)}, "weight_sum"),
        ({**good, "param_groups.0.weight_sum": np.array([1.0, 2.0])},
         "param_groups.0.weight_sum"),
        ({**good, "training_mode": np.array(0.5)}, "training_mode"),
        ({k: v for k, v in good.items() if k != "training_mode"}, "training_mode"),
        ({k: v for k, v in good.items() if k != "weight_sum"}, "weight_sum"),
        ({**good, "v_fc.w": np.zeros((2, 2))}, "v_fc.w"),
        ({k: v for k, v in good.items() if k != "z_minus_y_fc.w"}, "v_fc.w"),
        ({**good, "v_fc.w": negative}, "v_fc.w"),
    ]
    for state, key in broken:
        with pytest.raises(OptimizerError) as error:
            opt.load_state_dict(state)
        assert error.value.key == key, (key, str(error.value))
    R.assert_same_snapshot(before, R.snapshot(params), variant)
    assert R.state_snapshot(opt.state_dict()) == state_before


# ----------------------------------------------------------------------------- threads

THREADS_SCRIPT = r"""
import hashlib, json
import numpy as np
from samopt import GsamOptimizer, SamOptimizer, ScheduleFreeAdamW, ScheduleFreeConfig
cfg = ScheduleFreeConfig(learning_rate=0.01, warmup_steps=3, grad_clip=50.0)
def params():
    r = np.random.default_rng(7)
    out = {}
    for i in range(12):
        n = int(r.integers(1, 200_000)) if i % 3 else int(r.integers(1, 40))
        v = r.standard_normal(n)
        out[f"p{i:02d}"] = v.astype([np.float32, np.float64][i % 2]) if i % 4 else v[::-1]
    return out
def grads(ps, seed):
    r = np.random.default_rng(seed)
    return {k: (r.standard_normal(p.shape) * 3).astype([np.float16, np.float32][i % 2])
            for i, (k, p) in enumerate(ps.items())}
def digest(ps, opt):
    h = hashlib.sha256()
    for k in sorted(ps):
        h.update(k.encode()); h.update(np.ascontiguousarray(ps[k]).tobytes())
    sd = opt.state_dict()
    for k in sorted(sd):
        h.update(k.encode()); h.update(np.ascontiguousarray(sd[k]).tobytes())
    return h.hexdigest()
out = {}
for wrapper in ("bare", "sam", "gsam"):
    ps = params()
    base = ScheduleFreeAdamW(cfg, param_groups=[{"params": ["p03", "p04"], "beta1": 0.5}])
    opt = base
    if wrapper == "sam":
        opt = SamOptimizer(base, 0.05, adaptive=True, eta=0.01)
    elif wrapper == "gsam":
        opt = GsamOptimizer(base, rho_max=0.05)
    for s in range(8):
        if wrapper != "bare":
            opt.first_step(ps, grads(ps, 100 + s))
        opt.step(ps, grads(ps, 200 + s))
    base.eval(ps)
    out[wrapper] = digest(ps, opt)
print(json.dumps(out))
"""


def test_bitwise_identical_across_thread_counts() -> None:
    runs = {}
    for threads in ("1", "2", "3"):
        env = {**os.environ, "RAYON_NUM_THREADS": threads}
        res = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[threads] = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(set(runs["1"].values())) == len(runs["1"]), "two runs ended alike"
    for threads, digests in runs.items():
        assert digests == runs["1"], f"RAYON_NUM_THREADS={threads} differs from 1"


def test_set_lr_changes_the_weights_of_the_average() -> None:
    """A learning rate changed mid-run (a scheduler's set_lr) enters γ_t and so both the
    step and the average's weights γ_t²/Σγ_i², as the reference computes them."""
    rng = np.random.default_rng(9)
    specs = [dict(s) for s in MIXED_SPECS]
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    c = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.01, warmup=3, clip_mode=None,
             clip=None)
    opt, ref = ScheduleFreeAdamW(make_config(c)), make_reference(c)
    scales = R.ScaleTracker()
    dts = dtypes_of(params)
    for t in range(40):
        if t in (10, 25):
            opt.set_lr(opt.get_lr() * (0.2 if t == 10 else 4.0))
            ref.lr = opt.get_lr()
        g = build_grads(specs, rng)
        ref.step(ref_params, R.to_ref_grads(g, dts))
        track(scales, ref_params, ref)
        opt.step(params, g)
    assert_close(params, opt.state_dict(), ref_params, ref.state_dict(), "set_lr", scales,
                 R.FLOAT64_TOL)


def test_pickle_keeps_the_state_and_the_mode() -> None:
    import pickle

    opt, params = trained()
    opt.eval(params)
    copy = pickle.loads(pickle.dumps(opt))
    assert not copy.training
    assert R.state_snapshot(copy.state_dict()) == R.state_snapshot(opt.state_dict())
    twin = {k: v.copy() for k, v in params.items()}
    opt.train(params)
    copy.train(twin)
    long_run(opt, params, 10, 12)
    long_run(copy, twin, 10, 12)
    for k in params:
        assert params[k].tobytes() == twin[k].tobytes(), k
