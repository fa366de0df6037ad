"""Input edge cases of issue 12 (in-process):

- a writable parameter whose own elements overlap (zero or colliding strides) is refused
  with an OptimizerError naming it, by every optimizer's step and SAM's first_step, and
  nothing changes; a read-only self-overlapping GRADIENT is fine (the same result as the
  equivalent contiguous one), and so are non-overlapping exotic strides;
- NumPy floating scalars and Python floats are valid gradients of a 0-d parameter (the
  same result as a 0-d array of that dtype), for every optimizer, SAM/ASAM/GSAM's two
  phases, sam_step and compute_gradient_norm; lists, ints, bools, complex, integer NumPy
  scalars and objects stay refused, and so does a scalar for a parameter that is not 0-d;
- a class passed where an optimizer instance is expected is refused at construction;
- a lone-surrogate name is an OptimizerError naming it, not a UnicodeEncodeError;
- a pending state (between first_step and second_step) with a bad `saved_<name>` or
  `grad0_<name>` is refused whole by load_state_dict; the intact one loads and its
  second_step equals the original's bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import reference as R
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
    compute_gradient_norm,
)

A, Z = "a.first", "z.last"  # sorted before and after the names under test
CFG = OptimizerConfig(learning_rate=0.05)
KINDS = ["sgd", "adam", "adamw", "sam", "asam", "gsam"]
SAM_KINDS = ("sam", "asam", "gsam")
# (kind, phase): every optimizer's step (SAM's with nothing pending is a base step) and the
# first_step of each SAM variant
STEP_PHASES = [(k, "step") for k in KINDS] + [(k, "first_step") for k in SAM_KINDS]
PHASE_IDS = [f"{k}-{p}" for k, p in STEP_PHASES]


def make_opt(kind: str) -> Any:
    if kind == "sgd":
        return SgdOptimizer(CFG)
    if kind == "adam":
        return AdamOptimizer(CFG)
    if kind == "adamw":
        return AdamWOptimizer(CFG)
    if kind == "sam":
        return SamOptimizer(AdamOptimizer(CFG), rho=0.1)
    if kind == "asam":
        return SamOptimizer(SgdOptimizer(CFG), rho=0.1, adaptive=True, eta=0.01)
    return GsamOptimizer(AdamOptimizer(CFG), rho_max=0.1, alpha=0.4)


def rand_like(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.standard_normal(np.shape(v)), dtype=np.asarray(v).dtype)
            for k, v in params.items()}


def full_step(opt: Any, params: dict[str, np.ndarray], seed: int) -> None:
    if isinstance(opt, SamOptimizer):
        opt.first_step(params, rand_like(params, seed + 1000))
    opt.step(params, rand_like(params, seed))


def trained(kind: str, params: dict[str, np.ndarray], steps: int = 2) -> Any:
    """An optimizer that has state for every name of `params` (steps on copies)."""
    opt = make_opt(kind)
    work = {k: np.array(v, copy=True) for k, v in params.items()}
    for s in range(steps):
        full_step(opt, work, s)
    return opt


def check_refused(opt: Any, call: Callable[[], Any], arrays: dict[str, Any], key: str,
                  exc: type = OptimizerError) -> BaseException:
    """`call()` raises `exc` (a TrainError, not a NonFiniteGradientError) whose .key is
    `key`; every array of `arrays` (params, grads, backing buffers), the optimizer's
    state_dict and pending are bitwise unchanged."""
    snap = R.snapshot(arrays)
    state = R.state_snapshot(opt.state_dict())
    pending = getattr(opt, "pending", None)
    try:
        call()
    except exc as e:
        err: BaseException = e
    except BaseException as e:  # UnicodeEncodeError, TypeError, pyo3's PanicException...
        pytest.fail(f"expected {exc.__name__} naming {key!r}, got "
                    f"{type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail(f"expected {exc.__name__} naming {key!r}, nothing raised")
    assert isinstance(err, TrainError)
    assert not isinstance(err, NonFiniteGradientError), repr(err)
    assert err.key == key, f".key is {err.key!r}, expected {key!r}: {err}"
    assert str(err)
    R.assert_same_snapshot(snap, R.snapshot(arrays), "arrays")
    assert R.state_snapshot(opt.state_dict()) == state, "optimizer state changed"
    assert getattr(opt, "pending", None) == pending
    return err


def assert_same_arrays(x: dict[str, Any], y: dict[str, Any], what: str = "") -> None:
    assert x.keys() == y.keys(), what
    for k in x:
        a, b = np.asarray(x[k]), np.asarray(y[k])
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {k!r}: {a.dtype}{a.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), (
            f"{what} {k!r} differs")


# ----------------------------------------------------------------------------- overlap


def _zero_stride_1d() -> tuple[np.ndarray, np.ndarray]:
    base = np.linspace(0.5, 2.5, 5)
    return as_strided(base, (4,), (0,), writeable=True), base


def _colliding_2d() -> tuple[np.ndarray, np.ndarray]:
    base = np.linspace(-1.0, 1.0, 5)  # element (i, j) at offset i + j: 3x3 over 5 values
    return as_strided(base, (3, 3), (8, 8), writeable=True), base


def _zero_stride_rows_f32() -> tuple[np.ndarray, np.ndarray]:
    base = np.linspace(-1.0, 1.0, 3, dtype=np.float32)
    return as_strided(base, (2, 3), (0, 4), writeable=True), base


def _zero_stride_inner_f32() -> tuple[np.ndarray, np.ndarray]:
    base = np.linspace(-1.0, 1.0, 4, dtype=np.float32)
    return as_strided(base, (4, 2), (4, 0), writeable=True), base


OVERLAPPING = [_zero_stride_1d, _colliding_2d, _zero_stride_rows_f32, _zero_stride_inner_f32]


@pytest.mark.parametrize("make", OVERLAPPING, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind,phase", STEP_PHASES, ids=PHASE_IDS)
def test_self_overlapping_writable_param_refused(kind: str, phase: str,
                                                 make: Callable) -> None:
    view, base = make()
    assert view.flags.writeable
    w = "overlap.w"
    normal = {A: np.linspace(-1.0, 2.0, 6, dtype=np.float32).reshape(2, 3),
              w: np.array(view, copy=True), Z: np.linspace(0.5, -3.0, 5)}
    opt = trained(kind, normal)  # it has state for w (and A, Z): none of it may change
    params = dict(normal, **{w: view})
    grads = rand_like(params, 7)
    check_refused(opt, lambda: getattr(opt, phase)(params, grads),
                  {"base": base, **params, **{"grad " + k: v for k, v in grads.items()}}, w)
    if isinstance(opt, SamOptimizer):
        assert not opt.pending


@pytest.mark.parametrize("kind", ["sgd", "sam"])
def test_self_overlapping_param_refused_on_fresh_optimizer(kind: str) -> None:
    """No state is created for any parameter by the refused call."""
    view, base = _zero_stride_1d()
    opt = make_opt(kind)
    params = {A: np.ones(3), "w": view}
    grads = {A: np.ones(3), "w": np.ones(4)}
    call = opt.first_step if isinstance(opt, SamOptimizer) else opt.step
    check_refused(opt, lambda: call(params, grads), {"base": base, **params}, "w")


def test_self_overlapping_param_refused_by_sam_step() -> None:
    view, base = _colliding_2d()
    opt = make_opt("sam")
    params = {"w": view}
    check_refused(opt, lambda: opt.sam_step(params, lambda p: (0.0, {"w": np.ones((3, 3))})),
                  {"base": base}, "w")


def _broadcast_grad(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    g = np.broadcast_to(np.float64(1.0), shape)
    return g, np.ones(shape)


def _colliding_grad(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    size = int(np.prod(shape))
    base = np.linspace(-1.0, 1.0, size + 2)
    g = as_strided(base, shape, (8,) * len(shape), writeable=False)  # rows overlap
    return g, np.array(g, copy=True)


@pytest.mark.parametrize("make_grad", [_broadcast_grad, _colliding_grad],
                         ids=["broadcast", "colliding"])
@pytest.mark.parametrize("pdtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_read_only_self_overlapping_gradient_accepted(kind: str, pdtype: Any,
                                                      make_grad: Callable) -> None:
    shape = (3, 4)
    g_view, g_plain = make_grad(shape)
    assert not g_view.flags.writeable
    start = {A: np.linspace(-1.0, 1.0, 5), "w": np.linspace(-2.0, 2.0, 12).reshape(shape)
             .astype(pdtype)}
    opt, twin = trained(kind, start), trained(kind, start)
    params = {k: v.copy() for k, v in start.items()}
    twin_params = {k: v.copy() for k, v in start.items()}
    other = rand_like(start, 3)
    for phase in (("first_step", "second_step") if kind in SAM_KINDS else ("step",)):
        getattr(opt, phase)(params, dict(other, w=g_view))
        getattr(twin, phase)(twin_params, dict(other, w=g_plain))
        assert_same_arrays(params, twin_params, phase)
        assert_same_arrays(opt.state_dict(), twin.state_dict(), phase)
    assert np.any(params["w"] != start["w"])
    assert compute_gradient_norm({"w": g_view}) == compute_gradient_norm({"w": g_plain})


def _exotic_f64() -> tuple[np.ndarray, np.ndarray, list[int]]:
    base = np.linspace(-1.0, 1.0, 8)
    # element (i, j) at byte 16i + 24j: offsets 0, 3, 2, 5, 4, 7 (in elements), all distinct
    return as_strided(base, (3, 2), (16, 24), writeable=True), base, [1, 6]


def _exotic_f32() -> tuple[np.ndarray, np.ndarray, list[int]]:
    base = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    return as_strided(base, (3, 2), (8, 12), writeable=True), base, [1, 6]


def _exotic_3d() -> tuple[np.ndarray, np.ndarray, list[int]]:
    base = np.linspace(-1.0, 1.0, 12)
    # (i, j, k) at element 6i + j + 3k: every element of `base` once, in a shuffled order
    view = as_strided(base, (2, 3, 2), (48, 8, 24), writeable=True)
    return view, base, []


@pytest.mark.parametrize("make", [_exotic_f64, _exotic_f32, _exotic_3d],
                         ids=["f64_3x2", "f32_3x2", "f64_2x3x2"])
@pytest.mark.parametrize("kind", KINDS)
def test_non_overlapping_exotic_strides_accepted(kind: str, make: Callable) -> None:
    view, base, outside = make()
    offsets = {sum(i * s for i, s in zip(idx, view.strides)) for idx in np.ndindex(view.shape)}
    assert len(offsets) == view.size, "test setup: the elements must not overlap"
    start = {A: np.linspace(-1.0, 1.0, 5), "w": np.array(view, copy=True)}
    opt, twin = trained(kind, start), trained(kind, start)
    params = {A: start[A].copy(), "w": view}
    twin_params = {k: v.copy() for k, v in start.items()}
    outside_before = base[outside].copy()
    for s in range(3):
        full_step(opt, params, 10 + s)
        full_step(twin, twin_params, 10 + s)
        assert params["w"] is view
        assert_same_arrays(params, twin_params, f"step {s}")
        assert_same_arrays(opt.state_dict(), twin.state_dict(), f"step {s}")
    assert np.any(view != start["w"])
    assert base[outside].tobytes() == outside_before.tobytes(), "wrote outside the view"


@st.composite
def strided_views(draw: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A writable as_strided view over a buffer — any shape up to 3-D (size-0 and size-1
    dimensions too), strides of -3..3 elements — and the buffer index of each element."""
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    steps = draw(st.lists(st.integers(-3, 3), min_size=ndim, max_size=ndim))
    lo = sum(min(0, (n - 1) * k) for n, k in zip(shape, steps) if n)
    hi = sum(max(0, (n - 1) * k) for n, k in zip(shape, steps) if n)
    base = np.linspace(-1.0, 1.0, hi - lo + 3).astype(dtype)
    first = 1 - lo  # one spare element on each side
    view = as_strided(base[first:], shape, tuple(k * dtype.itemsize for k in steps),
                      writeable=True)
    where = [first + sum(i * k for i, k in zip(idx, steps)) for idx in np.ndindex(shape)]
    return view, base, where


@given(case=strided_views(), phase=st.sampled_from(["sgd-step", "sam-first_step"]))
def test_overlap_verdict_matches_brute_force(case: tuple[np.ndarray, np.ndarray, list[int]],
                                             phase: str) -> None:
    """Refused exactly when two elements share memory (brute force over every index);
    otherwise updated like a contiguous copy, and nothing outside the view is written."""
    view, base, where = case
    kind, method = phase.split("-")
    opt, twin = make_opt(kind), make_opt(kind)
    grads = {"w": np.linspace(0.5, 1.5, view.size).reshape(view.shape).astype(view.dtype),
             A: np.ones(2)}
    params = {"w": view, A: np.zeros(2)}
    if len(set(where)) < len(where):
        check_refused(opt, lambda: getattr(opt, method)(params, grads),
                      {"base": base, **params}, "w")
        return
    twin_params = {"w": np.array(view, copy=True), A: np.zeros(2)}
    before = base.copy()
    getattr(opt, method)(params, grads)
    getattr(twin, method)(twin_params, grads)
    assert_same_arrays(params, twin_params)
    assert_same_arrays(opt.state_dict(), twin.state_dict())
    outside = np.ones(base.size, bool)
    outside[where] = False
    assert base[outside].tobytes() == before[outside].tobytes(), "wrote outside the view"


# ----------------------------------------------------------------------------- scalars

V = 0.1  # not exact in float16 or float32: the conversion shows
SCALARS = {
    "np_float64": (lambda: np.float64(V), np.float64),
    "np_float32": (lambda: np.float32(V), np.float32),
    "np_float16": (lambda: np.float16(V), np.float16),
    "python_float": (lambda: V, np.float64),
}
REFUSED = {
    "list": lambda: [V],
    "python_int": lambda: 1,
    "bool": lambda: True,
    "np_bool": lambda: np.bool_(True),
    "complex": lambda: 1 + 0j,
    "np_int64": lambda: np.int64(1),
    "np_complex128": lambda: np.complex128(1),
    "object": lambda: object(),
}
B = "bias"


def scalar_start(pdtype: Any) -> dict[str, np.ndarray]:
    return {A: np.linspace(-1.0, 1.0, 4), B: np.array(0.25, dtype=pdtype),
            Z: np.linspace(2.0, -1.0, 3).astype(np.float32)}


def grads_with(bias_grad: Any, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {A: rng.standard_normal(4), B: bias_grad,
            Z: rng.standard_normal(3).astype(np.float32)}


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("pdtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_scalar_gradient_for_0d_param(kind: str, pdtype: Any, scalar: str) -> None:
    make_scalar, sdtype = SCALARS[scalar]
    start = scalar_start(pdtype)
    opt, twin = trained(kind, start), trained(kind, start)
    params = {k: v.copy() for k, v in start.items()}
    twin_params = {k: v.copy() for k, v in start.items()}
    phases = ("first_step", "second_step") if kind in SAM_KINDS else ("step",)
    for s in range(2):
        for i, phase in enumerate(phases):
            g = grads_with(make_scalar(), 10 * s + i)
            g_twin = grads_with(np.array(make_scalar(), dtype=sdtype), 10 * s + i)
            assert np.asarray(g[B]).dtype == np.asarray(g_twin[B]).dtype
            try:
                getattr(opt, phase)(params, g)
            except BaseException as e:
                pytest.fail(f"{phase} refused a {scalar} gradient for a 0-d parameter: "
                            f"{type(e).__name__}: {e}")
            getattr(twin, phase)(twin_params, g_twin)
            assert params[B].shape == () and params[B].dtype == pdtype
            assert_same_arrays(params, twin_params, f"{phase} {s}")
            assert_same_arrays(opt.state_dict(), twin.state_dict(), f"{phase} {s}")
    assert params[B] != start[B]


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("kind", ["sgd", "gsam"])
def test_scalar_gradient_from_grad_fn(kind: str, scalar: str) -> None:
    """`2 * r.mean()` is a NumPy scalar: a grad_fn returning it works with sam_step."""
    make_scalar, sdtype = SCALARS[scalar]
    base = SgdOptimizer(CFG) if kind == "sgd" else AdamOptimizer(CFG)
    twin_base = SgdOptimizer(CFG) if kind == "sgd" else AdamOptimizer(CFG)
    cls = SamOptimizer if kind == "sgd" else GsamOptimizer
    opt, twin = cls(base, 0.1), cls(twin_base, 0.1)
    params, twin_params = scalar_start(np.float64), scalar_start(np.float64)

    def grad_fn(wrap: Callable[[Any], Any]) -> Callable:
        def fn(p: dict[str, np.ndarray]) -> tuple[float, dict[str, Any]]:
            r = p[A] - 0.5
            g = {A: 2 * r, B: wrap(type(make_scalar())(2 * float(p[B]) + V)),
                 Z: np.ones(3, np.float32)}
            return float(r @ r), g
        return fn

    for _ in range(3):
        loss = opt.sam_step(params, grad_fn(lambda x: x))
        twin_loss = twin.sam_step(twin_params, grad_fn(lambda x: np.array(x, dtype=sdtype)))
        assert loss == twin_loss
        assert_same_arrays(params, twin_params)
        assert_same_arrays(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("scalar", list(SCALARS))
def test_scalar_gradient_norm(scalar: str) -> None:
    make_scalar, sdtype = SCALARS[scalar]
    rest = {"w": np.array([3.0, 4.0])}
    got = compute_gradient_norm({B: make_scalar(), **rest})
    want = compute_gradient_norm({B: np.array(make_scalar(), dtype=sdtype), **rest})
    assert got == want
    assert compute_gradient_norm({B: make_scalar()}) == abs(float(np.asarray(make_scalar())))


REFUSE_PHASES = [(k, "step") for k in ("sgd", "adam", "adamw")] + [
    (k, p) for k in SAM_KINDS for p in ("first_step", "second_step")]


@pytest.mark.parametrize("bad", list(REFUSED))
@pytest.mark.parametrize("kind,phase", REFUSE_PHASES, ids=[f"{k}-{p}" for k, p in REFUSE_PHASES])
def test_non_float_scalar_gradient_refused(kind: str, phase: str, bad: str) -> None:
    start = scalar_start(np.float64)
    opt = trained(kind, start)
    params = {k: v.copy() for k, v in start.items()}
    if phase == "second_step":
        opt.first_step(params, grads_with(np.array(V), 1))
        assert opt.pending
    grads = grads_with(REFUSED[bad](), 2)
    check_refused(opt, lambda: getattr(opt, phase)(params, grads), params, B)


@pytest.mark.parametrize("bad", list(REFUSED))
def test_non_float_scalar_gradient_refused_by_norm(bad: str) -> None:
    with pytest.raises(OptimizerError) as ei:
        compute_gradient_norm({"w": np.ones(2), B: REFUSED[bad]()})
    assert ei.value.key == B


@pytest.mark.parametrize("scalar", ["np_float64", "np_float32", "python_float"])
@pytest.mark.parametrize("kind,phase", STEP_PHASES, ids=PHASE_IDS)
def test_scalar_gradient_for_non_0d_param_refused(kind: str, phase: str, scalar: str) -> None:
    """A scalar is a gradient of shape (): for a parameter of shape (4,) a shape error (it
    must not broadcast)."""
    start = scalar_start(np.float64)
    opt = trained(kind, start)
    params = {k: v.copy() for k, v in start.items()}
    grads = grads_with(np.array(V), 3)
    grads[A] = SCALARS[scalar][0]()
    err = check_refused(opt, lambda: getattr(opt, phase)(params, grads), params, A)
    assert "shape" in str(err), f"not reported as a shape mismatch: {err}"


# ----------------------------------------------------------------------------- classes


class PyMomentum:
    """A base optimizer written in Python (the Optimizer protocol)."""

    def __init__(self) -> None:
        self.lr = 0.05

    def step(self, params: Any, grads: Any) -> None:
        for k, p in params.items():
            p -= self.lr * np.asarray(grads[k], dtype=p.dtype)

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


CLASS_CASES: dict[str, Callable[[], Any]] = {
    "sam_sgd_class": lambda: SamOptimizer(SgdOptimizer),
    "sam_adam_class": lambda: SamOptimizer(AdamOptimizer, 0.1),
    "asam_adamw_class": lambda: SamOptimizer(AdamWOptimizer, 0.1, adaptive=True),
    "sam_python_class": lambda: SamOptimizer(PyMomentum),
    "gsam_adam_class": lambda: GsamOptimizer(AdamOptimizer),
    "gsam_sgd_class": lambda: GsamOptimizer(SgdOptimizer, 0.1, 0.01),
}


@pytest.mark.parametrize("case", list(CLASS_CASES))
def test_optimizer_class_as_base_refused(case: str) -> None:
    try:
        CLASS_CASES[case]()
    except OptimizerError as e:
        assert isinstance(e, TrainError)
        assert e.key == "base_optimizer", e.key
        assert "base_optimizer" in str(e)
    except BaseException as e:
        pytest.fail(f"expected OptimizerError for base_optimizer, got "
                    f"{type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail("a class was accepted as base_optimizer")


def test_python_optimizer_instance_still_accepted() -> None:
    sam = SamOptimizer(PyMomentum(), 0.1)
    p = {"w": np.ones(3)}
    sam.first_step(p, {"w": np.ones(3)})
    sam.second_step(p, {"w": np.ones(3)})
    assert np.all(p["w"] == 0.95)


# ----------------------------------------------------------------------------- surrogates

SURROGATES = ["\ud800", "layer\udcff.w"]


@pytest.mark.parametrize("name", SURROGATES, ids=["lone_high", "lone_low_inside"])
@pytest.mark.parametrize("kind,phase", STEP_PHASES, ids=PHASE_IDS)
def test_lone_surrogate_param_name(kind: str, phase: str, name: str) -> None:
    start = {A: np.linspace(-1.0, 1.0, 4), Z: np.linspace(0.0, 1.0, 3)}
    opt = trained(kind, start)
    params = {A: start[A].copy(), name: np.linspace(1.0, 2.0, 3), Z: start[Z].copy()}
    grads = rand_like(params, 4)
    err = check_refused(opt, lambda: getattr(opt, phase)(params, grads),
                        {**params, **{"grad " + k: v for k, v in grads.items()}}, name)
    assert not isinstance(err, UnicodeError)


@pytest.mark.parametrize("name", SURROGATES, ids=["lone_high", "lone_low_inside"])
def test_lone_surrogate_in_gradient_norm(name: str) -> None:
    grads = {"w": np.ones(2), name: np.ones(2)}
    try:
        compute_gradient_norm(grads)
    except OptimizerError as e:
        assert e.key == name
        assert not isinstance(e, UnicodeError)
    except BaseException as e:
        pytest.fail(f"expected OptimizerError, got {type(e).__module__}.{type(e).__name__}")
    else:
        pytest.fail("a lone-surrogate name was accepted")


def test_lone_surrogate_refused_by_sam_step() -> None:
    opt = make_opt("sam")
    params = {"\ud800": np.ones(3)}
    check_refused(opt, lambda: opt.sam_step(params, lambda p: (0.0, {"\ud800": np.ones(3)})),
                  params, "\ud800")


# ----------------------------------------------------------------------------- pending state

W, H = "w", "h"


def fresh_sam(kind: str) -> Any:
    if kind == "sam-adam":
        return SamOptimizer(AdamOptimizer(CFG), 0.1)
    if kind == "sam-sgd":
        return SamOptimizer(SgdOptimizer(CFG), 0.1)
    return GsamOptimizer(AdamOptimizer(CFG), 0.1)


def pending_setup(kind: str) -> tuple[Any, dict[str, np.ndarray]]:
    """A SAM/GSAM optimizer after three full steps (the base has state for every parameter)
    and a first_step (pending), and its perturbed params."""
    opt = fresh_sam(kind)
    params = {W: np.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": np.linspace(0.5, 2.5, 5),
              H: np.linspace(1.0, -1.0, 6, dtype=np.float32).reshape(2, 3)}
    for s in range(3):
        full_step(opt, params, s)
    opt.first_step(params, rand_like(params, 50))
    assert opt.pending
    return opt, params


def _set(key: str, value: Callable[[dict], Any]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = value(state)
    return edit


def _ghost(keys: tuple[str, ...]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        for k in keys:
            state[k + "ghost"] = np.zeros(3)
    return edit


# label -> (kinds, edit, accepted keys)
PENDING_CORRUPTIONS: dict[str, tuple[tuple[str, ...], Callable[[dict], None], set[str]]] = {
    "saved_w_float32": (("sam-adam", "sam-sgd", "gsam"),
                        _set("saved_" + W, lambda s: s["saved_" + W].astype(np.float32)),
                        {"saved_" + W}),
    "saved_h_float64": (("sam-adam", "sam-sgd", "gsam"),
                        _set("saved_" + H, lambda s: s["saved_" + H].astype(np.float64)),
                        {"saved_" + H}),
    "saved_w_transposed": (("sam-adam", "sam-sgd", "gsam"),
                           _set("saved_" + W, lambda s: s["saved_" + W].T.copy()),
                           {"saved_" + W}),
    "saved_w_flat": (("sam-adam", "sam-sgd", "gsam"),
                     _set("saved_" + W, lambda s: s["saved_" + W].ravel()), {"saved_" + W}),
    "saved_ghost": (("sam-adam", "sam-sgd"), _ghost(("saved_",)), {"saved_ghost"}),
    "saved_and_grad0_ghost": (("gsam",), _ghost(("saved_", "grad0_")),
                              {"saved_ghost", "grad0_ghost"}),
    "grad0_w_float32": (("gsam",),
                        _set("grad0_" + W, lambda s: s["grad0_" + W].astype(np.float32)),
                        {"grad0_" + W}),
    "grad0_w_shape": (("gsam",), _set("grad0_" + W, lambda s: s["grad0_" + W].T.copy()),
                      {"grad0_" + W}),
}
PENDING_CASES = [(kind, label) for label, (kinds, _, _) in PENDING_CORRUPTIONS.items()
                 for kind in kinds]


@pytest.mark.parametrize("kind,label", PENDING_CASES,
                         ids=[f"{k}-{lab}" for k, lab in PENDING_CASES])
def test_corrupt_pending_state_refused_whole(kind: str, label: str) -> None:
    src, _ = pending_setup(kind)
    state = src.state_dict()
    _, edit, keys = PENDING_CORRUPTIONS[label]
    edit(state)
    opt = fresh_sam(kind)
    before = R.state_snapshot(opt.state_dict())
    bad_before = R.state_snapshot(state)
    try:
        opt.load_state_dict(state)
    except OptimizerError as e:
        assert not isinstance(e, NonFiniteGradientError)
        assert e.key in keys, f".key is {e.key!r}, expected one of {sorted(keys)}: {e}"
    except BaseException as e:
        pytest.fail(f"expected OptimizerError, got {type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail(f"{label}: the corrupt pending state was loaded (pending={opt.pending})")
    assert R.state_snapshot(opt.state_dict()) == before, "the refused load changed the state"
    assert not opt.pending
    assert R.state_snapshot(state) == bad_before, "load_state_dict modified its argument"


@pytest.mark.parametrize("kind", ["sam-adam", "sam-sgd", "gsam"])
def test_intact_pending_state_loads_and_second_step_matches(kind: str) -> None:
    src, params = pending_setup(kind)
    state = src.state_dict()
    opt = fresh_sam(kind)
    opt.load_state_dict(state)
    assert opt.pending
    assert R.state_snapshot(opt.state_dict()) == R.state_snapshot(state)
    loaded_params = {k: v.copy() for k, v in params.items()}
    grads = rand_like(params, 60)
    src.second_step(params, grads)
    opt.second_step(loaded_params, grads)
    assert_same_arrays(params, loaded_params)
    assert_same_arrays(src.state_dict(), opt.state_dict())
    assert not opt.pending


@pytest.mark.parametrize("kind", ["sam-adam", "sam-sgd", "gsam"])
def test_pending_state_of_the_very_first_step_loads(kind: str) -> None:
    """A first_step before any base step: the base has no state yet, the pending saved_
    values are valid all the same (they must not be taken for names "with no state")."""
    src = fresh_sam(kind)
    params = {W: np.linspace(-1.0, 1.0, 12).reshape(3, 4),
              H: np.linspace(1.0, -1.0, 6, dtype=np.float32).reshape(2, 3)}
    src.first_step(params, rand_like(params, 1))
    opt = fresh_sam(kind)
    opt.load_state_dict(src.state_dict())
    assert opt.pending
    loaded_params = {k: v.copy() for k, v in params.items()}
    grads = rand_like(params, 2)
    src.second_step(params, grads)
    opt.second_step(loaded_params, grads)
    assert_same_arrays(params, loaded_params)
    assert_same_arrays(src.state_dict(), opt.state_dict())
