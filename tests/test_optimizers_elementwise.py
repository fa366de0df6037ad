"""tensorlogic-train's other element-wise optimizers (issue 17): Adagrad, RMSprop, NAdam,
AdaMax, RAdam, AdaBelief and Lion against the float64 reference of
tests/reference_optimizers.py over 100 steps (bare, and wrapped in SAM, adaptive SAM and
GSAM; float32 and float64; 0-d to 4-d; mixed layouts; clipping; parameter groups), state
dicts that resume bit-exactly, every bad hyperparameter refused with nothing changed, and
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
import reference_optimizers as RO
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdaBeliefOptimizer,
    AdagradOptimizer,
    AdaMaxOptimizer,
    GradClipMode,
    GsamOptimizer,
    LionConfig,
    LionOptimizer,
    NAdamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    RAdamOptimizer,
    RMSpropOptimizer,
    SamOptimizer,
    TrainError,
)
from test_trajectories import (
    array_specs,
    assert_grads_untouched,
    assert_in_place,
    build_grads,
    build_params,
    dtypes_of,
    sam_configs,
)

CLASSES: dict[str, Any] = {
    "adagrad": AdagradOptimizer,
    "rmsprop": RMSpropOptimizer,
    "nadam": NAdamOptimizer,
    "adamax": AdaMaxOptimizer,
    "radam": RAdamOptimizer,
    "adabelief": AdaBeliefOptimizer,
    "lion": LionOptimizer,
}
KINDS = list(CLASSES)
STEPS = 100
CHECK_AT = {0, 1, 4, 5, 9, 50, STEPS - 1}
SAM_PREFIXES = ("saved_", "grad0_")
SCALARS = ("lr", "rho", "t", "grad_norm0")

# With an L2 penalty and a large learning rate the trajectory itself is unstable (see
# test_trajectories.L2_ADAM_MAX_LR): below this lr it is not.
L2_MAX_LR = 0.02


# ----------------------------------------------------------------------------- builders


def clip_mode_of(c: dict[str, Any]) -> GradClipMode:
    return GradClipMode.NORM if c["clip_mode"] == "norm" else GradClipMode.VALUE


def make_optimizer(c: dict[str, Any], **kwargs: Any) -> Any:
    if c["kind"] == "lion":
        lion = LionConfig(learning_rate=c["lr"], beta1=c["beta1"], beta2=c["beta2"],
                          weight_decay=c["wd"] or 0.0, grad_clip=c["clip"],
                          grad_clip_mode=clip_mode_of(c))
        return LionOptimizer(lion, **kwargs)
    config = OptimizerConfig(learning_rate=c["lr"], beta1=c["beta1"], beta2=c["beta2"],
                             epsilon=c["eps"], weight_decay=c["wd"], grad_clip=c["clip"],
                             grad_clip_mode=clip_mode_of(c))
    return CLASSES[c["kind"]](config, **kwargs)


def make_reference(c: dict[str, Any], params: dict[str, np.ndarray],
                   groups: dict[str, dict[str, Any]] | None = None) -> RO.RefElementwise:
    wd = c["wd"] if c["wd"] is not None else RO.DEFAULT_WEIGHT_DECAY.get(c["kind"], 0.0)
    return RO.REFERENCES[c["kind"]](
        c["lr"], c["beta1"], c["beta2"], c["eps"], wd, c["clip"], c["clip_mode"] or "value",
        groups=groups, state_dtypes=dtypes_of(params))


def wrap(opt: Any, ref: Any, variant: dict[str, Any] | None) -> tuple[Any, Any]:
    if variant is None:
        return opt, ref
    if variant.get("gsam"):
        return (GsamOptimizer(opt, rho_max=variant["rho"], alpha=0.4),
                R.RefGSAM(ref, rho_max=variant["rho"], alpha=0.4))
    return (SamOptimizer(opt, variant["rho"], adaptive=variant["adaptive"],
                         eta=variant["eta"]),
            R.RefSAM(ref, variant["rho"], variant["adaptive"], variant["eta"]))


# ----------------------------------------------------------------------------- comparison


def param_of(key: str, prefixes: tuple[str, ...], names: Any) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix) and key[len(prefix):] in names:
            return key[len(prefix):]
    return None


def track(scales: R.ScaleTracker, ref_params: Any, ref: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref.state_dict(), "state:")


def assert_close(params: dict[str, np.ndarray], opt: Any, ref_params: Any, ref: Any,
                 kind: str, what: str, scales: R.ScaleTracker, f64_tol: float) -> None:
    R.assert_params_close(params, ref_params, what, f64_tol, scales)
    state, ref_state = opt.state_dict(), ref.state_dict()
    prefixes = RO.SLOTS[kind] + SAM_PREFIXES
    for k in ref_state:
        if k not in state:
            name = param_of(k, prefixes, params)
            assert name is not None and params[name].size == 0, f"{what}: missing {k!r}"
    for k, v in state.items():
        if k == "sam_calls":
            assert int(v) == 0
            continue
        assert k in ref_state, f"{what}: unexpected state key {k!r}"
        r = ref_state[k]
        if k in ("lr", "rho"):
            assert v.dtype == np.float64 and float(v) == float(r), f"{what}: {k!r}"
        elif k == "t":
            assert v.dtype == np.int64 and v.shape == () and int(v) == int(r), f"{what}: t"
        elif k == "grad_norm0":
            assert R.rel_err(v, r) <= 1e-12, f"{what}: {k!r}"
        else:
            name = param_of(k, prefixes, params)
            assert name is not None, f"{what}: {k!r}"
            p = params[name]
            assert v.dtype == p.dtype and v.shape == p.shape, f"{what}: {k!r} {v.dtype}"
            e = R.rel_err(v, r, scales.get("state:" + k))
            assert e <= R.tol_for(p.dtype, f64_tol), f"{what}: state {k!r} rel err {e:.3g}"


# ----------------------------------------------------------------------------- trajectories


def run(specs: list[dict[str, Any]], c: dict[str, Any], variant: dict[str, Any] | None,
        seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    opt, ref = wrap(make_optimizer(c), make_reference(c, params), variant)
    sam = variant is not None
    seq1 = [build_grads(specs, rng, zero=sam and t % 7 == 3) for t in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    # Adaptive SAM's norm over |p|*g couples the arrays through their values.
    tol = R.coupled_f64_tol(params, bool(variant and variant.get("adaptive")))
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        if sam:
            ref.first_step(ref_params, R.to_ref_grads(seq1[t], dts))
            track(scales, ref_params, ref)
            opt.first_step(params, seq1[t])
            if t in CHECK_AT:
                assert_close(params, opt, ref_params, ref, c["kind"],
                             f"{c['kind']} first_step {t}", scales, tol)
        ref.step(ref_params, R.to_ref_grads(seq2[t], dts))
        track(scales, ref_params, ref)
        opt.step(params, seq2[t])
        if t in CHECK_AT:
            assert_close(params, opt, ref_params, ref, c["kind"], f"{c['kind']} step {t}",
                         scales, tol)
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@st.composite
def configs(draw: Any, kind: str) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    wd = draw(st.one_of(st.none(), st.just(0.01), st.floats(0.0, 0.1)))
    if kind == "lion":
        wd = 0.0 if wd is None else wd
        lr = draw(st.floats(1e-5, 1e-2))
    else:
        l2 = kind not in RO.DECOUPLED and wd
        lr = draw(st.floats(1e-4, L2_MAX_LR if l2 else 0.2))
    return dict(
        kind=kind,
        lr=lr,
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.0, 0.95))),
        beta2=draw(st.one_of(st.just(0.99 if kind == "lion" else 0.999),
                             st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        wd=wd,
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40)
@given(data=st.data())
def test_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(configs(kind), label="config")
    run(specs, c, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40)
@given(data=st.data())
def test_sam_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(configs(kind), label="config")
    variant = data.draw(sam_configs(), label="sam")
    run(specs, c, variant, data.draw(st.integers(0, 2**32 - 1), label="seed"))


MIXED_SPECS = [
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
VARIANTS = {
    "bare": None,
    "sam": dict(rho=0.1, adaptive=False, eta=0.0),
    "asam": dict(rho=0.1, adaptive=True, eta=0.01),
    "gsam": dict(rho=0.1, gsam=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("clip_mode", [None, "value", "norm"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", ["mixed", "float64"])
def test_every_combination(kind: str, clip_mode: str | None, variant: str,
                           dtypes: str) -> None:
    """Each optimizer × clipping × (bare, SAM, ASAM, GSAM) on a fixed dict of mixed
    layouts, of mixed dtypes and of float64 only, weight decay on."""
    specs = [dict(s) for s in MIXED_SPECS]
    if dtypes == "float64":
        for s in specs:
            s["dtype"] = np.float64
    lr = 1e-3 if kind == "lion" else 0.02
    c = dict(kind=kind, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.05,
             clip_mode=clip_mode, clip=None if clip_mode is None else 0.5)
    run(specs, c, VARIANTS[variant], seed=1234)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_groups_match_reference(kind: str) -> None:
    """A group with its own lr, betas, epsilon and weight decay; names in no group use
    the optimizer's own; one native call per step whatever the groups."""
    rng = np.random.default_rng(5)
    holders, ref_params = build_params(MIXED_SPECS, rng)
    params = {k: h.array for k, h in holders.items()}
    c = dict(kind=kind, lr=1e-3 if kind == "lion" else 0.01, beta1=0.9, beta2=0.99,
             eps=1e-8, wd=0.02, clip_mode="norm", clip=2.0)
    group: dict[str, Any] = {"lr": c["lr"] * 3, "beta1": 0.5, "beta2": 0.9, "epsilon": 1e-3,
                             "weight_decay": 0.0}
    allowed = CLASSES[kind]._group_keys
    group = {k: v for k, v in group.items() if k in allowed}
    opt = make_optimizer(c, param_groups=[{"params": ["fc.w", "scale"], **group}])
    ref_group = {("eps" if k == "epsilon" else k): v for k, v in group.items()}
    ref = make_reference(c, params, groups={"fc.w": ref_group, "scale": ref_group})
    scales = R.ScaleTracker()
    dts = dtypes_of(params)
    for _ in range(STEPS):
        g = build_grads(MIXED_SPECS, rng)
        ref.step(ref_params, R.to_ref_grads(g, dts))
        track(scales, ref_params, ref)
        opt.step(params, g)
    state = {k: v for k, v in opt.state_dict().items() if k != "param_groups.0.lr"}
    ref_state = ref.state_dict()
    R.assert_params_close(params, ref_params, kind, R.FLOAT64_TOL, scales)
    assert float(opt.state_dict()["param_groups.0.lr"]) == group["lr"]

    class Shown:
        def state_dict(self) -> dict[str, np.ndarray]:
            return ref_state

    class Own:
        def state_dict(self) -> dict[str, np.ndarray]:
            return state

    assert_close(params, Own(), ref_params, Shown(), kind, kind, scales, R.FLOAT64_TOL)


def test_hand_computed_first_steps() -> None:
    """One step from zero state, by hand: each optimizer's first update of p = 1 with
    g = 0.5 (lr 0.1, β1 0.9, β2 0.99, ε 1e-8, no weight decay)."""
    cfg = OptimizerConfig(learning_rate=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    g = 0.5
    mu1, mu2 = (0.9 * (1 - 0.5 * 0.96 ** (t / 250)) for t in (1, 2))
    expected = {
        # s = g²: g/√s = 1.
        "adagrad": 1 - 0.1 * g / (g + 1e-8),
        # v = 0.01·g².
        "rmsprop": 1 - 0.1 * g / (0.1 * g + 1e-8),
        # m̂ = g, √v̂ = g: NAdam steps by lr·((1−μ1)/(1−μ1) + μ2/(1−μ1μ2)·(1−β1)).
        "nadam": 1 - 0.1 * (1 + mu2 / (1 - mu1 * mu2) * 0.1) * g / (g + 1e-8),
        "adamax": 1 - 0.1 * g / (g + 1e-8),
        # ρ_1 = 1 ≤ 5: the unrectified step lr·m̂.
        "radam": 1 - 0.1 * g,
        # s = 0.01·(0.9g)² + ε.
        "adabelief": 1 - 0.1 * g / (np.sqrt((0.01 * (0.9 * g) ** 2 + 1e-8) / 0.01) + 1e-8),
        "lion": 1 - 1e-4,
    }
    for kind, value in expected.items():
        opt = LionOptimizer() if kind == "lion" else CLASSES[kind](cfg)
        params = {"w": np.array([1.0])}
        opt.step(params, {"w": np.array([g])})
        assert abs(params["w"][0] - value) <= 1e-15, (kind, params["w"][0], value)


def test_defaults_follow_the_crate() -> None:
    assert LionConfig() == LionConfig(learning_rate=1e-4, beta1=0.9, beta2=0.99,
                                      weight_decay=0.0)
    assert LionOptimizer().get_lr() == 1e-4
    # weight_decay=None: AdaBelief decays by the crate's 0.01 (decoupled), the others by 0.
    params = {"w": np.array([2.0, -3.0])}
    AdaBeliefOptimizer(OptimizerConfig(learning_rate=0.1)).step(params, {"w": np.zeros(2)})
    assert params["w"].tolist() == [2.0 * (1 - 0.1 * 0.01), -3.0 * (1 - 0.1 * 0.01)]
    for kind in ("adagrad", "rmsprop", "nadam", "adamax", "radam"):
        params = {"w": np.array([2.0, -3.0])}
        CLASSES[kind](OptimizerConfig(learning_rate=0.1)).step(params, {"w": np.zeros(2)})
        assert params["w"].tolist() == [2.0, -3.0], kind
    for name in ["LionConfig", *(cls.__name__ for cls in CLASSES.values())]:
        assert name in samopt.__all__


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


def fresh_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {s["name"]: R.make_array(rng.standard_normal(s["shape"]), s["dtype"],
                                    s["layout"]).array for s in MIXED_SPECS}


def build(kind: str, variant: str) -> Any:
    c = dict(kind=kind, lr=1e-3 if kind == "lion" else 0.02, beta1=0.85, beta2=0.99,
             eps=1e-8, wd=0.05, clip_mode="norm", clip=3.0)
    opt = make_optimizer(c, param_groups=[{"params": ["fc.b"], "lr": c["lr"] / 2}])
    if variant == "sam":
        return SamOptimizer(opt, 0.05)
    if variant == "gsam":
        return GsamOptimizer(opt, rho_max=0.05)
    return opt


@pytest.mark.parametrize("variant", ["bare", "sam", "gsam"])
@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_exact(tmp_path: Any, kind: str, variant: str) -> None:
    """10 steps, numpy.savez, load into a fresh optimizer, 10 more == 20 steps."""
    straight, p1 = build(kind, variant), fresh_params()
    long_run(straight, p1, 0, 20)
    first, p2 = build(kind, variant), fresh_params()
    long_run(first, p2, 0, 10)
    np.savez(tmp_path / "opt.npz", **first.state_dict())
    keys = set(first.state_dict())
    assert {RO.SLOTS[kind][0] + "fc.w", "lr", "param_groups.0.lr"} <= keys
    assert ("t" in keys) == (kind in RO.COUNTS_STEPS)
    resumed = build(kind, variant)
    with np.load(tmp_path / "opt.npz") as f:
        resumed.load_state_dict(dict(f))
    long_run(resumed, p2, 10, 20)
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes(), k
    assert R.state_snapshot(straight.state_dict()) == R.state_snapshot(resumed.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_resume_between_first_and_second_step(kind: str) -> None:
    """A checkpoint taken while SAM's perturbation is pending resumes bit-exactly: the
    second step restarts from the saved values, fused with the update."""
    straight, p1 = build(kind, "sam"), fresh_params()
    long_run(straight, p1, 0, 6)
    pending, p2 = build(kind, "sam"), fresh_params()
    long_run(pending, p2, 0, 5)
    rng = np.random.default_rng(5)
    grads = {k: (rng.standard_normal(p.shape) * 2).astype([np.float16, np.float32,
                                                           np.float64][5 % 3])
             for k, p in p2.items()}
    pending.set_lr(pending.get_lr() * 0.7)  # as long_run does at step 5
    pending.first_step(p2, grads)
    state = pending.state_dict()
    assert any(k.startswith("saved_") for k in state)
    # The checkpoint's parameters, perturbed, in the model's own (new) arrays.
    p3 = fresh_params()
    for k, v in p3.items():
        v[...] = p2[k]
    resumed = build(kind, "sam")
    resumed.load_state_dict(state)
    resumed.step(p3, {k: v * 0.5 for k, v in grads.items()})
    for k in p1:
        assert p1[k].tobytes() == p3[k].tobytes(), k
    assert R.state_snapshot(straight.state_dict()) == R.state_snapshot(resumed.state_dict())


# ----------------------------------------------------------------------------- errors


def bad_configs() -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for key, value in [("learning_rate", -1e-3), ("learning_rate", float("nan")),
                       ("beta1", 1.0), ("beta1", -0.1), ("beta2", 1.5),
                       ("weight_decay", -0.01), ("weight_decay", float("inf")),
                       ("grad_clip", 0.0), ("grad_clip_mode", "norm")]:
        out.append((f"LionConfig {key}={value!r}",
                    lambda key=key, value=value: LionConfig(**{key: value}), key))
    out.append(("LionConfig learning_rate='1'", lambda: LionConfig(learning_rate="1"),
                "learning_rate"))
    for kind, cls in CLASSES.items():
        if kind == "lion":
            out.append(("lion from an OptimizerConfig", lambda: LionOptimizer(
                OptimizerConfig()), "config"))
            out.append(("lion's epsilon group key", lambda: LionOptimizer(
                param_groups=[{"params": ["w"], "epsilon": 1e-3}]), "epsilon"))
            continue
        out.append((f"{kind} from a LionConfig", lambda cls=cls: cls(LionConfig()), "config"))
        out.append((f"{kind} nesterov", lambda cls=cls: cls(OptimizerConfig(nesterov=True)),
                    "nesterov"))
        out.append((f"{kind} momentum group key", lambda cls=cls: cls(
            param_groups=[{"params": ["w"], "momentum": 0.5}]), "momentum"))
    for kind, cls in CLASSES.items():
        for key, value in [("lr", -0.1), ("beta1", 1.0), ("beta2", -0.5), ("epsilon", 0.0),
                           ("weight_decay", -1.0), ("lr", float("nan"))]:
            if key not in cls._group_keys:
                continue
            out.append((f"{kind} group {key}={value!r}", lambda cls=cls, key=key, value=value:
                        cls(param_groups=[{"params": ["w"], key: value}]), key))
    return out


BAD_CONFIGS = bad_configs()


@pytest.mark.parametrize("make,key", [(m, k) for _, m, k in BAD_CONFIGS],
                         ids=[what for what, _, _ in BAD_CONFIGS])
def test_bad_hyperparameters_raise_train_error_naming_the_key(make: Any, key: str) -> None:
    with pytest.raises(TrainError) as info:
        make()
    assert info.value.key == key, str(info.value)
    assert key in str(info.value) or "config" in str(info.value)


def trained(kind: str) -> tuple[Any, dict[str, np.ndarray]]:
    opt, params = build(kind, "bare"), fresh_params()
    long_run(opt, params, 0, 3)
    return opt, params


@pytest.mark.parametrize("kind", KINDS)
def test_errors_change_nothing(kind: str) -> None:
    opt, params = trained(kind)
    before, state_before = R.snapshot(params), R.state_snapshot(opt.state_dict())
    grads = {k: np.ones(p.shape, p.dtype) for k, p in params.items()}
    grads["fc.b"] = np.array([1.0, np.nan, 0.0, 0.0, 0.0])
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step(params, grads)
    assert info.value.key == "fc.b"
    with pytest.raises(TrainError):
        opt.set_lr(-1.0)
    good = opt.state_dict()
    slot = RO.SLOTS[kind][-1]
    broken: list[tuple[dict[str, Any], str]] = [
        ({**good, "bogus_fc.w": good[slot + "fc.w"]}, "bogus_fc.w"),
        ({**good, "lr": np.array(-1.0)}, "lr"),
    ]
    if kind in RO.COUNTS_STEPS:
        broken.append(({**good, "t": np.array(-3)}, "t"))
    if len(RO.SLOTS[kind]) > 1:
        # The slots of one name must agree; the error names the one that disagrees.
        broken.append(({**good, slot + "fc.w": np.zeros((2, 2))}, slot + "fc.w"))
        partial = {k: v for k, v in good.items() if k != RO.SLOTS[kind][0] + "fc.w"}
        broken.append((partial, slot + "fc.w"))
    if kind != "lion":
        negative = good[slot + "fc.w"].copy()
        negative[0, 0] = -1.0
        broken.append(({**good, slot + "fc.w": negative}, slot + "fc.w"))
    for state, key in broken:
        with pytest.raises(OptimizerError) as error:
            opt.load_state_dict(state)
        assert error.value.key == key, (key, str(error.value))
    R.assert_same_snapshot(before, R.snapshot(params), kind)
    assert R.state_snapshot(opt.state_dict()) == state_before


# ----------------------------------------------------------------------------- threads

THREADS_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
from samopt import (AdaBeliefOptimizer, AdagradOptimizer, AdaMaxOptimizer, GradClipMode,
                    GsamOptimizer, LionConfig, LionOptimizer, NAdamOptimizer,
                    OptimizerConfig, RAdamOptimizer, RMSpropOptimizer, SamOptimizer)
cfg = OptimizerConfig(learning_rate=0.01, weight_decay=0.01, grad_clip=50.0,
                      grad_clip_mode=GradClipMode.NORM)
makers = {
    "adagrad": lambda: AdagradOptimizer(cfg), "rmsprop": lambda: RMSpropOptimizer(cfg),
    "nadam": lambda: NAdamOptimizer(cfg), "adamax": lambda: AdaMaxOptimizer(cfg),
    "radam": lambda: RAdamOptimizer(cfg), "adabelief": lambda: AdaBeliefOptimizer(cfg),
    "lion": lambda: LionOptimizer(LionConfig(weight_decay=0.1, grad_clip=1.0)),
}
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
for name, make in makers.items():
    for wrapper in ("bare", "sam", "gsam"):
        ps = params()
        opt = make()
        if wrapper == "sam":
            opt = SamOptimizer(opt, 0.05, adaptive=True, eta=0.01)
        elif wrapper == "gsam":
            opt = GsamOptimizer(opt, rho_max=0.05)
        for s in range(8):
            if wrapper != "bare":
                opt.first_step(ps, grads(ps, 100 + s))
            opt.step(ps, grads(ps, 200 + s))
        out[name + "_" + wrapper] = digest(ps, opt)
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
