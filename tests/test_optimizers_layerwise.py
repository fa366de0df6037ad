"""LookaheadOptimizer and the layer-wise optimizers (LAMB, LARS) against the float64
reference of tests/reference_layerwise.py over 100-step trajectories (float32 and float64,
0-d to 4-d, every layout, bare and with SAM), state-dict resume, atomic errors naming the
key, thread-count determinism, parameter groups and clipping."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference as R
import reference_layerwise as RL
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    GradClipMode,
    GsamOptimizer,
    LambOptimizer,
    LarsOptimizer,
    LookaheadOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    SophiaConfig,
    SophiaOptimizer,
    SophiaVariant,
    TrainError,
)
from samopt._layerwise import is_bias
from test_trajectories import (
    CHECK_AT,
    STEPS,
    array_specs,
    assert_grads_untouched,
    assert_in_place,
    base_configs,
    build_grads,
    build_params,
    dtypes_of,
    make_pair,
    sam_configs,
)


def track(scales: R.ScaleTracker, ref_params: Any, ref: Any) -> None:
    scales.update(ref_params, "param:")
    scales.update(ref.state_dict(), "state:")


def check(params: dict[str, np.ndarray], opt: Any, ref_params: Any, ref: Any, what: str,
          scales: R.ScaleTracker, coupled: bool = False) -> None:
    tol = R.coupled_f64_tol(params, coupled)
    R.assert_params_close(params, ref_params, what, tol, scales)
    RL.assert_state_matches(opt.state_dict(), ref.state_dict(), params, what, tol, scales)


def snapshot_all(params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                 opt: Any) -> tuple[Any, Any, Any]:
    return R.snapshot(params), R.snapshot(grads), R.state_snapshot(opt.state_dict())


def assert_unchanged(before: tuple[Any, Any, Any], params: dict[str, np.ndarray],
                     grads: dict[str, np.ndarray], opt: Any) -> None:
    R.assert_same_snapshot(before[0], R.snapshot(params), "params")
    R.assert_same_snapshot(before[1], R.snapshot(grads), "grads")
    assert R.state_snapshot(opt.state_dict()) == before[2], "optimizer state changed"


# ============================================================================ Lookahead


@st.composite
def lookahead_configs(draw: Any) -> dict[str, Any]:
    return dict(alpha=draw(st.one_of(st.just(0.5), st.floats(0.0, 1.0))),
                k=draw(st.sampled_from([1, 2, 3, 5, 7])))


def run_lookahead(specs: list[dict[str, Any]], c: dict[str, Any], la: dict[str, Any],
                  sam: dict[str, Any] | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    inner, ref_inner = make_pair(c, sam)
    opt = LookaheadOptimizer(inner, la["alpha"], la["k"])
    ref = RL.RefLookahead(ref_inner, la["alpha"], la["k"])
    seq1 = [build_grads(specs, rng) for _ in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    coupled = bool(sam and sam["adaptive"])
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    for t in range(STEPS):
        if sam is None:
            ref.step(ref_params, R.to_ref_grads(seq1[t], dts))
            opt.step(params, seq1[t])
        else:
            ref.first_step(ref_params, R.to_ref_grads(seq1[t], dts))
            opt.first_step(params, seq1[t])
            track(scales, ref_params, ref)
            if t in CHECK_AT:
                check(params, opt, ref_params, ref, f"first_step {t}", scales, coupled)
            ref.second_step(ref_params, R.to_ref_grads(seq2[t], dts))
            (opt.second_step if t % 2 else opt.step)(params, seq2[t])
        track(scales, ref_params, ref)
        if t in CHECK_AT or (t % la["k"] == la["k"] - 1 and t < 12):
            check(params, opt, ref_params, ref, f"step {t}", scales, coupled)
    assert opt.step_counter == STEPS
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_lookahead_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(kind), label="config")
    la = data.draw(lookahead_configs(), label="lookahead")
    run_lookahead(specs, c, la, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_lookahead_over_sam_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(base_configs(kind), label="config")
    la = data.draw(lookahead_configs(), label="lookahead")
    s = data.draw(sam_configs(), label="sam")
    run_lookahead(specs, c, la, s, data.draw(st.integers(0, 2**32 - 1), label="seed"))


def quadratic(target: dict[str, np.ndarray]) -> Any:
    def loss_and_grads(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        diff = {k: p[k].astype(np.float64) - target[k] for k in p}
        return sum(float(np.sum(d * d)) for d in diff.values()), {k: 2 * d for k, d in diff.items()}
    return loss_and_grads


def small_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3).astype(np.float32),
            "s": np.array(0.75)}


def test_lookahead_sam_step_is_first_and_second_step() -> None:
    target = {k: v * 0 + 1.0 for k, v in small_params(1).items()}
    fn = quadratic(target)
    cfg = OptimizerConfig(learning_rate=0.05)
    one = LookaheadOptimizer(SamOptimizer(AdamOptimizer(cfg), 0.1), 0.5, 3)
    two = LookaheadOptimizer(SamOptimizer(AdamOptimizer(cfg), 0.1), 0.5, 3)
    p1, p2 = small_params(), small_params()
    for _ in range(10):
        loss = one.sam_step(p1, fn)
        _, g = fn(p2)
        two.first_step(p2, g)
        assert two.pending
        _, g = fn(p2)
        two.second_step(p2, g)
        assert isinstance(loss, float)
    assert R.state_snapshot(p1) == R.state_snapshot(p2)
    counted = one.state_dict()
    assert int(counted.pop("sam_calls")) == 10  # sam_step counts its calls (for interval)
    assert R.state_snapshot(counted) == R.state_snapshot(R.without_extra_keys(two.state_dict()))
    assert one.step_counter == 10


class PythonSgd:
    """A base optimizer written in Python: plain SGD."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Any, grads: Any) -> None:
        for k in params:
            params[k][...] = params[k] - self.lr * np.asarray(grads[k], dtype=params[k].dtype)

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


def test_lookahead_over_a_python_optimizer_and_sam_over_lookahead() -> None:
    fn = quadratic({k: v * 0 - 0.5 for k, v in small_params().items()})
    params = small_params()
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    opt = LookaheadOptimizer(PythonSgd(0.1), 0.5, 2)
    ref = RL.RefLookahead(R.RefSGD(0.1, 0.0), 0.5, 2)
    for _ in range(9):
        _, g = fn(params)
        opt.step(params, g)
        ref.step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
    R.assert_params_close(params, ref_params, "python inner")
    # SAM over Lookahead: SAM restores, then Lookahead steps (the Python-base path).
    sam = SamOptimizer(LookaheadOptimizer(SgdOptimizer(OptimizerConfig(0.1, 0.0)), 0.5, 2), 0.05)
    ref_sam = R.RefSAM(RL.RefLookahead(R.RefSGD(0.1, 0.0), 0.5, 2), 0.05)
    params = small_params()
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    for _ in range(9):
        _, g = fn(params)
        sam.first_step(params, g)
        ref_sam.first_step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
        _, g = fn(params)
        sam.second_step(params, g)
        ref_sam.second_step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
    R.assert_params_close(params, ref_params, "SAM over Lookahead")


def test_lookahead_resumes_bit_exactly_and_pickles(tmp_path: Any) -> None:
    fn = quadratic({k: v * 0 + 2.0 for k, v in small_params().items()})

    def make() -> LookaheadOptimizer:
        return LookaheadOptimizer(SamOptimizer(AdamOptimizer(OptimizerConfig(0.03)), 0.1), 0.4, 3)

    straight, p_straight = make(), small_params()
    for _ in range(20):
        straight.sam_step(p_straight, fn)
    first, p = make(), small_params()
    for _ in range(10):
        first.sam_step(p, fn)
    state = first.state_dict()
    own = {"step_counter", "alpha", "k", "slow_w", "slow_b", "slow_s"}
    assert own | {"t", "m_w", "rho"} <= set(state)
    np.savez(tmp_path / "la.npz", **state)
    resumed = make()
    resumed.load_state_dict(dict(np.load(tmp_path / "la.npz")))
    pickled = pickle.loads(pickle.dumps(first))
    p_pickled = {k: v.copy() for k, v in p.items()}
    for _ in range(10):
        resumed.sam_step(p, fn)
        pickled.sam_step(p_pickled, fn)
    assert R.state_snapshot(p) == R.state_snapshot(p_straight) == R.state_snapshot(p_pickled)
    assert R.state_snapshot(resumed.state_dict()) == R.state_snapshot(straight.state_dict())
    assert resumed.step_counter == 20


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_lookahead_refuses_bad_alpha(alpha: Any) -> None:
    with pytest.raises(OptimizerError) as info:
        LookaheadOptimizer(SgdOptimizer(), alpha, 5)
    assert info.value.key == "alpha"


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "5", None, 2**63])
def test_lookahead_refuses_bad_k(k: Any) -> None:
    with pytest.raises(OptimizerError) as info:
        LookaheadOptimizer(SgdOptimizer(), 0.5, k)
    assert info.value.key == "k"
    opt = LookaheadOptimizer(SgdOptimizer(), 0.5, 5)
    with pytest.raises(OptimizerError):
        opt.k = k
    assert opt.k == 5


def test_lookahead_refuses_a_class_or_a_non_optimizer() -> None:
    for inner in (SgdOptimizer, object()):
        with pytest.raises(OptimizerError) as info:
            LookaheadOptimizer(inner)  # type: ignore[arg-type]
        assert info.value.key == "base_optimizer"
    with pytest.raises(OptimizerError) as info:
        LookaheadOptimizer(SgdOptimizer()).first_step({}, {})
    assert info.value.key == "first_step"


def trained_lookahead() -> tuple[LookaheadOptimizer, dict[str, np.ndarray]]:
    opt = LookaheadOptimizer(SamOptimizer(AdamOptimizer(OptimizerConfig(0.05)), 0.1), 0.5, 2)
    params = small_params()
    fn = quadratic({k: v * 0 for k, v in params.items()})
    for _ in range(3):
        opt.sam_step(params, fn)
    return opt, params


def test_lookahead_errors_change_nothing() -> None:
    opt, params = trained_lookahead()
    bad = {k: np.ones_like(v) for k, v in params.items()}
    bad["w"][1, 1] = np.nan
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step(params, bad)
    assert info.value.key == "w"
    assert_unchanged(before, params, bad, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.first_step(params, bad)
    assert_unchanged(before, params, bad, opt)
    # A new parameter whose inner step fails gets no slow weights.
    params["new"] = np.zeros(3)
    bad["new"] = np.array([1.0, np.inf, 0.0])
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step(params, bad)
    assert_unchanged(before, params, bad, opt)
    assert "slow_new" not in opt.state_dict()
    # A loaded slow weight that does not fit its parameter is refused before the inner step.
    state = opt.state_dict()
    state["slow_w"] = np.zeros((3, 4))
    fresh = LookaheadOptimizer(SamOptimizer(AdamOptimizer(OptimizerConfig(0.05)), 0.1), 0.5, 2)
    fresh.load_state_dict(state)
    good = {k: np.ones_like(v) for k, v in params.items()}
    before = snapshot_all(params, good, fresh)
    with pytest.raises(OptimizerError) as info:
        fresh.step(params, good)
    assert info.value.key == "slow_w"
    assert_unchanged(before, params, good, fresh)


def test_lookahead_refuses_new_names_while_a_first_step_made_past_it_is_pending() -> None:
    sam = SamOptimizer(SgdOptimizer(OptimizerConfig(0.1)), 0.1)
    opt = LookaheadOptimizer(sam, 0.5, 2)
    params = small_params()
    grads = {k: np.ones_like(v) for k, v in params.items()}
    sam.first_step(params, grads)
    before = snapshot_all(params, grads, opt)
    with pytest.raises(OptimizerError) as info:
        opt.second_step(params, grads)
    assert info.value.key in params
    assert_unchanged(before, params, grads, opt)


@pytest.mark.parametrize(
    "key, value",
    [("alpha", np.array(1.5)), ("alpha", np.array(np.nan)), ("k", np.array(0)),
     ("k", np.array(2.5)), ("step_counter", np.array(-1)), ("slow_w", np.array([np.nan])),
     ("slow_w", np.array([1, 2])), ("step_counter", None), ("rho", np.array(-1.0)),
     ("bogus", np.array(1.0))],
)
def test_lookahead_refuses_bad_state(key: str, value: Any) -> None:
    opt, _ = trained_lookahead()
    state = opt.state_dict()
    if value is None:
        del state[key]
    else:
        state[key] = value
    fresh = LookaheadOptimizer(SamOptimizer(AdamOptimizer(OptimizerConfig(0.05)), 0.1), 0.5, 2)
    before = R.state_snapshot(fresh.state_dict())
    with pytest.raises(TrainError) as info:
        fresh.load_state_dict(state)
    assert info.value.key == key
    assert R.state_snapshot(fresh.state_dict()) == before
    assert (fresh.alpha, fresh.k) == (0.5, 2)


DETERMINISM = r"""
import hashlib, sys
import numpy as np
from samopt import *
rng = np.random.default_rng(5)
params = {f"p{i}": rng.standard_normal(n).astype([np.float32, np.float64][i % 2])
          for i, n in enumerate([300_000, 7, 100_001, 65_536])}
opt = OPTIMIZER
for t in range(7):
    r = np.random.default_rng(t)
    grads = {k: r.standard_normal(v.shape) for k, v in params.items()}
    STEP
h = hashlib.sha256()
for k in sorted(params):
    h.update(params[k].tobytes())
for k, v in sorted(opt.state_dict().items()):
    h.update(k.encode()); h.update(np.ascontiguousarray(v).tobytes())
print(h.hexdigest())
"""


def digests(optimizer: str, step: str) -> set[str]:
    script = DETERMINISM.replace("OPTIMIZER", optimizer).replace("STEP", step)
    out = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True)
        out.add(run.stdout.strip())
    return out


def test_lookahead_is_deterministic_over_thread_counts() -> None:
    found = digests(
        "LookaheadOptimizer(SamOptimizer(AdamOptimizer(OptimizerConfig(0.01)), 0.05), 0.5, 2)",
        "opt.first_step(params, grads); opt.second_step(params, grads)",
    )
    assert len(found) == 1, found


def test_lookahead_with_groups_and_clipping_matches_reference() -> None:
    cfg = OptimizerConfig(learning_rate=0.05, momentum=0.8, grad_clip=0.5,
                          grad_clip_mode=GradClipMode.NORM)
    inner = SgdOptimizer(cfg, param_groups=[{"params": ["b"], "lr": 0.01, "weight_decay": 0.1}])
    opt = LookaheadOptimizer(inner, 0.3, 3)
    ref = RL.RefLookahead(R.RefSGD(0.05, 0.8, 0.5, "norm",
                                   groups={"b": {"lr": 0.01, "weight_decay": 0.1}}), 0.3, 3)
    params = small_params()
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    fn = quadratic({k: v * 0 + 3.0 for k, v in params.items()})
    for _ in range(20):
        _, g = fn(params)
        opt.step(params, g)
        ref.step(ref_params, R.to_ref_grads(g, dtypes_of(params)))
    R.assert_params_close(params, ref_params, "groups", R.FLOAT32_TOL)


# ============================================================================ LAMB, LARS


@st.composite
def layer_configs(draw: Any, kind: str) -> dict[str, Any]:
    clip_mode = draw(st.sampled_from([None, "value", "norm"]))
    trust_coef = draw(st.sampled_from([0.001, 0.02, 1.0]))
    # LARS moves each array by lr·trust_coef of its norm: at 0.5 with momentum 0.9 a 0-d
    # float32 parameter grew 300-fold in 100 steps and its rounding with it (8e-5 off the
    # float64 reference, while samopt equals a float32-stored reference bit for bit).
    lars_max_lr = 0.5 if trust_coef < 1.0 else 0.05
    return dict(
        kind=kind,
        lr=draw(st.floats(1e-4, lars_max_lr if kind == "lars" else 0.05)),
        momentum=draw(st.one_of(st.just(0.9), st.floats(0.0, 0.95))),
        beta1=draw(st.one_of(st.just(0.9), st.floats(0.0, 0.95))),
        beta2=draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        # Sophia's m/max(ρh, ε) turns the float32 rounding of a cancelling m into a step of
        # its own when ε is tiny (6e-11/1e-8): no float32 run can follow float64 there.
        eps=draw(st.sampled_from([1e-3, 1e-2] if kind == "sophia" else [1e-8, 1e-6, 1e-3])),
        wd=draw(st.one_of(st.none(), st.just(0.0), st.floats(0.0, 0.1))),
        rho=draw(st.sampled_from([0.04, 1.0])),
        freq=draw(st.sampled_from([1, 3, 10])),
        trust_coef=trust_coef,
        exclude_bias=draw(st.booleans()),
        clip_mode=clip_mode,
        clip=None if clip_mode is None else draw(st.floats(0.05, 50.0)),
    )


def make_layer_pair(c: dict[str, Any], groups: dict[str, dict[str, Any]] | None = None,
                    param_groups: Any = None) -> tuple[Any, Any]:
    """(samopt optimizer, reference optimizer); weight_decay None is 0.01 (the crate's)."""
    cfg = OptimizerConfig(
        learning_rate=c["lr"], momentum=c["momentum"], beta1=c["beta1"], beta2=c["beta2"],
        epsilon=c["eps"], weight_decay=c["wd"], grad_clip=c["clip"],
        grad_clip_mode=GradClipMode.NORM if c["clip_mode"] == "norm" else GradClipMode.VALUE,
    )
    wd = 0.01 if c["wd"] is None else c["wd"]
    mode = c["clip_mode"] or "value"
    if c["kind"] == "lamb":
        opt: Any = LambOptimizer(cfg, param_groups=param_groups)
        ref: Any = RL.RefLamb(c["lr"], c["beta1"], c["beta2"], c["eps"], wd, c["clip"], mode,
                              groups)
    elif c["kind"] == "sophia":
        sophia = SophiaConfig(cfg, rho=c.get("rho", 0.04), hessian_update_freq=c.get("freq", 10))
        opt = SophiaOptimizer(sophia, param_groups=param_groups)
        ref = RL.RefSophia(c["lr"], c["beta1"], c["beta2"], c["eps"], wd, sophia.rho,
                           sophia.hessian_update_freq, c["clip"], mode, groups)
    else:
        opt = LarsOptimizer(cfg, c["trust_coef"], c["exclude_bias"], param_groups=param_groups)
        ref = RL.RefLars(c["lr"], c["momentum"], wd, c["trust_coef"],
                         RL.bias_names if c["exclude_bias"] else None, c["clip"], mode, groups)
    return opt, ref


def run_layerwise(specs: list[dict[str, Any]], c: dict[str, Any], sam: dict[str, Any] | None,
                  seed: int) -> None:
    rng = np.random.default_rng(seed)
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    opt, ref = make_layer_pair(c)
    if sam is not None:
        opt = SamOptimizer(opt, sam["rho"], adaptive=sam["adaptive"], eta=sam["eta"])
        ref = R.RefSAM(ref, sam["rho"], sam["adaptive"], sam["eta"])
    seq1 = [build_grads(specs, rng) for _ in range(STEPS)]
    seq2 = [build_grads(specs, rng) for _ in range(STEPS)]
    copies = [{k: v.copy() for k, v in g.items()} for g in seq1 + seq2]
    dts = dtypes_of(params)
    # Norm clipping and adaptive SAM couple the arrays through a global norm.
    coupled = c["clip_mode"] == "norm" or bool(sam and sam["adaptive"])
    scales = R.ScaleTracker()
    track(scales, ref_params, ref)
    base, ref_base = (opt, ref) if sam is None else (opt.base_optimizer, ref.base)
    for t in range(STEPS):
        if c["kind"] == "sophia" and t % 4 == 1:
            # A Hessian-diagonal estimate of the caller's (here |g|-like, any dtype).
            estimates = {k: np.abs(v) for k, v in build_grads(specs, rng).items()}
            ref_base.update_hessian(ref_params, R.to_ref_grads(estimates, dts))
            base.update_hessian(params, estimates)
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
            check(params, opt, ref_params, ref, f"{c['kind']} step {t}", scales, coupled)
    assert_in_place(params, holders)
    assert_grads_untouched(seq1 + seq2, copies)


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_layerwise_trajectory_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(layer_configs(kind), label="config")
    run_layerwise(specs, c, None, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_layerwise_under_sam_matches_reference(kind: str, data: Any) -> None:
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(layer_configs(kind), label="config")
    s = data.draw(sam_configs(), label="sam")
    run_layerwise(specs, c, s, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
def test_the_norms_read_the_restored_values_not_the_perturbed_ones(kind: str) -> None:
    """SAM's second step fused into a layer-wise step equals restoring by hand and then
    stepping: a read pass over the perturbed values would see a larger ‖p‖."""
    c = dict(kind=kind, lr=0.05, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01,
             trust_coef=0.02, exclude_bias=False, clip_mode=None, clip=None)
    fused, _ = make_layer_pair(c)
    plain, _ = make_layer_pair(c)
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


def test_lars_excludes_biases_by_name_not_by_any_letter_b() -> None:
    assert all(is_bias(n) for n in ["b", "bias", "fc1.bias", "layer/b", "out_bias", "h.w_b"])
    assert not any(is_bias(n) for n in ["embedding", "lambda", "weight", "bn.weight", "ab",
                                        "bias.w", "fc.biases"])
    cfg = OptimizerConfig(learning_rate=0.1, momentum=0.0, weight_decay=0.0)
    params = {"embedding": np.ones(4), "fc.bias": np.ones(4)}
    grads = {"embedding": np.full(4, 2.0), "fc.bias": np.full(4, 2.0)}
    LarsOptimizer(cfg, 0.5).step(params, grads)
    # embedding adapts: 0.1·0.5·‖1‖/‖2‖ = 0.025 ; the bias steps with lr 0.1.
    np.testing.assert_allclose(params["embedding"], 1 - 0.025 * 2)
    np.testing.assert_allclose(params["fc.bias"], 1 - 0.1 * 2)
    params = {"embedding": np.ones(4)}
    LarsOptimizer(cfg, 0.5, exclude_bias=lambda n: n.startswith("emb")).step(params, grads)
    np.testing.assert_allclose(params["embedding"], 1 - 0.1 * 2)


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
def test_layerwise_groups_and_clipping_match_reference(kind: str) -> None:
    c = dict(kind=kind, lr=0.02, momentum=0.8, beta1=0.8, beta2=0.99, eps=1e-6, wd=0.05,
             trust_coef=0.1, exclude_bias=True, clip_mode="norm", clip=0.7)
    override = {"lr": 0.005, "weight_decay": 0.0}
    opt, ref = make_layer_pair(c, {"w": override}, [{"params": ["w"], **override}])
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


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
def test_layerwise_resumes_bit_exactly_under_sam_and_lookahead(kind: str, tmp_path: Any) -> None:
    c = dict(kind=kind, lr=0.02, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, wd=None,
             trust_coef=0.02, exclude_bias=True, clip_mode="value", clip=1.0)
    fn = quadratic({k: v * 0 - 1.0 for k, v in small_params().items()})

    def make() -> LookaheadOptimizer:
        return LookaheadOptimizer(SamOptimizer(make_layer_pair(c)[0], 0.05), 0.5, 3)

    straight, p_straight = make(), small_params()
    for _ in range(20):
        straight.sam_step(p_straight, fn)
    first, p = make(), small_params()
    for _ in range(10):
        first.sam_step(p, fn)
    state = first.state_dict()
    assert ("t" in state) == (kind != "lars")
    slot = "velocity_w" if kind == "lars" else "m_w"
    assert slot in state and state[slot].dtype == np.float64
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
    "make",
    [
        lambda: LarsOptimizer(trust_coef=0.0),
        lambda: LarsOptimizer(trust_coef=-1.0),
        lambda: LarsOptimizer(trust_coef=float("nan")),
        lambda: LarsOptimizer(exclude_bias="yes"),  # type: ignore[arg-type]
        lambda: LarsOptimizer(OptimizerConfig(nesterov=True)),
        lambda: LambOptimizer(OptimizerConfig(nesterov=True)),
        lambda: LarsOptimizer(param_groups=[{"params": ["w"], "beta1": 0.5}]),
        lambda: LambOptimizer(param_groups=[{"params": ["w"], "momentum": 0.5}]),
        lambda: LambOptimizer(param_groups=[{"params": ["w"], "lr": -1.0}]),
        lambda: LambOptimizer("config"),  # type: ignore[arg-type]
    ],
)
def test_layerwise_refuses_bad_hyperparameters(make: Any) -> None:
    with pytest.raises(OptimizerError) as info:
        make()
    assert info.value.key in ("trust_coef", "exclude_bias", "nesterov", "beta1", "momentum",
                              "lr", "config")


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
def test_layerwise_errors_change_nothing(kind: str) -> None:
    c = dict(kind=kind, lr=0.02, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01,
             trust_coef=0.02, exclude_bias=True, clip_mode=None, clip=None)
    opt = SamOptimizer(make_layer_pair(c)[0], 0.05)
    params = small_params()
    fn = quadratic({k: v * 0 for k, v in params.items()})
    for _ in range(2):
        opt.sam_step(params, fn)
    _, good = fn(params)
    bad = dict(good, s=np.array(np.inf))
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.base_optimizer.step(params, bad)
    assert info.value.key == "s"
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
    slot = {"lamb": "v_w", "lars": "velocity_w", "sophia": "h_w"}[kind]
    for key, value in [(slot, np.full((4, 3), np.nan)), ("t", np.array(-1)),
                       (slot, np.ones(3)), ("lr", np.array(-0.1))]:
        if kind == "lars" and (key == "t" or value.shape == (3,)):
            continue  # LARS counts no steps; a lone velocity_ has no partner to disagree with
        broken = dict(state, **{key: value})
        fresh = SamOptimizer(make_layer_pair(c)[0], 0.05)
        before_state = R.state_snapshot(fresh.state_dict())
        with pytest.raises(TrainError) as info:
            fresh.load_state_dict(broken)
        # A v_ that does not match its m_ partner is reported under the pair's first key.
        assert info.value.key in (key, "m_w")
        assert R.state_snapshot(fresh.state_dict()) == before_state


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
def test_layerwise_is_deterministic_over_thread_counts(kind: str) -> None:
    opt = {"lamb": "LambOptimizer(OptimizerConfig(0.01))",
           "lars": "LarsOptimizer(OptimizerConfig(0.1), 0.02)",
           "sophia": "SophiaOptimizer(SophiaConfig(hessian_update_freq=2))"}[kind]
    found = digests(f"SamOptimizer({opt}, 0.05)",
                    "opt.first_step(params, grads); opt.second_step(params, grads)")
    assert len(found) == 1, found


@pytest.mark.parametrize("kind", ["lamb", "lars", "sophia"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_layerwise_under_gsam_matches_reference(kind: str, data: Any) -> None:
    """GSAM's mix is fused into the layer-wise step as into the element-wise ones: the norms
    are those of the mixed (then clipped) gradient, from the restored values."""
    specs = data.draw(array_specs(), label="arrays")
    c = data.draw(layer_configs(kind), label="config")
    alpha = data.draw(st.sampled_from([0.0, 0.4, 1.0]), label="alpha")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    holders, ref_params = build_params(specs, rng)
    params = {k: h.array for k, h in holders.items()}
    base, ref_base = make_layer_pair(c)
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
            # The mix's cosine couples every array with every other.
            check(params, opt, ref_params, ref, f"GSAM step {t}", scales, coupled=True)
    assert_in_place(params, holders)


def test_one_lookahead_stepped_from_two_threads_matches_a_sequential_run() -> None:
    """The optimizer's lock serialises the calls: two threads taking 20 steps each with the
    same gradients end where one thread taking 40 does."""
    import threading

    def make() -> LookaheadOptimizer:
        return LookaheadOptimizer(LambOptimizer(OptimizerConfig(0.01)), 0.5, 3)

    grads = {k: np.full_like(v, 0.1) for k, v in small_params().items()}
    shared, p_shared = make(), small_params()
    alone, p_alone = make(), small_params()

    def worker() -> None:
        for _ in range(20):
            shared.step(p_shared, grads)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(40):
        alone.step(p_alone, grads)
    assert R.state_snapshot(p_shared) == R.state_snapshot(p_alone)
    assert R.state_snapshot(shared.state_dict()) == R.state_snapshot(alone.state_dict())


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: SophiaConfig(rho=0.0), "rho"),
        (lambda: SophiaConfig(rho=float("inf")), "rho"),
        (lambda: SophiaConfig(hessian_update_freq=0), "hessian_update_freq"),
        (lambda: SophiaConfig(hessian_update_freq=2.0), "hessian_update_freq"),
        (lambda: SophiaConfig(variant="hutchinson"), "variant"),
        (lambda: SophiaConfig(base=None), "base"),
        (lambda: SophiaOptimizer("config"), "config"),
        (lambda: SophiaOptimizer(OptimizerConfig(beta2=1.0)), "beta2"),
        (lambda: SophiaOptimizer(param_groups=[{"params": ["w"], "momentum": 0.5}]), "momentum"),
    ],
)
def test_sophia_refuses_bad_hyperparameters(make: Any, key: str) -> None:
    with pytest.raises(OptimizerError) as info:
        make()
    assert info.value.key == key


def test_sophia_defaults_are_the_crates() -> None:
    config = SophiaConfig()
    assert (config.rho, config.hessian_update_freq) == (0.04, 10)
    assert config.variant is SophiaVariant.GAUSS_NEWTON_BARTLETT
    base = config.base
    assert (base.learning_rate, base.beta1, base.beta2, base.epsilon, base.weight_decay) == (
        2e-4, 0.965, 0.99, 1e-8, 0.01)
    # SophiaOptimizer(OptimizerConfig) is the crate's SophiaOptimizer::new(config).
    assert SophiaOptimizer(OptimizerConfig(0.1)).sophia_config.rho == 0.04


def test_sophia_update_hessian_errors_change_nothing() -> None:
    opt = SophiaOptimizer(SophiaConfig(hessian_update_freq=3))
    params = small_params()
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    opt.step(params, grads)
    opt.update_hessian(params, {k: np.ones_like(v) for k, v in params.items()})
    bad = {k: np.ones_like(v) for k, v in params.items()}
    bad["b"] = np.array([1.0, np.nan, 1.0])
    before = snapshot_all(params, bad, opt)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.update_hessian(params, bad)
    assert info.value.key == "b"
    assert_unchanged(before, params, bad, opt)
    missing = {k: v for k, v in bad.items() if k != "w"}
    with pytest.raises(OptimizerError) as info:
        opt.update_hessian(params, missing)
    assert info.value.key == "w"
    assert_unchanged(before, params, bad, opt)
    wrong = dict(bad, b=np.ones(4))
    with pytest.raises(OptimizerError) as info:
        opt.update_hessian(params, wrong)
    assert info.value.key == "b"
    state = opt.state_dict()
    assert int(state["steps_since_hessian_update"]) == 0 and int(state["t"]) == 1
    del state["steps_since_hessian_update"]
    with pytest.raises(OptimizerError) as info:
        SophiaOptimizer().load_state_dict(state)
    assert info.value.key == "steps_since_hessian_update"
