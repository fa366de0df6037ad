"""ProdigyOptimizer (issue 17) against the float64 reference of tests/reference_prodigy.py
over 100 steps (bare, and wrapped in SAM, adaptive SAM and GSAM; float32 and float64; 0-d
to 4-d; mixed layouts; clipping; parameter groups), state dicts that resume bit-exactly,
every bad hyperparameter refused with nothing changed, and bitwise determinism over thread
counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference as R
import reference_prodigy as RP
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    GradClipMode,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    ProdigyConfig,
    ProdigyOptimizer,
    SamOptimizer,
    TrainError,
)
from samopt._optimizers import NativeOptimizer
from test_optimizers_elementwise import MIXED_SPECS, VARIANTS, fresh_params, param_of
from test_trajectories import (
    array_specs,
    assert_grads_untouched,
    assert_in_place,
    build_params,
    dtypes_of,
    sam_configs,
)

STEPS = 100
CHECK_AT = {0, 1, 2, 5, 9, 50, STEPS - 1}
SAM_PREFIXES = ("saved_", "grad0_")

# ----------------------------------------------------------------------------- builders


def make_optimizer(c: dict[str, Any], **kwargs: Any) -> ProdigyOptimizer:
    config = ProdigyConfig(
        d0=c["d0"], d_coef=c["d_coef"], lr=c["lr"], beta1=c["beta1"], beta2=c["beta2"],
        eps=c["eps"], weight_decay=c["wd"], grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.VALUE if c["clip_mode"] == "value" else GradClipMode.NORM,
        bias_correction=c["bias_correction"], d_growth_rate=c["growth"], beta3=c["beta3"])
    return ProdigyOptimizer(config, **kwargs)


def make_reference(c: dict[str, Any],
                   groups: dict[str, dict[str, Any]] | None = None) -> RP.RefProdigy:
    return RP.RefProdigy(
        lr=c["lr"], beta1=c["beta1"], beta2=c["beta2"], eps=c["eps"], weight_decay=c["wd"],
        d0=c["d0"], d_coef=c["d_coef"], d_growth_rate=c["growth"],
        bias_correction=c["bias_correction"], beta3=c["beta3"], clip=c["clip"],
        clip_mode=c["clip_mode"] or "norm", groups=groups)


def wrap(opt: Any, ref: Any, variant: dict[str, Any] | None) -> tuple[Any, Any]:
    if variant is None:
        return opt, ref
    if variant.get("gsam"):
        return (GsamOptimizer(opt, rho_max=variant["rho"], alpha=0.4),
                R.RefGSAM(ref, rho_max=variant["rho"], alpha=0.4))
    return (SamOptimizer(opt, variant["rho"], adaptive=variant["adaptive"],
                         eta=variant["eta"]),
            R.RefSAM(ref, variant["rho"], variant["adaptive"], variant["eta"]))


DEFAULT = dict(d0=1e-3, d_coef=1.0, lr=0.5, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0,
               clip=None, clip_mode=None, bias_correction=True, growth=math.inf, beta3=None)


# ----------------------------------------------------------------------------- comparison


def track(scales: R.ScaleTracker, ref_params: Any, ref: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref.state_dict(), "state:")


def prodigy_of(ref: Any) -> RP.RefProdigy:
    """The Prodigy reference under a SAM reference, or itself."""
    return ref.base if hasattr(ref, "base") else ref


def assert_close(params: dict[str, np.ndarray], opt: Any, ref_params: Any, ref: Any,
                 what: str, scales: R.ScaleTracker, f64_tol: float) -> None:
    R.assert_params_close(params, ref_params, what, f64_tol, scales)
    state, ref_state = opt.state_dict(), ref.state_dict()
    prefixes = RP.SLOTS + SAM_PREFIXES
    for k in ref_state:
        if k not in state:
            name = param_of(k, prefixes, params)
            assert name is not None and params[name].size == 0, f"{what}: missing {k!r}"
    # The estimate couples every array: it is as close as the coarsest of them.
    coarsest = max(R.tol_for(p.dtype, f64_tol) for p in params.values())
    for k, v in state.items():
        if k == "sam_calls":
            assert int(v) == 0
            continue
        if k.startswith("param_groups."):
            continue  # the groups' own lrs, checked by the groups' test
        assert k in ref_state, f"{what}: unexpected state key {k!r}"
        r = ref_state[k]
        if k in ("lr", "rho"):
            assert v.dtype == np.float64 and float(v) == float(r), f"{what}: {k!r}"
        elif k == "step":
            assert v.dtype == np.int64 and v.shape == () and int(v) == int(r), f"{what}: step"
        elif k in ("d", "d_max", "d_numerator", "grad_norm0"):
            assert v.dtype == np.float64 and v.shape == (), f"{what}: {k!r}"
            floor = scales.get("state:" + k)
            if k == "d_numerator":
                floor = max(floor, prodigy_of(ref).numerator_magnitude)
            e = R.rel_err(v, r, floor)
            assert e <= coarsest, f"{what}: {k!r} = {float(v)!r}, ref {float(r)!r}"
        else:
            name = param_of(k, prefixes, params)
            assert name is not None, f"{what}: {k!r}"
            p = params[name]
            assert v.dtype == p.dtype and v.shape == p.shape, f"{what}: {k!r} {v.dtype}"
            e = R.rel_err(v, r, scales.get("state:" + k))
            assert e <= R.tol_for(p.dtype, f64_tol), f"{what}: state {k!r} rel err {e:.3g}"


# ----------------------------------------------------------------------------- trajectories


def run(specs: list[dict[str, Any]], c: dict[str, Any], variant: dict[str, Any] | None,
        seed: int, groups: tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None = None
        ) -> Any:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    kwargs = {"param_groups": groups[0]} if groups else {}
    opt, ref = wrap(make_optimizer(c, **kwargs),
                    make_reference(c, groups[1] if groups else None), variant)
    sam = variant is not None
    target = {s["name"]: rng.standard_normal(s["shape"]) for s in specs}
    given: list[dict[str, np.ndarray]] = []

    def grads_at(point: dict[str, np.ndarray], zero: bool = False) -> dict[str, np.ndarray]:
        """A noisy quadratic's gradient at the reference's point: Prodigy's estimate of d
        assumes gradients that point away from a minimum (with pure noise, d grows without
        bound). Both optimizers get the same arrays."""
        out = {}
        for s in specs:
            k = s["name"]
            noise = rng.standard_normal(s["shape"])
            vals = np.zeros(s["shape"]) if zero else s["gscale"] * (
                point[k] - target[k] + 0.3 * noise)
            out[k] = R.make_array(vals, s["gdtype"], s["glayout"]).array
        given.append(out)
        return out

    dts = dtypes_of(params)
    # d couples every array: float32 rounding reaches the float64 ones through it.
    tol = R.coupled_f64_tol(params, True)
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        if sam:
            g1 = grads_at(ref_params, zero=t % 7 == 3)
            ref.first_step(ref_params, R.to_ref_grads(g1, dts))
            track(scales, ref_params, ref)
            opt.first_step(params, g1)
            if t in CHECK_AT:
                assert_close(params, opt, ref_params, ref, f"first_step {t}", scales, tol)
        g2 = grads_at(ref_params)
        copies = [{k: v.copy() for k, v in g.items()} for g in given]
        ref.step(ref_params, R.to_ref_grads(g2, dts))
        track(scales, ref_params, ref)
        opt.step(params, g2)
        if t in CHECK_AT:
            assert_close(params, opt, ref_params, ref, f"step {t}", scales, tol)
    assert_in_place(params, holders)
    assert_grads_untouched(given, copies)
    return opt


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    return dict(
        d0=draw(st.sampled_from([1e-6, 1e-4, 1e-2])),
        d_coef=draw(st.sampled_from([1.0, 0.5, 2.0])),
        lr=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        # beta1 >= 0.5: near sign descent the float64 reference itself is chaotic (as for
        # Adam, test_trajectories).
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.5, 0.95))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.9, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6])),
        wd=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.1))),
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
        bias_correction=draw(st.booleans()),
        growth=draw(st.sampled_from([math.inf, 0.02, 1.0])),
        beta3=draw(st.one_of(st.none(), st.floats(0.5, 0.99))),
    )


# Over a handful of elements ‖s‖₁ can pass near 0 and d̂ = r/‖s‖₁ jump: with random
# gradients d reached 1e9 in 100 steps on one element, and a 1e-7 change of one gradient
# moved the float64 reference itself by 1e-6 on four. A model's ‖s‖₁ sums many elements;
# the property tests give every dict at least this many.
MIN_ELEMENTS = 48


def enough_elements(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if sum(math.prod(s["shape"]) for s in specs) >= MIN_ELEMENTS:
        return specs
    bulk = dict(name="bulk", shape=(MIN_ELEMENTS,), dtype=np.float64, layout="C",
                gdtype=np.float64, glayout="C", gscale=1.0)
    return [*specs, bulk]


@settings(max_examples=40)
@given(data=st.data())
def test_trajectory_matches_reference(data: Any) -> None:
    specs = enough_elements(data.draw(array_specs(), label="arrays"))
    c = data.draw(configs(), label="config")
    run(specs, c, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@settings(max_examples=40)
@given(data=st.data())
def test_sam_trajectory_matches_reference(data: Any) -> None:
    specs = enough_elements(data.draw(array_specs(), label="arrays"))
    c = data.draw(configs(), label="config")
    variant = data.draw(st.one_of(sam_configs(), st.just(VARIANTS["gsam"])), label="sam")
    run(specs, c, variant, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("clip_mode", [None, "value", "norm"])
@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
def test_every_combination(clip_mode: str | None, variant: str, dtypes: str) -> None:
    """Clipping × (bare, SAM, ASAM, GSAM) on a fixed dict of mixed layouts, of mixed dtypes
    and of float64 only, weight decay on, the growth of d bounded."""
    specs = [dict(s) for s in MIXED_SPECS]
    if dtypes == "float64":
        for s in specs:
            s["dtype"] = np.float64
    c = {**DEFAULT, "wd": 0.05, "clip_mode": clip_mode, "growth": 0.5,
         "clip": None if clip_mode is None else 0.5}
    run(specs, c, VARIANTS[variant], seed=1234)


@pytest.mark.parametrize("variant", ["bare", "sam"])
def test_parameter_groups_match_reference(variant: str) -> None:
    """A group with its own lr and weight decay, one frozen (lr 0: left alone and out of
    the estimate, as in the authors' code); names in no group use the optimizer's own."""
    groups = [{"params": ["fc.w", "scale"], "lr": 1.5, "weight_decay": 0.0},
              {"params": ["fc.b"], "lr": 0.0}]
    ref_groups = {"fc.w": {"lr": 1.5, "weight_decay": 0.0}, "scale": {"lr": 1.5,
                  "weight_decay": 0.0}, "fc.b": {"lr": 0.0}}
    c = {**DEFAULT, "wd": 0.02, "clip_mode": "norm", "clip": 2.0}
    opt = run(MIXED_SPECS, c, VARIANTS[variant], seed=5, groups=(groups, ref_groups))
    state = opt.state_dict()
    assert (float(state["param_groups.0.lr"]), float(state["param_groups.1.lr"])) == (1.5, 0.0)
    assert not state["exp_avg.fc.b"].any() and not state["p0_minus_p.fc.b"].any()


def test_hand_computed_first_steps() -> None:
    """p = 1, g = 0.5, d0 = 1e-3, lr 1, no bias correction: step 1 moves by
    d0·m/(√v + d0·ε) with m = 0.1·d0·g, v = 0.001·d0²·g², and leaves d at d0 (x0 − x is
    0); step 2 (g = 0.5 again) gives d̂ = r/|s| with r = d0·(x0 − x1)·g·(d0/d0)."""
    d0, g = 1e-3, 0.5
    opt = ProdigyOptimizer(ProdigyConfig(d0=d0, bias_correction=False))
    params = {"w": np.array([1.0])}
    opt.step(params, {"w": np.array([g])})
    m, v = 0.1 * d0 * g, 0.001 * d0 * d0 * g * g
    x1 = 1 - d0 * m / (math.sqrt(v) + d0 * 1e-8)
    assert abs(params["w"][0] - x1) <= 1e-16
    assert opt.get_d() == d0 and opt.get_step() == 1
    beta3 = math.sqrt(0.999)
    s1 = d0 * g
    opt.step(params, {"w": np.array([g])})
    s2 = beta3 * s1 + d0 * g
    r = d0 * g * (1 - x1)
    assert abs(opt.get_d() - r / s2) <= 1e-12 * (r / s2)
    state = opt.state_dict()
    assert float(state["d_numerator"]) == pytest.approx(r, rel=1e-12)
    assert float(state["s.w"][0]) == pytest.approx(s2, rel=1e-14)


def test_defaults_follow_the_crate() -> None:
    config = ProdigyConfig()
    assert (config.d0, config.d_coef, config.lr, config.beta1, config.beta2, config.eps,
            config.weight_decay, config.grad_clip, config.grad_clip_mode,
            config.bias_correction, config.d_growth_rate) == (
        1e-6, 1.0, 1.0, 0.9, 0.999, 1e-8, 0.0, None, GradClipMode.NORM, True, math.inf)
    assert config.resolved_beta3 == math.sqrt(0.999)
    opt = ProdigyOptimizer()
    assert (opt.get_lr(), opt.get_d(), opt.get_step()) == (1.0, 1e-6, 0)
    # weight_decay is decoupled: a zero gradient moves p by −d·lr·wd·p only.
    decaying = ProdigyOptimizer(ProdigyConfig(weight_decay=0.1, bias_correction=False))
    params = {"w": np.array([2.0, -3.0])}
    decaying.step(params, {"w": np.zeros(2)})
    assert params["w"].tolist() == [2.0 - 1e-6 * 0.1 * 2.0, -3.0 - 1e-6 * 0.1 * -3.0]
    for name in ("ProdigyConfig", "ProdigyOptimizer"):
        assert name in samopt.__all__
    # SamOptimizer (and GSAM) run it natively, the restore fused into its step: its Python
    # step is never called (the path that calls it keeps a parameter-sized copy).
    assert isinstance(opt, NativeOptimizer) and type(opt).step is NativeOptimizer.step

    def refuse(*_: Any) -> None:
        raise AssertionError("the Python step ran")

    for wrapper in (SamOptimizer, GsamOptimizer):
        base = ProdigyOptimizer()
        base.step = refuse  # type: ignore[method-assign]
        sam = wrapper(base)
        params = {"w": np.array([1.0, 2.0])}
        sam.first_step(params, {"w": np.array([0.5, -0.5])})
        sam.second_step(params, {"w": np.array([0.25, 0.25])})
        assert base.get_step() == 1 and not sam.pending


# ----------------------------------------------------------------------------- state


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


def build(variant: str) -> Any:
    config = ProdigyConfig(d0=1e-4, weight_decay=0.05, grad_clip=3.0, d_growth_rate=0.5)
    opt = ProdigyOptimizer(config, param_groups=[{"params": ["fc.b"], "lr": 0.5}])
    if variant == "sam":
        return SamOptimizer(opt, 0.05)
    if variant == "gsam":
        return GsamOptimizer(opt, rho_max=0.05)
    return opt


@pytest.mark.parametrize("variant", ["bare", "sam", "gsam"])
def test_resume_is_bit_exact(tmp_path: Any, variant: str) -> None:
    """10 steps, numpy.savez, load into a fresh optimizer, 10 more == 20 steps."""
    straight, p1 = build(variant), fresh_params()
    long_run(straight, p1, 0, 20)
    first, p2 = build(variant), fresh_params()
    long_run(first, p2, 0, 10)
    np.savez(tmp_path / "opt.npz", **first.state_dict())
    keys = set(first.state_dict())
    assert {*RP.SCALARS, "param_groups.0.lr", *(s + "fc.w" for s in RP.SLOTS)} <= keys
    resumed = build(variant)
    with np.load(tmp_path / "opt.npz") as f:
        resumed.load_state_dict(dict(f))
    long_run(resumed, p2, 10, 20)
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes(), k
    assert R.state_snapshot(straight.state_dict()) == R.state_snapshot(resumed.state_dict())


def test_resume_between_first_and_second_step() -> None:
    """A checkpoint taken while SAM's perturbation is pending resumes bit-exactly."""
    straight, p1 = build("sam"), fresh_params()
    long_run(straight, p1, 0, 6)
    pending, p2 = build("sam"), fresh_params()
    long_run(pending, p2, 0, 5)
    rng = np.random.default_rng(5)
    grads = {k: (rng.standard_normal(p.shape) * 2).astype([np.float16, np.float32,
                                                           np.float64][5 % 3])
             for k, p in p2.items()}
    pending.set_lr(pending.get_lr() * 0.7)  # as long_run does at step 5
    pending.first_step(p2, grads)
    state = pending.state_dict()
    p3 = fresh_params()
    for k, v in p3.items():
        v[...] = p2[k]
    resumed = build("sam")
    resumed.load_state_dict(state)
    resumed.step(p3, {k: v * 0.5 for k, v in grads.items()})
    for k in p1:
        assert p1[k].tobytes() == p3[k].tobytes(), k
    assert R.state_snapshot(straight.state_dict()) == R.state_snapshot(resumed.state_dict())


# ----------------------------------------------------------------------------- errors


def bad_configs() -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for key, value in [("d0", 0.0), ("d0", -1e-6), ("d0", math.inf), ("d_coef", 0.0),
                       ("d_coef", math.nan), ("lr", -1.0), ("lr", math.nan), ("lr", "1"),
                       ("beta1", 1.0), ("beta1", -0.1), ("beta2", 1.5), ("beta3", 1.0),
                       ("beta3", -0.5), ("eps", 0.0), ("weight_decay", -0.01),
                       ("weight_decay", math.inf), ("grad_clip", 0.0),
                       ("grad_clip_mode", "norm"), ("bias_correction", 1),
                       ("d_growth_rate", -0.5), ("d_growth_rate", math.nan),
                       ("d_growth_rate", -math.inf)]:
        out.append((f"ProdigyConfig {key}={value!r}",
                    lambda key=key, value=value: ProdigyConfig(**{key: value}), key))
    out.append(("from an OptimizerConfig", lambda: ProdigyOptimizer(OptimizerConfig()),
                "config"))
    for key, value in [("lr", -0.1), ("lr", math.nan), ("weight_decay", -1.0),
                       ("beta1", 0.5), ("epsilon", 1e-3), ("d0", 1e-3)]:
        out.append((f"group {key}={value!r}", lambda key=key, value=value: ProdigyOptimizer(
            param_groups=[{"params": ["w"], key: value}]), key))
    return out


BAD_CONFIGS = bad_configs()


@pytest.mark.parametrize("make,key", [(m, k) for _, m, k in BAD_CONFIGS],
                         ids=[what for what, _, _ in BAD_CONFIGS])
def test_bad_hyperparameters_raise_train_error_naming_the_key(make: Any, key: str) -> None:
    with pytest.raises(TrainError) as info:
        make()
    assert info.value.key == key, str(info.value)
    assert key in str(info.value) or "config" in str(info.value)


@pytest.mark.parametrize("variant", ["bare", "sam"])
def test_errors_change_nothing(variant: str) -> None:
    opt, params = build(variant), fresh_params()
    long_run(opt, params, 0, 3)
    before, state_before = R.snapshot(params), R.state_snapshot(opt.state_dict())
    grads = {k: np.ones(p.shape, p.dtype) for k, p in params.items()}
    grads["fc.b"] = np.array([1.0, np.nan, 0.0, 0.0, 0.0])
    grads_before = R.snapshot(grads)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step(params, grads)
    assert info.value.key == "fc.b"
    with pytest.raises(TrainError):
        opt.set_lr(-1.0)
    with pytest.raises(TrainError):
        opt.step(params, {k: v for k, v in grads.items() if k != "fc.w"})
    good = opt.state_dict()
    negative = good["exp_avg_sq.fc.w"].copy()
    negative[0, 0] = -1.0
    partial = {k: v for k, v in good.items() if k != "exp_avg.fc.w"}
    broken: list[tuple[dict[str, Any], str]] = [
        ({**good, "bogus.fc.w": good["s.fc.w"]}, "bogus.fc.w"),
        ({**good, "lr": np.array(-1.0)}, "lr"),
        ({**good, "step": np.array(-3)}, "step"),
        ({**good, "step": np.array(2.5)}, "step"),
        ({**good, "d": np.array(0.0)}, "d"),
        ({**good, "d": np.array(np.nan)}, "d"),
        ({**good, "d_max": np.array(float(good["d"]) / 2)}, "d_max"),
        ({**good, "d_numerator": np.array(np.inf)}, "d_numerator"),
        ({k: v for k, v in good.items() if k != "d_max"}, "d_max"),
        ({**good, "p0_minus_p.fc.w": np.zeros((2, 2))}, "p0_minus_p.fc.w"),
        ({**good, "exp_avg_sq.fc.w": negative}, "exp_avg_sq.fc.w"),
        (partial, "exp_avg_sq.fc.w"),
    ]
    for state, key in broken:
        with pytest.raises(OptimizerError) as error:
            opt.load_state_dict(state)
        assert error.value.key == key, (key, str(error.value))
    R.assert_same_snapshot(before, R.snapshot(params), "params")
    R.assert_same_snapshot(grads_before, R.snapshot(grads), "grads")
    assert R.state_snapshot(opt.state_dict()) == state_before


# ----------------------------------------------------------------------------- threads

THREADS_SCRIPT = r"""
import hashlib, json
import numpy as np
from samopt import GsamOptimizer, ProdigyConfig, ProdigyOptimizer, SamOptimizer
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
    opt = ProdigyOptimizer(ProdigyConfig(d0=1e-4, weight_decay=0.01, grad_clip=50.0))
    if wrapper == "sam":
        opt = SamOptimizer(opt, 0.05, adaptive=True, eta=0.01)
    elif wrapper == "gsam":
        opt = GsamOptimizer(opt, rho_max=0.05)
    for s in range(8):
        if wrapper != "bare":
            opt.first_step(ps, grads(ps, 100 + s))
        opt.step(ps, grads(ps, 200 + s))
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
        differ = sorted(k for k in digests if digests[k] != runs["1"][k])
        assert not differ, f"RAYON_NUM_THREADS={threads} differs from 1 on {differ}"
