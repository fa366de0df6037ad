"""Every error case of SPEC.md / the API contract: the right exception class, a message and
`.key` naming the offending key, and params, grads and the optimizer state bitwise
unchanged afterwards (bare optimizers, SAM's first_step, SAM's second_step after a
successful first_step, config, set_lr, rho/eta, corrupt state dicts)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
    compute_gradient_norm,
)

A, Z = "a.first", "z.last"  # sorted first and last: errors must not half-apply either way
KINDS = ["sgd", "adam", "adamw", "sam", "asam"]
CFG = OptimizerConfig(learning_rate=0.05, grad_clip=2.0, grad_clip_mode=GradClipMode.NORM)


def make_opt(kind: str) -> Any:
    if kind == "sgd":
        return SgdOptimizer(CFG)
    if kind == "adam":
        return AdamOptimizer(CFG)
    if kind == "adamw":
        return AdamWOptimizer(CFG)
    if kind == "sam":
        return SamOptimizer(AdamOptimizer(CFG), rho=0.1)
    return SamOptimizer(SgdOptimizer(CFG), rho=0.1, adaptive=True, eta=0.01)


def valid_params() -> dict[str, np.ndarray]:
    return {
        A: np.linspace(-1.0, 2.0, 12, dtype=np.float32).reshape(3, 4),
        Z: np.linspace(0.5, -3.0, 5),
    }


def valid_grads(params: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.standard_normal(params[A].shape).astype(np.float16),
            Z: rng.standard_normal(params[Z].shape)}


def trained(kind: str) -> tuple[Any, dict[str, np.ndarray]]:
    """An optimizer with state for A and Z (two steps already taken) and its params."""
    opt = make_opt(kind)
    params = valid_params()
    for s in range(2):
        if isinstance(opt, SamOptimizer):
            opt.first_step(params, valid_grads(params, 10 + s))
        opt.step(params, valid_grads(params, s))
    return opt, params


def check_error(opt: Any, call: Callable[[], Any], params: Any, grads: Any,
                exc: type, keys: Any) -> BaseException:
    """`call()` raises `exc` naming one of `keys`; nothing changed."""
    p_snap = R.snapshot(params) if isinstance(params, dict) else None
    g_snap = R.snapshot(grads) if isinstance(grads, dict) else None
    s_snap = R.state_snapshot(opt.state_dict())
    lr = opt.get_lr()
    try:
        call()
    except exc as e:
        err: BaseException = e
    except BaseException as e:  # e.g. pyo3's PanicException, which is no Exception
        pytest.fail(f"expected {exc.__name__}, got {type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail(f"expected {exc.__name__}, nothing raised")
    assert isinstance(err, TrainError)
    if issubclass(exc, OptimizerError):
        assert isinstance(err, ValueError)
    if exc is OptimizerError:
        assert not isinstance(err, NonFiniteGradientError), f"wrong class: {err!r}"
    assert hasattr(err, "key")
    if keys is not None:
        keys = {keys} if isinstance(keys, str) else set(keys)
        assert err.key in keys, f".key is {err.key!r}, expected one of {sorted(keys)}"
        assert err.key in str(err), f"message does not name {err.key!r}: {err}"
    assert str(err), "empty message"
    if p_snap is not None:
        R.assert_same_snapshot(p_snap, R.snapshot(params), "params")
    if g_snap is not None:
        R.assert_same_snapshot(g_snap, R.snapshot(grads), "grads")
    assert R.state_snapshot(opt.state_dict()) == s_snap, "optimizer state changed"
    assert opt.get_lr() == lr
    return err


# ----------------------------------------------------------------------------- bad inputs
# Each case edits valid (params, grads) in place, for the name `w`, and returns
# (expected exception, accepted .key values).


def _missing(p: dict, g: dict, w: str) -> Any:
    del g[w]
    return OptimizerError, w


def _shape(p: dict, g: dict, w: str) -> Any:
    g[w] = np.zeros((*p[w].shape[::-1], 2))
    return OptimizerError, w


def _broadcastable(p: dict, g: dict, w: str) -> Any:
    shape = p[w].shape[-1:] if p[w].ndim > 1 else (1,)
    g[w] = np.ones(shape, dtype=p[w].dtype)  # would broadcast: must not
    return OptimizerError, w


def _grad_dtype(dt: Any) -> Callable:
    def case(p: dict, g: dict, w: str) -> Any:
        if dt is object:
            g[w] = np.ones(p[w].shape, dtype=object)
        else:
            g[w] = np.ones(p[w].shape).astype(dt)
        return OptimizerError, w
    case.__name__ = f"grad_{np.dtype(dt).name}"
    return case


def _grad_list(p: dict, g: dict, w: str) -> Any:
    g[w] = g[w].astype(np.float64).tolist()
    return OptimizerError, w


def _grad_scalar(p: dict, g: dict, w: str) -> Any:
    g[w] = 0.5
    return OptimizerError, w


def _nonfinite(value: float, dt: Any) -> Callable:
    def case(p: dict, g: dict, w: str) -> Any:
        arr = np.ones(p[w].shape, dtype=dt)
        arr.flat[arr.size // 2] = value
        g[w] = arr
        return NonFiniteGradientError, w
    case.__name__ = f"grad_{value}_{np.dtype(dt).name}"
    return case


def _param_dtype(dt: Any) -> Callable:
    def case(p: dict, g: dict, w: str) -> Any:
        if dt is object:
            p[w] = np.ones(p[w].shape, dtype=object)
        else:
            p[w] = np.ones(p[w].shape).astype(dt)
        g[w] = np.ones(p[w].shape)
        return OptimizerError, w
    case.__name__ = f"param_{np.dtype(dt).name}"
    return case


def _param_readonly(p: dict, g: dict, w: str) -> Any:
    p[w] = p[w].copy()
    p[w].setflags(write=False)
    return OptimizerError, w


def _param_readonly_view(p: dict, g: dict, w: str) -> Any:
    p[w] = np.broadcast_to(np.float64(1.5), p[w].shape)  # read-only, zero strides
    g[w] = np.ones(p[w].shape)
    return OptimizerError, w


def _param_list(p: dict, g: dict, w: str) -> Any:
    p[w] = p[w].tolist()
    return OptimizerError, w


def _same_array_twice(p: dict, g: dict, w: str) -> Any:
    p["dup"] = p[w]
    g["dup"] = g[w].copy()
    return OptimizerError, (w, "dup")


def _own_gradient(p: dict, g: dict, w: str) -> Any:
    g[w] = p[w]
    return TrainError, w


def _other_params_gradient(p: dict, g: dict, w: str) -> Any:
    p["twin"] = p[w].copy() + 1
    g["twin"] = p[w]
    return TrainError, (w, "twin")


CASES = [
    _missing, _shape, _broadcastable,
    _grad_dtype(np.int64), _grad_dtype(np.int32), _grad_dtype(np.uint8),
    _grad_dtype(np.bool_), _grad_dtype(np.complex128), _grad_dtype(np.complex64),
    _grad_dtype(object), _grad_list, _grad_scalar,
    _nonfinite(np.nan, np.float64), _nonfinite(np.inf, np.float64),
    _nonfinite(-np.inf, np.float32), _nonfinite(np.nan, np.float16),
    _nonfinite(np.inf, np.float16),
    _param_dtype(np.float16), _param_dtype(np.int64), _param_dtype(np.bool_),
    _param_dtype(np.complex128), _param_dtype(object),
    _param_readonly, _param_readonly_view, _param_list,
    _same_array_twice, _own_gradient, _other_params_gradient,
]


KIND_PHASES = [(k, "step") for k in KINDS] + [
    (k, ph) for k in ("sam", "asam") for ph in ("first_step", "second_step")]


@pytest.mark.parametrize("which", [A, Z])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
@pytest.mark.parametrize("kind,phase", KIND_PHASES, ids=[f"{k}-{p}" for k, p in KIND_PHASES])
def test_bad_input_raises_and_changes_nothing(kind: str, phase: str, case: Callable,
                                              which: str) -> None:
    opt, params = trained(kind)
    if phase == "second_step":
        opt.first_step(params, valid_grads(params, 99))  # pending perturbation
        assert any(k.startswith("saved_") for k in opt.state_dict())
    pert = {k: v.copy() for k, v in params.items()}
    originals = dict(params)  # the caller's arrays, whatever the case does to the dict
    grads = valid_grads(params, 5)
    exc, keys = case(params, grads, which)
    method = getattr(opt, phase)
    check_error(opt, lambda: method(params, grads), params, grads, exc, keys)
    for k, arr in originals.items():
        # bare step / first_step: untouched; second_step: still perturbed (pending kept)
        assert arr.tobytes() == pert[k].tobytes(), f"{k!r} changed"
    if phase == "second_step":
        assert {k for k in opt.state_dict() if k.startswith("saved_")} == {
            "saved_" + A, "saved_" + Z}


@pytest.mark.parametrize("kind", KINDS)
def test_error_then_valid_step_matches_clean_run(kind: str) -> None:
    """After a rejected call the optimizer continues exactly as if it never happened."""
    o1, p1 = trained(kind)
    o2, p2 = trained(kind)
    bad = valid_grads(p1, 3)
    bad[Z] = bad[Z].copy()
    bad[Z][0] = np.nan
    with pytest.raises(NonFiniteGradientError):
        if isinstance(o1, SamOptimizer):
            o1.first_step(p1, bad)
        else:
            o1.step(p1, bad)
    for o, p in ((o1, p1), (o2, p2)):
        if isinstance(o, SamOptimizer):
            o.first_step(p, valid_grads(p, 4))
        o.step(p, valid_grads(p, 5))
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes()
    assert R.state_snapshot(o1.state_dict()) == R.state_snapshot(o2.state_dict())


def test_nonfinite_after_conversion_to_param_dtype() -> None:
    """A finite float64 gradient that overflows float32 (the param's dtype) is non-finite
    after the conversion samopt does: it must not reach the float32 weights."""
    for kind in KINDS:
        opt, params = trained(kind)
        grads = valid_grads(params)
        grads[A] = np.full(params[A].shape, 1e300)  # float64 -> float32: inf
        call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
        check_error(opt, lambda c=call, p=params, g=grads: c(p, g), params, grads,
                    NonFiniteGradientError, A)


@pytest.mark.parametrize("kind", KINDS)
def test_param_aliasing_view_rejected(kind: str) -> None:
    """Two parameter names over the same memory (x and x[...]): writing both in place is
    a data race / double update; it is "the same array passed as two parameters"."""
    opt, params = trained(kind)
    grads = valid_grads(params)
    params["alias"] = params[A][...]
    grads["alias"] = grads[A].copy()
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    check_error(opt, lambda: call(params, grads), params, grads, OptimizerError, (A, "alias"))


@pytest.mark.parametrize("kind", KINDS)
def test_state_is_the_optimizers_own(kind: str) -> None:
    """The optimizer's state lives in its native engine: no attribute exposes a state
    array, and state_dict hands out copies. So a state array handed back in as a gradient,
    or written to, cannot alias what the kernels write (this once needed a check per call)."""
    opt, params = trained(kind)
    twin, twin_params = trained(kind)
    exposed = [k for k, v in vars(opt).items() if isinstance(v, np.ndarray)]
    if isinstance(opt, SamOptimizer):
        exposed += [k for k, v in vars(opt.base_optimizer).items() if isinstance(v, np.ndarray)]
    assert exposed == []
    state = opt.state_dict()
    slot = next(k for k in state if k.endswith(Z) and state[k].shape == params[Z].shape)
    grads = valid_grads(params)
    grads[Z] = state[slot]  # a state array as a gradient: it is a copy
    state[slot] += 1.0  # and writing to it changes nothing of the optimizer's
    twin_grads = valid_grads(twin_params)
    twin_grads[Z] = twin.state_dict()[slot] + 1.0
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    twin_call = twin.first_step if isinstance(twin, SamOptimizer) else twin.step
    call(params, grads)
    twin_call(twin_params, twin_grads)
    assert R.state_snapshot(twin_params) == R.state_snapshot(params)
    assert R.state_snapshot(twin.state_dict()) == R.state_snapshot(opt.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_param_partially_overlapping_views_rejected(kind: str) -> None:
    """Two parameters whose memory overlaps in part: updating both in place is a race."""
    opt, _ = trained(kind)
    buf = np.linspace(-1.0, 1.0, 10)
    params = {"left": buf[:6], "right": buf[4:]}
    grads = {"left": np.ones(6), "right": np.ones(6)}
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    buf_before = buf.copy()
    check_error(opt, lambda: call(params, grads), params, grads, OptimizerError,
                ("left", "right"))
    assert buf.tobytes() == buf_before.tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_interleaved_views_of_one_buffer_are_fine(kind: str) -> None:
    """buf[::2] and buf[1::2] share a buffer but no element: valid, and updated as the same
    values in separate arrays would be."""
    opt, twin = make_opt(kind), make_opt(kind)
    buf = np.linspace(-1.0, 1.0, 20)
    params = {"even": buf[::2], "odd": buf[1::2]}
    sep = {"even": buf[::2].copy(), "odd": buf[1::2].copy()}
    for s in range(3):
        rng = np.random.default_rng(s)
        g = {"even": rng.standard_normal(10), "odd": rng.standard_normal(10)}
        for o, p in ((opt, params), (twin, sep)):
            if isinstance(o, SamOptimizer):
                o.first_step(p, g)
            o.step(p, {k: v[::-1].copy() for k, v in g.items()})
    np.testing.assert_allclose(buf[::2], sep["even"], rtol=1e-13, atol=0)
    np.testing.assert_allclose(buf[1::2], sep["odd"], rtol=1e-13, atol=0)
    assert np.all(buf[::2] != np.linspace(-1.0, 1.0, 20)[::2])


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_viewing_param_memory(kind: str) -> None:
    """A gradient that is a view of its own parameter's memory: never a Rust panic; either a
    TrainError that changes nothing, or the result of using the gradient's value at the
    time of the call."""
    opt, params = trained(kind)
    grads = valid_grads(params)
    grads[Z] = params[Z][...]
    twin, twin_params = trained(kind)
    twin_grads = dict(grads, **{Z: params[Z].copy()})
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    twin_call = twin.first_step if isinstance(twin, SamOptimizer) else twin.step
    s_snap = R.state_snapshot(opt.state_dict())
    before = {k: v.copy() for k, v in params.items()}
    try:
        call(params, grads)
    except TrainError as e:
        assert e.key == Z and Z in str(e)
        for k in params:
            assert params[k].tobytes() == before[k].tobytes()
        assert R.state_snapshot(opt.state_dict()) == s_snap
        return
    except BaseException as e:
        pytest.fail(f"{type(e).__name__}: {e}")
    twin_call(twin_params, twin_grads)
    for k in params:
        assert params[k].tobytes() == twin_params[k].tobytes()


# ----------------------------------------------------------------------------- exotic arrays
# Valid float arrays that are unusual in memory: non-native byte order, unaligned data.
# samopt may convert them or reject them with a TrainError naming the key, but a Rust
# panic (pyo3's PanicException, a BaseException) is a bug (SPEC "Errors").


def _unaligned(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    buf = np.zeros(values.nbytes + 1, np.uint8)
    out = buf[1:].view(values.dtype).reshape(values.shape)
    out[...] = values
    assert not out.flags.aligned
    return out


EXOTIC = {
    # name: (param dtype, how to make the exotic param, how to make the exotic grad)
    "grad_big_endian_f8": (np.float64, None, lambda g: g.astype(">f8")),
    "grad_big_endian_f4": (np.float32, None, lambda g: g.astype(">f4")),
    "grad_big_endian_f4_for_f8": (np.float64, None, lambda g: g.astype(">f4")),
    "grad_big_endian_f2": (np.float32, None, lambda g: g.astype(">f2")),
    "grad_unaligned_f8": (np.float64, None, lambda g: _unaligned(g.astype(np.float64))),
    "grad_unaligned_f4_for_f8": (np.float64, None, lambda g: _unaligned(g.astype(np.float32))),
    "param_big_endian_f8": (np.float64, lambda p: p.astype(">f8"), None),
    "param_unaligned_f8": (np.float64, lambda p: _unaligned(p), None),
    "param_unaligned_f4": (np.float32, lambda p: _unaligned(p), None),
}


def _native(a: np.ndarray) -> np.ndarray:
    """An ordinary (native byte order, aligned, contiguous) copy with the same values."""
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


@pytest.mark.parametrize("case", list(EXOTIC))
@pytest.mark.parametrize("kind,phase", KIND_PHASES, ids=[f"{k}-{p}" for k, p in KIND_PHASES])
def test_exotic_arrays_never_panic(kind: str, phase: str, case: str) -> None:
    pdt, make_p, make_g = EXOTIC[case]
    w = "odd.one"
    rng = np.random.default_rng(0)
    p_vals = rng.standard_normal(6).astype(pdt)
    g_vals = rng.standard_normal(6).astype(pdt)
    params = {"plain": rng.standard_normal(4), w: make_p(p_vals) if make_p else p_vals}
    grads = {"plain": rng.standard_normal(4), w: make_g(g_vals) if make_g else g_vals}
    twin_params = {k: _native(v) for k, v in params.items()}
    twin_grads = {k: _native(v) for k, v in grads.items()}
    opt, twin = make_opt(kind), make_opt(kind)
    ones = {k: np.ones(np.shape(v)) for k, v in params.items()}
    if phase == "second_step":
        twin.first_step(twin_params, ones)
    try:
        if phase == "second_step":
            opt.first_step(params, ones)
        getattr(opt, phase)(params, grads)
    except TrainError as e:
        assert e.key == w and w in str(e), f"{e!r} does not name {w!r}"
        return  # rejected; that nothing changes on errors is checked elsewhere
    except BaseException as e:
        pytest.fail(f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}")
    # accepted: the same result as with ordinary arrays of the same values
    getattr(twin, phase)(twin_params, twin_grads)
    for k in params:
        np.testing.assert_allclose(params[k], twin_params[k], rtol=1e-15, atol=0, err_msg=k)


@pytest.mark.parametrize("case", [c for c in EXOTIC if c.startswith("grad")])
def test_exotic_arrays_gradient_norm(case: str) -> None:
    _, _, make_g = EXOTIC[case]
    g_vals = np.array([3.0, 4.0, 12.0])
    g = make_g(g_vals)
    try:
        r = compute_gradient_norm({"g": g, "h": np.ones(1)})
    except TrainError as e:
        assert e.key == "g"
        return
    except BaseException as e:
        pytest.fail(f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}")
    assert abs(r - math.sqrt(170.0)) <= 1e-15 * r


# ----------------------------------------------------------------------------- SAM protocol


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_first_step_twice(kind: str) -> None:
    opt, params = trained(kind)
    opt.first_step(params, valid_grads(params, 1))
    grads = valid_grads(params, 2)
    check_error(opt, lambda: opt.first_step(params, grads), params, grads, OptimizerError,
                None)


@pytest.mark.parametrize("names", [[A], [A, Z, "new"], [Z, "other"]])
@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_second_step_on_different_names(kind: str, names: list[str]) -> None:
    opt, params = trained(kind)
    opt.first_step(params, valid_grads(params, 1))
    p2 = {k: params.get(k, np.ones(3)) for k in names}
    g2 = {k: np.ones(np.shape(v)) for k, v in p2.items()}
    check_error(opt, lambda: opt.second_step(p2, g2), p2, g2, OptimizerError,
                set(names) ^ {A, Z})
    # and still nothing lost: the right names complete the protocol normally
    opt.second_step(params, valid_grads(params, 3))
    assert not any(k.startswith("saved_") for k in opt.state_dict())


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_nonfinite_first_step_leaves_nothing_pending(kind: str) -> None:
    opt, params = trained(kind)
    grads = valid_grads(params)
    grads[A] = grads[A].copy()
    grads[A][1, 1] = np.nan
    check_error(opt, lambda: opt.first_step(params, grads), params, grads,
                NonFiniteGradientError, A)
    assert not any(k.startswith("saved_") for k in opt.state_dict())
    opt.first_step(params, valid_grads(params, 1))  # not "first_step twice"


@pytest.mark.parametrize("kind", ["sam", "asam"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_restore_after_nonfinite_second_step(kind: str, bad: float) -> None:
    opt, params = trained(kind)
    original = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    opt.first_step(params, valid_grads(params, 1))
    assert any(params[k].tobytes() != original[k].tobytes() for k in params)
    grads = valid_grads(params, 2)
    grads[Z] = grads[Z].copy()
    grads[Z][-1] = bad
    base_state = {k: v for k, v in R.state_snapshot(opt.state_dict()).items()
                  if not k.startswith("saved_")}
    try:
        opt.second_step(params, grads)
    except NonFiniteGradientError as e:
        assert e.key == Z
        opt.restore(params)
    else:
        pytest.fail("NaN/inf gradient accepted by second_step")
    for k in params:
        assert id(params[k]) == ids[k], "restore must write in place"
        assert params[k].tobytes() == original[k].tobytes(), f"{k!r} not restored bitwise"
    after = R.state_snapshot(opt.state_dict())
    assert not any(k.startswith("saved_") for k in after), "restore must drop the pending"
    assert after == base_state, "restore must not touch the base optimizer's state"
    opt.restore(params)  # nothing pending: a no-op
    for k in params:
        assert params[k].tobytes() == original[k].tobytes()
    opt.first_step(params, valid_grads(params, 3))
    opt.second_step(params, valid_grads(params, 4))


def test_restore_without_pending_is_noop() -> None:
    opt, params = trained("sam")
    before = {k: v.copy() for k, v in params.items()}
    s = R.state_snapshot(opt.state_dict())
    opt.restore(params)
    for k in params:
        assert params[k].tobytes() == before[k].tobytes()
    assert R.state_snapshot(opt.state_dict()) == s


# ----------------------------------------------------------------------------- configuration


BAD_CONFIG = [
    ("learning_rate", -0.1), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
    ("learning_rate", -float("inf")),
    ("momentum", -0.1), ("momentum", float("nan")),
    ("beta1", -0.1), ("beta1", 1.0), ("beta1", 1.5), ("beta1", float("nan")),
    ("beta2", -0.01), ("beta2", 1.0), ("beta2", float("nan")),
    ("epsilon", 0.0), ("epsilon", -1e-8), ("epsilon", float("nan")),
    ("weight_decay", -0.01), ("weight_decay", float("nan")),
    ("grad_clip", 0.0), ("grad_clip", -1.0), ("grad_clip", float("nan")),
]


@pytest.mark.parametrize("field,value", BAD_CONFIG)
def test_bad_config_value(field: str, value: float) -> None:
    with pytest.raises(OptimizerError) as ei:
        OptimizerConfig(**{field: value})
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, TrainError)
    assert ei.value.key == field
    assert field in str(ei.value)


@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.0), ("momentum", 0.0), ("beta1", 0.0), ("beta2", 0.0),
    ("weight_decay", 0.0), ("grad_clip", 1e-12), ("epsilon", 1e-30), ("beta2", 0.999999),
])
def test_boundary_config_values_accepted(field: str, value: float) -> None:
    cfg = OptimizerConfig(**{field: value})
    assert getattr(cfg, field) == value
    for cls in (SgdOptimizer, AdamOptimizer, AdamWOptimizer):
        p = {"w": np.ones(3)}
        cls(cfg).step(p, {"w": np.full(3, 0.5)})
        assert np.all(np.isfinite(p["w"]))


def test_config_is_frozen() -> None:
    cfg = OptimizerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), -float("inf")])
def test_bad_set_lr(kind: str, lr: float) -> None:
    opt, params = trained(kind)
    check_error(opt, lambda: opt.set_lr(lr), params, {}, OptimizerError,
                ("lr", "learning_rate"))
    if isinstance(opt, SamOptimizer):
        assert opt.base_optimizer.get_lr() == 0.05
    opt.set_lr(0.0)
    assert opt.get_lr() == 0.0
    assert float(opt.state_dict()["lr"]) == 0.0


@pytest.mark.parametrize("rho", [0.0, -0.05, float("nan"), float("inf"), -float("inf")])
def test_bad_rho(rho: float) -> None:
    with pytest.raises(OptimizerError) as ei:
        SamOptimizer(SgdOptimizer(), rho)
    assert ei.value.key == "rho" and "rho" in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("eta", [-0.01, float("nan")])
def test_bad_eta(eta: float) -> None:
    with pytest.raises(OptimizerError) as ei:
        SamOptimizer(SgdOptimizer(), 0.05, adaptive=True, eta=eta)
    assert ei.value.key == "eta" and "eta" in str(ei.value)


# ----------------------------------------------------------------------------- state dicts


def _corruptions(kind: str, state: dict[str, np.ndarray]) -> list[tuple[str, dict, Any]]:
    """(label, corrupt state, accepted keys) for a valid `state` of optimizer `kind`."""
    out: list[tuple[str, dict, Any]] = []

    def set_key(label: str, key: str, value: Any, keys: Any = None) -> None:
        s = {k: v.copy() for k, v in state.items()}
        if value is None:
            del s[key]
        else:
            s[key] = value
        out.append((label, s, keys or key))

    set_key("unknown", "bogus", np.zeros(2))
    set_key("unknown_param_prefix", "momentum_" + A, np.zeros((3, 4), np.float32))
    set_key("missing_lr", "lr", None)
    set_key("lr_negative", "lr", np.array(-0.1))
    set_key("lr_nan", "lr", np.array(np.nan))
    set_key("lr_inf", "lr", np.array(np.inf))
    set_key("lr_shape", "lr", np.array([0.1, 0.2]))
    base_kind = {"sam": "adam", "asam": "sgd"}.get(kind, kind)
    if base_kind == "sgd":
        set_key("velocity_nan", "velocity_" + A, np.full((3, 4), np.nan, np.float32))
        set_key("velocity_inf", "velocity_" + Z, np.full(5, -np.inf))
        set_key("adam_key_in_sgd", "m_" + Z, np.zeros(5))
        set_key("t_in_sgd", "t", np.array(3, np.int64))
    else:
        set_key("missing_t", "t", None)
        set_key("t_negative", "t", np.array(-1, np.int64))
        set_key("t_shape", "t", np.array([1, 2], np.int64))
        set_key("m_nan", "m_" + A, np.full((3, 4), np.nan, np.float32))
        set_key("v_inf", "v_" + Z, np.full(5, np.inf))
        set_key("v_negative", "v_" + Z, -np.ones(5))
        set_key("m_v_shapes_differ", "v_" + Z, np.ones(6), ("m_" + Z, "v_" + Z))
        set_key("sgd_key_in_adam", "velocity_" + Z, np.zeros(5))
    if kind in ("sam", "asam"):
        set_key("rho_zero", "rho", np.array(0.0))
        set_key("rho_negative", "rho", np.array(-0.1))
        set_key("rho_nan", "rho", np.array(np.nan))
        set_key("rho_inf", "rho", np.array(np.inf))
        set_key("saved_nan", "saved_" + Z, np.full(5, np.nan))
    else:
        set_key("rho_in_base", "rho", np.array(0.1))
        set_key("saved_in_base", "saved_" + Z, np.zeros(5))
    return out


def _all_corruption_ids() -> list[tuple[str, str]]:
    ids = []
    for kind in KINDS:
        opt, params = trained(kind)
        if kind in ("sam", "asam"):
            opt.first_step(params, valid_grads(params, 1))
        for label, _, _ in _corruptions(kind, opt.state_dict()):
            ids.append((kind, label))
    return ids


@pytest.mark.parametrize("kind,label", _all_corruption_ids(),
                         ids=[f"{k}-{lab}" for k, lab in _all_corruption_ids()])
@pytest.mark.parametrize("target", ["fresh", "trained"])
def test_corrupt_state_dict_rejected(kind: str, label: str, target: str) -> None:
    src, src_params = trained(kind)
    if kind in ("sam", "asam"):
        src.first_step(src_params, valid_grads(src_params, 1))  # includes saved_
    [(bad, keys)] = [(b, k) for lab, b, k in _corruptions(kind, src.state_dict())
                     if lab == label]
    opt = make_opt(kind) if target == "fresh" else trained(kind)[0]
    rho = getattr(opt, "rho", None)
    bad_snap = R.state_snapshot(bad)
    check_error(opt, lambda: opt.load_state_dict(bad), {}, {}, OptimizerError, keys)
    assert R.state_snapshot(bad) == bad_snap, "load_state_dict modified its argument"
    assert getattr(opt, "rho", None) == rho
    # the rejected load left a usable optimizer that still behaves as before
    p = valid_params()
    if isinstance(opt, SamOptimizer):
        opt.first_step(p, valid_grads(p, 7))
    opt.step(p, valid_grads(p, 8))
    assert all(np.all(np.isfinite(v)) for v in p.values()), label


@pytest.mark.parametrize("kind", KINDS)
def test_state_shape_mismatch_at_step(kind: str) -> None:
    """A loaded state whose per-parameter arrays do not fit the parameter's shape is an
    error at the next step, naming the parameter (or the state key); nothing changes."""
    src, _ = trained(kind)
    state = src.state_dict()
    opt = make_opt(kind)
    opt.load_state_dict(state)
    params = {A: np.ones((4, 3), np.float32), Z: np.ones(5)}  # A transposed
    grads = {A: np.ones((4, 3), np.float32), Z: np.ones(5)}
    allowed = (A, "velocity_" + A, "m_" + A, "v_" + A)
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    if isinstance(opt, SamOptimizer):
        # first_step does not touch the base state; the mismatch must surface no later
        # than second_step, and first_step's perturbation must then still be undoable
        try:
            opt.first_step(params, grads)
        except OptimizerError as e:
            assert e.key in allowed
            return
        check_error(opt, lambda: opt.second_step(params, grads), params, grads,
                    OptimizerError, allowed)
        return
    check_error(opt, lambda: call(params, grads), params, grads, OptimizerError, allowed)


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_saved_shape_mismatch_at_second_step(kind: str) -> None:
    src, src_params = trained(kind)
    src.first_step(src_params, valid_grads(src_params, 1))
    state = src.state_dict()
    opt = make_opt(kind)
    opt.load_state_dict(state)
    params = {A: np.ones((3, 4), np.float32), Z: np.ones(6)}  # Z has 6 now, saved has 5
    grads = {A: np.ones((3, 4), np.float32), Z: np.ones(6)}
    check_error(opt, lambda: opt.second_step(params, grads), params, grads, OptimizerError,
                (Z, "saved_" + Z, "m_" + Z, "v_" + Z, "velocity_" + Z))


def test_adam_state_into_sgd_rejected() -> None:
    src, _ = trained("adam")
    opt, _ = trained("sgd")
    keys = {k for k in src.state_dict() if k != "lr"}
    check_error(opt, lambda: opt.load_state_dict(src.state_dict()), {}, {}, OptimizerError,
                keys)
