"""Checkpoints: state_dict -> numpy.savez -> numpy.load -> load_state_dict into a FRESH
optimizer resumes bit-exactly (also between SAM's first_step and second_step); state_dict
returns copies; keys, dtypes and shapes; load replaces the state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
)

BASES = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}
VARIANTS = [
    # (name, base kind, clip mode, sam: None | (adaptive, eta))
    ("sgd", "sgd", None, None),
    ("sgd_norm", "sgd", "norm", None),
    ("adam", "adam", "value", None),
    ("adamw", "adamw", None, None),
    ("adamw_norm", "adamw", "norm", None),
    ("sam_sgd", "sgd", None, (False, 0.0)),
    ("sam_adam_norm", "adam", "norm", (False, 0.0)),
    ("sam_adamw", "adamw", "value", (False, 0.0)),
    ("asam_sgd", "sgd", "norm", (True, 0.0)),
    ("asam_adamw_eta", "adamw", None, (True, 0.01)),
]


def build(base: str, clip: str | None, sam: Any, lr: float = 0.02) -> Any:
    cfg = OptimizerConfig(
        learning_rate=lr, momentum=0.8, beta1=0.85, beta2=0.99, weight_decay=0.05,
        grad_clip=None if clip is None else 1.5,
        grad_clip_mode=GradClipMode.NORM if clip == "norm" else GradClipMode.VALUE)
    opt = BASES[base](cfg)
    if sam is not None:
        opt = SamOptimizer(opt, rho=0.07, adaptive=sam[0], eta=sam[1])
    return opt


def make_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "enc.w": R.make_array(rng.standard_normal((6, 5)), np.float32, "transposed").array,
        "enc.b": R.make_array(rng.standard_normal(7), np.float64, "strided").array,
        "dec.w": R.make_array(rng.standard_normal((2, 3, 4)), np.float64, "F").array,
        "gain": R.make_array(rng.standard_normal(()), np.float32, "C").array,
        "none": np.zeros((0, 2), np.float32),
    }


def grad_seq(params: dict[str, np.ndarray], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    dts = [np.float16, np.float32, np.float64]
    return [{k: np.asarray(rng.standard_normal(p.shape) * 2).astype(dts[(i + j) % 3])
             for j, (k, p) in enumerate(params.items())} for i in range(n)]


def run(opt: Any, params: dict[str, np.ndarray], g1: list, g2: list, start: int, stop: int
        ) -> None:
    for t in range(start, stop):
        if t == 5:
            opt.set_lr(0.013)  # lr changed during training is part of the checkpoint
        if isinstance(opt, SamOptimizer):
            opt.first_step(params, g1[t])
        opt.step(params, g2[t])


def save(path: Path, opt: Any, params: dict[str, np.ndarray]) -> None:
    np.savez(path / "opt.npz", **opt.state_dict())
    np.savez(path / "params.npz", **params)


def load(path: Path, opt: Any, seed: int) -> dict[str, np.ndarray]:
    """Load the optimizer checkpoint, and the params' values into the model's own arrays
    (same memory layouts as before), as a training script would."""
    with np.load(path / "opt.npz") as f:
        opt.load_state_dict(dict(f))
    params = make_params(seed)
    with np.load(path / "params.npz") as f:
        for k, v in params.items():
            v[...] = f[k]
    return params


def assert_same(p1: dict, p2: dict, o1: Any, o2: Any) -> None:
    assert list(p1) == list(p2)
    for k in p1:
        assert p1[k].dtype == p2[k].dtype and p1[k].shape == p2[k].shape
        assert p1[k].tobytes() == p2[k].tobytes(), f"param {k!r} differs"
    assert R.state_snapshot(o1.state_dict()) == R.state_snapshot(o2.state_dict())
    assert o1.get_lr() == o2.get_lr()


@pytest.mark.parametrize("name,base,clip,sam", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path, name: str, base: str,
                                             clip: str | None, sam: Any) -> None:
    ref_params = make_params(1)
    g1, g2 = grad_seq(ref_params, 20, 2), grad_seq(ref_params, 20, 3)
    ref = build(base, clip, sam)
    run(ref, ref_params, g1, g2, 0, 20)

    params = make_params(1)
    opt = build(base, clip, sam)
    run(opt, params, g1, g2, 0, 10)
    save(tmp_path, opt, params)
    del opt, params
    fresh = build(base, clip, sam, lr=0.5)  # a different lr: the checkpoint's must win
    params = load(tmp_path, fresh, 1)
    assert fresh.get_lr() == 0.013
    run(fresh, params, g1, g2, 10, 20)
    assert_same(ref_params, params, ref, fresh)
    # and the run really moved
    assert any(np.any(ref_params[k] != v) for k, v in make_params(1).items() if v.size)


@pytest.mark.parametrize("name,base,clip,sam",
                         [v for v in VARIANTS if v[3] is not None],
                         ids=[v[0] for v in VARIANTS if v[3] is not None])
def test_resume_between_first_and_second_step(tmp_path: Path, name: str, base: str,
                                              clip: str | None, sam: Any) -> None:
    ref_params = make_params(4)
    g1, g2 = grad_seq(ref_params, 20, 5), grad_seq(ref_params, 20, 6)
    ref = build(base, clip, sam)
    run(ref, ref_params, g1, g2, 0, 20)

    params = make_params(4)
    opt = build(base, clip, sam)
    run(opt, params, g1, g2, 0, 10)
    before = {k: v.copy() for k, v in params.items()}
    opt.first_step(params, g1[10])
    state = opt.state_dict()
    saved = {k for k in state if k.startswith("saved_")}
    assert {"saved_" + k for k in params if params[k].size} <= saved <= {
        "saved_" + k for k in params}
    for k in saved:
        name_ = k[len("saved_"):]
        assert state[k].dtype == params[name_].dtype
        assert state[k].tobytes() == np.ascontiguousarray(before[name_]).tobytes()
    save(tmp_path, opt, params)  # params are perturbed here
    del opt, params
    fresh = build(base, clip, sam, lr=0.5)
    params = load(tmp_path, fresh, 4)
    fresh.second_step(params, g2[10])
    run(fresh, params, g1, g2, 11, 20)
    assert_same(ref_params, params, ref, fresh)


@pytest.mark.parametrize("name,base,clip,sam", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_state_keys_dtypes_shapes(name: str, base: str, clip: str | None, sam: Any) -> None:
    opt = build(base, clip, sam)
    fresh_state = R.without_extra_keys(opt.state_dict())
    expected_scalars = {"lr"} | ({"t"} if base != "sgd" else set()) | (
        {"rho"} if sam else set())
    assert set(fresh_state) == expected_scalars
    params = make_params(7)
    g1, g2 = grad_seq(params, 3, 8), grad_seq(params, 3, 9)
    run(opt, params, g1, g2, 0, 3)
    state = R.without_extra_keys(opt.state_dict())
    per_param = {"velocity_"} if base == "sgd" else {"m_", "v_"}
    expected = set(expected_scalars)
    for k, p in params.items():
        if p.size:
            expected |= {pre + k for pre in per_param}
    assert expected <= set(state)
    extra = set(state) - expected
    assert all(state[k].size == 0 for k in extra), extra
    for k, v in state.items():
        assert isinstance(v, np.ndarray)
        if k in ("lr", "rho"):
            assert v.shape == () and v.dtype == np.float64
        elif k == "t":
            assert v.shape == () and v.dtype == np.int64 and int(v) == 3
        else:
            p = params[R.state_key_param(k, params)]
            assert v.shape == p.shape and v.dtype == p.dtype
    assert float(state["lr"]) == 0.02
    if sam:
        assert float(state["rho"]) == 0.07


@pytest.mark.parametrize("name,base,clip,sam", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_state_dict_returns_copies(name: str, base: str, clip: str | None, sam: Any) -> None:
    opt, twin = build(base, clip, sam), build(base, clip, sam)
    p1, p2 = make_params(10), make_params(10)
    g1, g2 = grad_seq(p1, 6, 11), grad_seq(p1, 6, 12)
    run(opt, p1, g1, g2, 0, 3)
    run(twin, p2, g1, g2, 0, 3)
    if sam:
        opt.first_step(p1, g1[3])
        twin.first_step(p2, g1[3])
    s = opt.state_dict()
    assert s is not opt.state_dict()
    for k, v in s.items():
        for p in p1.values():
            assert not np.shares_memory(v, p), f"state {k!r} shares memory with a param"
        if v.flags.writeable:
            v[...] = 7
    s.clear()
    assert R.state_snapshot(opt.state_dict()) == R.state_snapshot(twin.state_dict())
    if sam:
        opt.second_step(p1, g2[3])
        twin.second_step(p2, g2[3])
    run(opt, p1, g1, g2, 4, 6)
    run(twin, p2, g1, g2, 4, 6)
    assert_same(p1, p2, opt, twin)


@pytest.mark.parametrize("name,base,clip,sam", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_load_copies_and_replaces(name: str, base: str, clip: str | None, sam: Any) -> None:
    """load_state_dict(s) makes state_dict() == s (the old state is replaced, pending
    included), and later changes to s's arrays do not reach the optimizer."""
    src = build(base, clip, sam)
    p = make_params(13)
    g1, g2 = grad_seq(p, 8, 14), grad_seq(p, 8, 15)
    run(src, p, g1, g2, 0, 2)
    small = {k: v for k, v in p.items() if k == "enc.w"}
    if sam:
        src.first_step(small, {"enc.w": g1[2]["enc.w"]})
    s = src.state_dict()
    snap = R.state_snapshot(s)
    target = build(base, clip, sam)
    q = make_params(16)
    run(target, q, g1, g2, 0, 4)
    if sam:
        target.first_step(q, g1[4])  # pending on every param: replaced by the load
    target.load_state_dict(s)
    assert R.state_snapshot(target.state_dict()) == snap
    for v in s.values():
        if v.flags.writeable:
            v[...] = 3
    assert R.state_snapshot(target.state_dict()) == snap
    assert R.state_snapshot(src.state_dict()) == snap
    if sam:
        assert target.rho == 0.07


def test_rho_from_state() -> None:
    sam = SamOptimizer(SgdOptimizer(), rho=0.05)
    state = sam.state_dict()
    state["rho"] = np.array(0.25)
    fresh = SamOptimizer(SgdOptimizer(), rho=0.05)
    fresh.load_state_dict(state)
    assert fresh.rho == 0.25 and float(fresh.state_dict()["rho"]) == 0.25
    p = {"w": np.array([1.0, 1.0])}
    fresh.first_step(p, {"w": np.array([3.0, 4.0])})
    np.testing.assert_allclose(p["w"], [1.15, 1.2], rtol=1e-15)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_fresh_state_round_trip_and_lazy_entries(tmp_path: Path, kind: str) -> None:
    """A state with entries for only some params; new params get fresh state lazily."""
    a = build(kind, None, None)
    b = build(kind, None, None)
    pa, pb = make_params(20), make_params(20)
    g = grad_seq(pa, 6, 21)
    first = ["enc.w", "gain"]
    for t in range(3):
        a.step({k: pa[k] for k in first}, g[t])
        b.step({k: pb[k] for k in first}, g[t])
    np.savez(tmp_path / "s.npz", **b.state_dict())
    c = build(kind, None, None)
    with np.load(tmp_path / "s.npz") as f:
        c.load_state_dict(dict(f))
    for t in range(3, 6):
        a.step(pa, g[t])
        c.step(pb, g[t])
    assert_same(pa, pb, a, c)
    # a fresh optimizer's state loads into another fresh optimizer
    d = build(kind, None, None)
    d.load_state_dict(build(kind, None, None).state_dict())
