"""Bad input, fuzzed (issue 5, point 3).

Hypothesis builds a random optimizer (SGD, Adam, AdamW, SAM and adaptive SAM over each,
GsamOptimizer; the SAM family over a native or a Python-written base) and a pool of
parameters (float32/float64, 0-d, size-0, F-ordered, strided, reversed and transposed
views), then throws a random sequence of calls at it — step, first_step, second_step,
sam_step, restore, zero_grad, compute_gradient_norm, load_state_dict, set_lr and the rho
setter — each with a random mix of defects: wrong dtypes (int, bool, complex, float16,
longdouble, object), mismatched and broadcastable shapes, NaN/inf (also by float64→float32
overflow), missing and extra (also garbage) keys, non-str keys, read-only, non-contiguous,
byte-swapped, unaligned and 0-d arrays, empty dicts, lists, scalars and None instead of
arrays or dicts, the same array under two names, a gradient that is its own (or another)
parameter, corrupt and foreign state dicts, and the calls in any order (first_step twice,
second_step/restore on other names, sam_step while a first_step is pending, ...).

The expected outcome of every call is predicted from SPEC.md, independently of samopt: it
must succeed, must raise, or (for inputs SPEC leaves open: byte-swapped or unaligned
arrays, a gradient that views its parameter's memory) may do either. Then:
- a call that succeeds must match the float64 reference of tests/reference.py (the
  reference is re-synchronised to samopt's values after every call, so each call is
  checked on its own from identical values), leave every array it was not given untouched,
  and restore() must be bitwise exact;
- a call that raises must raise a TrainError (NonFiniteGradientError when the only defect
  is a non-finite gradient) whose .key names an offending key, with params, grads and the
  optimizer's state bitwise unchanged;
- anything else — a pyo3 PanicException (a BaseException), a TypeError, ... — fails.

The number of cases is printed in the terminal summary ("samopt fuzz: ..."). The default
size runs in about a minute; SAMOPT_FUZZ_EXAMPLES=<n> (examples per test) makes it a soak.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
    compute_gradient_norm,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::numpy.exceptions.ComplexWarning")

_SOAK = int(os.environ.get("SAMOPT_FUZZ_EXAMPLES", "0"))
TRACE = bool(os.environ.get("SAMOPT_FUZZ_TRACE"))  # print every call (to debug a failure)
SEQUENCE_EXAMPLES = _SOAK or 4000
CONSTRUCTOR_EXAMPLES = _SOAK or 2000
MAX_CALLS = 14

ANY = object()  # an error whose .key is not predicted (container-level defects)

# ----------------------------------------------------------------------------- counting

COUNTS: Counter[str] = Counter()
DEFECTS: Counter[str] = Counter()
SECONDS = [0.0]


class _FuzzReport:
    """Writes the case counts into pytest's terminal summary (whatever -s/-q)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not COUNTS:
            return
        calls = sum(v for k, v in COUNTS.items() if k.startswith("call:"))
        ok = sum(v for k, v in COUNTS.items() if k.startswith("call:") and k.endswith(":ok"))
        terminalreporter.write_sep("-", "samopt fuzz")
        terminalreporter.write_line(
            f"samopt fuzz: {COUNTS['examples']} call sequences, {calls} calls "
            f"({ok} succeeded and matched the reference, {calls - ok} raised and changed "
            f"nothing), {COUNTS['constructors']} constructor/config cases, "
            f"{sum(DEFECTS.values())} injected defects of {len(DEFECTS)} kinds, "
            f"in {SECONDS[0]:.1f} s")
        per_call = sorted((k[5:], v) for k, v in COUNTS.items() if k.startswith("call:"))
        terminalreporter.write_line("  by call: " + ", ".join(f"{k}={v}" for k, v in per_call))


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    manager = request.config.pluginmanager
    if manager.get_plugin("samopt-fuzz-report") is None:
        manager.register(_FuzzReport(), "samopt-fuzz-report")
    start = time.perf_counter()
    yield
    SECONDS[0] += time.perf_counter() - start


# ----------------------------------------------------------------------------- expectations


class Expect:
    """What SPEC says a call must do: the outcomes allowed ("ok", "train", "user"), and the
    keys an error may name."""

    def __init__(self) -> None:
        self.fail: list[tuple[Any, bool, str]] = []  # (key, non-finite?, why)
        self.maybe: list[tuple[Any, str]] = []
        self.user = False  # the user's grad_fn raises
        self.forced: set[str] | None = None  # allowed outcomes, when set explicitly

    def must_fail(self, key: Any, why: str, nonfinite: bool = False) -> None:
        self.fail.append((key, nonfinite, why))

    def may_fail(self, key: Any, why: str) -> None:
        self.maybe.append((key, why))

    @property
    def allowed(self) -> set[str]:
        if self.forced is not None:
            return self.forced
        out = set()
        if self.fail:
            out.add("train")
        elif self.maybe:
            out |= {"train", "ok"}
        else:
            out.add("ok")
        if self.user:
            out.add("user")
        return out

    def keys(self) -> set[Any]:
        return {k for k, _, _ in self.fail} | {k for k, _ in self.maybe}

    def why(self) -> str:
        return "; ".join([w for _, _, w in self.fail] + [f"(maybe) {w}" for _, w in self.maybe])


def _flatten_key(key: Any) -> set[Any]:
    return set(key) if isinstance(key, tuple) else {key}


def check_error(e: BaseException, expect: Expect, label: str) -> None:
    assert isinstance(e, TrainError)
    keys: set[Any] = set()
    for k in expect.keys():
        keys |= _flatten_key(k)
    exact = expect.forced is None and not expect.maybe
    if exact and expect.fail and all(nf for _, nf, _ in expect.fail):
        assert isinstance(e, NonFiniteGradientError), (
            f"{label}: only non-finite gradients ({expect.why()}), got {e!r}")
    if exact and expect.fail and not any(nf for _, nf, _ in expect.fail):
        assert not isinstance(e, NonFiniteGradientError), f"{label}: {e!r} ({expect.why()})"
    if ANY in keys or not keys:
        return
    assert e.key in keys, f"{label}: error names {e.key!r}, expected one of {keys}: {e}"


# ----------------------------------------------------------------------------- snapshots


def freeze(obj: Any, depth: int = 0) -> Any:
    """A bitwise, identity-aware snapshot of (nested) call arguments."""
    if isinstance(obj, np.ndarray):
        data = repr(obj.tolist()) if obj.dtype == object else np.ascontiguousarray(obj).tobytes()
        return ("nd", id(obj), obj.dtype.str, obj.shape, obj.flags.writeable, data)
    if depth > 3:
        return ("obj", id(obj))
    if isinstance(obj, Mapping):
        return ("map", id(obj), tuple((repr(k), freeze(v, depth + 1)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("seq", id(obj), tuple(freeze(v, depth + 1) for v in obj))
    return ("obj", id(obj), repr(obj))


def owner(a: np.ndarray) -> Any:
    """The object that owns an array's memory (the end of its .base chain)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def tied(a: np.ndarray, b: np.ndarray) -> bool:
    """Views of one buffer that share no element only because one is empty: whether
    samopt calls that sharing is open (SPEC speaks of shared memory, not elements)."""
    return (a.size == 0 or b.size == 0) and owner(a) is owner(b)


def values_of(a: np.ndarray) -> np.ndarray:
    return np.array(a, dtype=np.float64, copy=True)


def native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


def is_float_param(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype.itemsize in (4, 8)


def is_float_grad(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype.itemsize in (2, 4, 8)


def as_grad(v: Any) -> Any:
    """A gradient as SPEC reads it: a NumPy floating scalar or a Python float is a 0-d
    array (arithmetic on 0-d arrays returns scalars); anything else as it is."""
    return np.asarray(v) if isinstance(v, (float, np.floating)) else v


# ----------------------------------------------------------------------------- references


class Foreign:
    """A base optimizer written in Python (delegating to a samopt one), so that SAM takes
    its generic path: swap-restore, a Python base step, materialised GSAM gradients."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def step(self, params: Any, grads: Any) -> None:
        self.inner.step(params, grads)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def get_lr(self) -> float:
        return float(self.inner.get_lr())

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


BASE_PREFIXES = {"sgd": ("velocity_",), "adam": ("m_", "v_"), "adamw": ("m_", "v_")}


class World:
    """One optimizer, its reference, and the caller's parameter pool."""

    def __init__(self, kind: str, base_kind: str, foreign: bool, cfg: dict[str, Any],
                 sam: dict[str, Any], pool: dict[str, R.Holder], rng: np.random.Generator):
        self.kind, self.base_kind, self.foreign = kind, base_kind, foreign
        self.is_sam = kind in ("sam", "asam", "gsam")
        self.rng = rng
        self.holders = list(pool.values())
        self.pool: dict[str, np.ndarray] = {k: h.array for k, h in pool.items()}
        config = OptimizerConfig(
            learning_rate=cfg["lr"], momentum=cfg["momentum"], beta1=cfg["beta1"],
            beta2=cfg["beta2"], epsilon=cfg["eps"], weight_decay=cfg["wd"],
            grad_clip=cfg["clip"],
            grad_clip_mode=GradClipMode.NORM if cfg["mode"] == "norm" else GradClipMode.VALUE)
        mode = cfg["mode"] or "value"
        base: Any
        if base_kind == "sgd":
            base = SgdOptimizer(config)
            self.ref_base: Any = R.RefSGD(cfg["lr"], cfg["momentum"], cfg["clip"], mode,
                                         weight_decay=cfg["wd"] or 0.0)
        elif base_kind == "adam":
            base = AdamOptimizer(config)
            self.ref_base = R.RefAdam(cfg["lr"], cfg["beta1"], cfg["beta2"], cfg["eps"],
                                      weight_decay=cfg["wd"] or 0.0,
                                      clip=cfg["clip"], clip_mode=mode)
        else:
            base = AdamWOptimizer(config)
            self.ref_base = R.RefAdamW(cfg["lr"], cfg["beta1"], cfg["beta2"], cfg["eps"],
                                       cfg["wd"], cfg["clip"], mode)
        if foreign:
            base = Foreign(base)
        self.ref_sam: Any = None
        self.opt: Any = base
        if kind in ("sam", "asam"):
            adaptive = kind == "asam"
            self.opt = SamOptimizer(base, sam["rho"], adaptive=adaptive, eta=sam["eta"],
                                    eps=sam["eps"], interval=sam["interval"])
            self.ref_sam = R.RefSAMEps(self.ref_base, sam["rho"], adaptive, sam["eta"],
                                       sam["eps"])
        elif kind == "gsam":
            self.opt = GsamOptimizer(base, sam["rho"], sam["rho_min"], sam["alpha"],
                                     lr_min=sam["lr_min"], eps=sam["eps"],
                                     interval=sam["interval"])
            self.ref_sam = R.RefGSAM(self.ref_base, sam["rho"], sam["rho_min"], sam["alpha"],
                                     sam["lr_min"], sam["eps"])
        self.interval = sam["interval"] if self.is_sam else 1
        self.description = (
            f"{kind}(base={base_kind}{', foreign' if foreign else ''}, cfg={cfg}, "
            f"sam={sam if self.is_sam else None}, pool="
            + ", ".join(f"{k!r}: {v.dtype}{v.shape}" for k, v in self.pool.items()) + ")")
        self.calls = 0
        self.checkpoints: list[dict[str, Any]] = []
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.scale: dict[str, float] = {}
        self.sync()

    def __repr__(self) -> str:
        return f"World<{self.description}>"

    # ------------------------------------------------------------------ state bookkeeping

    @property
    def pending(self) -> frozenset[str] | None:
        if self.ref_sam is None or self.ref_sam.saved is None:
            return None
        return frozenset(self.ref_sam.saved)

    def state(self) -> dict[str, Any]:
        try:
            return self.opt.state_dict()
        except BaseException as e:
            pytest.fail(f"state_dict() raised {type(e).__module__}.{type(e).__name__}: {e}")

    def snapshot(self, *args: Any) -> Any:
        pending = self.opt.pending if self.is_sam else None
        rho = self.opt.rho if self.is_sam else None
        return (
            R.state_snapshot(self.state()), self.opt.get_lr(), pending, rho,
            tuple(freeze(a) for a in self.pool.values()),
            tuple(h.base.tobytes() for h in self.holders if h.base is not None),
            tuple(freeze(a) for a in args),
        )

    def sync(self) -> None:
        """Re-synchronises the reference with samopt's state (after a checked call)."""
        state = self.state()
        base = self.ref_base
        base.lr = float(state["lr"])
        self.meta, self.scale = {}, {}
        per: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            prefix = per_param_prefix(key, self)
            if prefix is None:
                continue
            self.meta[key] = (value.dtype, value.shape)
            self.scale[key] = float(np.max(np.abs(value))) if value.size else 0.0
            per.setdefault(prefix, {})[key[len(prefix):]] = values_of(value)
        if self.base_kind == "sgd":
            base.velocity = per.get("velocity_", {})
        else:
            base.t = int(state["t"])
            base.m, base.v = per.get("m_", {}), per.get("v_", {})
        if self.ref_sam is not None:
            self.set_ref_rho(float(state["rho"]))
            self.calls = int(state["sam_calls"])
            saved = per.get("saved_", {})
            self.ref_sam.saved = saved if saved else None
            if self.kind == "gsam":
                self.ref_sam.grad0 = per.get("grad0_") if saved else None
                self.ref_sam.grad_norm0 = float(state["grad_norm0"]) if saved else 0.0

    def set_ref_rho(self, value: float) -> None:
        if self.kind == "gsam":
            self.ref_sam.rho_max = value
        else:
            self.ref_sam.rho = value

    def expected_state(self) -> dict[str, Any]:
        if self.ref_sam is None:
            return self.ref_base.state_dict()
        out = self.ref_sam.state_dict()
        out["sam_calls"] = np.array(self.calls, dtype=np.int64)
        return out

    def f64_tol(self, params: Mapping[str, np.ndarray]) -> float:
        """GSAM over a Python base hands it g1 − alpha·g0⊥ materialised in each parameter's
        dtype: float32 parameters' rounded directions then enter the global norm (norm
        clipping) that float64 parameters are scaled by."""
        coupled = self.kind == "gsam" and self.foreign
        return R.coupled_f64_tol(params, coupled)

    def check_state(self, label: str, dtypes: dict[str, np.dtype],
                    sizes: dict[str, int], f64_tol: float = R.FLOAT64_TOL) -> None:
        """samopt's state_dict against the reference's, after a successful call."""
        actual, expected = self.state(), self.expected_state()
        for key in expected:
            if key not in actual:
                name = per_param_name(key, self)
                assert name is not None and sizes.get(name, 1) == 0, (
                    f"{label}: state key {key!r} missing")
        for key, value in actual.items():
            assert key in expected, f"{label}: unexpected state key {key!r}"
            assert isinstance(value, np.ndarray), f"{label}: state {key!r} is not an ndarray"
            ref = expected[key]
            name = per_param_name(key, self)
            if name is None:
                if key in ("t", "sam_calls"):
                    assert value.dtype == np.int64 and int(value) == int(ref), (
                        f"{label}: {key} = {value!r}, expected {int(ref)}")
                elif key == "grad_norm0":
                    assert abs(float(value) - float(ref)) <= 1e-12 * float(ref), label
                else:
                    assert value.dtype == np.float64 and float(value) == float(ref), (
                        f"{label}: {key} = {value!r}, expected {float(ref)!r}")
                continue
            dtype = self.meta[key][0] if key in self.meta else dtypes.get(name, value.dtype)
            assert value.dtype == dtype, f"{label}: state {key!r} dtype {value.dtype} != {dtype}"
            assert value.shape == ref.shape, f"{label}: state {key!r} shape {value.shape}"
            err = R.rel_err(value, ref, self.scale.get(key, 0.0))
            assert err <= R.tol_for(dtype, f64_tol), (
                f"{label}: state {key!r} ({dtype}) rel err {err:.3g}")


def per_param_prefix(key: str, world: World) -> str | None:
    prefixes = BASE_PREFIXES[world.base_kind]
    if world.is_sam:
        prefixes += ("saved_",)
    if world.kind == "gsam":
        prefixes += ("grad0_",)
    for prefix in prefixes:
        if key.startswith(prefix):
            return prefix
    return None


def per_param_name(key: str, world: World) -> str | None:
    prefix = per_param_prefix(key, world)
    return None if prefix is None else key[len(prefix):]


# ----------------------------------------------------------------------------- predictions


def predict(world: World, params: Any, grads: Any, phase: str,
            pending: frozenset[str] | None) -> Expect:
    """SPEC's verdict on `phase` ("base", "first", "second", "restore") with these args,
    `pending` being the names of a pending first_step."""
    ex = Expect()
    if not isinstance(params, Mapping):
        ex.must_fail("params", "params is not a mapping")
        return ex
    if phase != "restore" and not isinstance(grads, Mapping):
        ex.must_fail("grads", "grads is not a mapping")
        return ex
    if phase == "restore" and pending is None:
        return ex  # a no-op
    if phase == "first" and pending is not None:
        ex.must_fail(None, "first_step twice")
        return ex
    if phase in ("second", "restore") and pending is not None and \
            set(params.keys()) != pending:
        diff = {k if isinstance(k, str) else repr(k) for k in set(params.keys()) ^ pending}
        ex.must_fail(tuple(diff), "not the pending names")
        return ex
    if phase == "second" and pending is None:
        phase = "base"
    if phase == "base" and world.base_kind != "sgd" and not params:
        return ex  # Adam with nothing to step
    entries: dict[str, np.ndarray] = {}
    for k, v in params.items():
        if not isinstance(k, str):
            ex.must_fail(repr(k), f"non-str parameter name {k!r}")
        elif not is_float_param(v):
            ex.must_fail(k, f"parameter {k!r} is {type(v).__name__} {getattr(v, 'dtype', '')}")
        else:
            if not v.flags.writeable:
                ex.must_fail(k, f"parameter {k!r} is read-only")
            if not v.dtype.isnative:
                ex.may_fail(k, f"parameter {k!r} is byte-swapped")
            if not v.flags.aligned:
                ex.may_fail(k, f"parameter {k!r} is unaligned")
            entries[k] = v
    names = sorted(entries)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.shares_memory(entries[a], entries[b]):
                ex.must_fail((a, b), f"parameters {a!r} and {b!r} share memory")
            elif tied(entries[a], entries[b]):
                ex.may_fail((a, b), f"parameters {a!r} and {b!r} are views of one buffer")
    if phase != "restore":
        for k, p in entries.items():
            if k not in grads:
                ex.must_fail(k, f"missing gradient {k!r}")
                continue
            g = as_grad(grads[k])
            if not is_float_grad(g):
                ex.must_fail(k, f"gradient {k!r} is {type(g).__name__} {getattr(g, 'dtype', '')}")
                continue
            if g.shape != p.shape:
                ex.must_fail(k, f"gradient {k!r} has shape {g.shape}, param {p.shape}")
                continue
            owners = [n for n, q in params.items() if q is g]
            if owners:
                ex.must_fail((k, *owners), f"gradient {k!r} is parameter {owners}")
            elif any(np.shares_memory(g, q) or tied(g, q) for q in entries.values()):
                ex.may_fail(tuple(entries), f"gradient {k!r} views a parameter's memory")
            if not g.dtype.isnative:
                ex.may_fail(k, f"gradient {k!r} is byte-swapped")
            if not g.flags.aligned:
                ex.may_fail(k, f"gradient {k!r} is unaligned")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = np.asarray(g).astype(native(p.dtype))
            if not np.isfinite(converted).all():
                ex.must_fail(k, f"gradient {k!r} is not finite", nonfinite=True)
    prefixes: tuple[str, ...] = ()
    if phase == "base":
        prefixes = BASE_PREFIXES[world.base_kind]
    elif phase == "second":
        prefixes = BASE_PREFIXES[world.base_kind] + ("saved_",)
        if world.kind == "gsam":
            prefixes += ("grad0_",)
    elif phase == "restore":
        prefixes = ("saved_",)
    for k, p in entries.items():
        for prefix in prefixes:
            meta = world.meta.get(prefix + k)
            if meta is not None and (meta[0] != native(p.dtype) or meta[1] != p.shape):
                ex.must_fail((prefix + k, k), f"state {prefix + k!r} does not fit {k!r}")
    return ex


def real_ok(value: Any, *, minimum: float | None = None, above: float | None = None,
            below: float | None = None) -> bool | None:
    """SPEC's check of a hyperparameter: a real number (not a bool), finite, in bounds.
    None for values SPEC leaves open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False  # an int too large for a float: not finite
    if not math.isfinite(number):
        return False
    if minimum is not None and number < minimum:
        return False
    if above is not None and number <= above:
        return False
    return not (below is not None and number >= below)


# ----------------------------------------------------------------------------- strategies

NAMES = ["w", "layer.0.weight", "b", "emb/λ", "", "m_v_", "saved_x", "velocity", "z" * 40]
SHAPES = [(), (0,), (1,), (5,), (3, 4), (2, 0), (2, 3, 2), (1, 1)]
LR_VALUES = [0.0, 0.01, 0.05, np.float32(0.02), np.float64(0.03), Fraction(1, 40), 0]
BAD_NUMBERS = [-0.1, -1, float("nan"), float("inf"), -float("inf"), True, False, "0.1", None,
               np.array(0.1), [0.1], 10**400, -(10**400), complex(0.1, 0), Decimal("0.1"),
               np.float64("nan"), np.float32("-inf"), np.float32(-0.5)]
RHO_VALUES = [0.01, 0.05, 0.3, np.float64(0.1), Fraction(1, 20), 1]


def rand_values(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return rng.standard_normal(shape) * scale


@st.composite
def worlds(draw: Any) -> World:
    kind = draw(st.sampled_from(["sgd", "adam", "adamw", "sam", "asam", "gsam"]))
    base_kind = kind if kind in BASE_PREFIXES else draw(st.sampled_from(list(BASE_PREFIXES)))
    foreign = kind in ("sam", "asam", "gsam") and draw(st.integers(0, 3)) == 0
    mode = draw(st.sampled_from([None, "value", "norm"]))
    cfg = dict(
        lr=draw(st.sampled_from([0.001, 0.01, 0.05])),
        momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
        beta1=draw(st.sampled_from([0.0, 0.9])), beta2=draw(st.sampled_from([0.5, 0.999])),
        eps=draw(st.sampled_from([1e-8, 1e-3])), wd=draw(st.sampled_from([0.0, 0.01, 0.1])),
        mode=mode, clip=None if mode is None else draw(st.sampled_from([0.05, 1.0, 30.0])),
    )
    rho = draw(st.sampled_from([0.01, 0.05, 0.5]))
    sam = dict(
        rho=rho, eta=draw(st.sampled_from([0.0, 0.01])),
        eps=draw(st.sampled_from([0.0, 0.0, 1e-12, 0.1])),
        interval=draw(st.sampled_from([1, 1, 2, 3])),
        rho_min=draw(st.sampled_from([None, rho / 10])),
        alpha=draw(st.sampled_from([0.0, 0.4, 1.0])),
        lr_min=draw(st.sampled_from([0.0, 1e-4])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    pool = {}
    for name in names:
        shape = draw(st.sampled_from(SHAPES))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        layout = draw(st.sampled_from(R.LAYOUTS))
        pool[name] = R.make_array(rand_values(rng, shape, 1.0), dtype, layout)
    return World(kind, base_kind, foreign, cfg, sam, pool, rng)


def fresh_grad(world: World, like: Any, draw: Any) -> np.ndarray:
    shape = np.shape(like) if not isinstance(like, (str, bytes)) else ()
    kind = draw(st.sampled_from(["f64", "f32", "f16", "f64", "zero"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    layout = draw(st.sampled_from(R.LAYOUTS))
    values = np.zeros(shape) if kind == "zero" else rand_values(world.rng, shape, scale)
    dtype = {"f64": np.float64, "f32": np.float32, "f16": np.float16, "zero": np.float64}[kind]
    return R.make_array(values, dtype, layout).array


def _unaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _with(a: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    out = np.array(a, dtype=np.float64 if a.dtype.itemsize == 2 else a.dtype)
    if out.size:
        out.flat[rng.integers(out.size)] = value
    return out


# Defects: each edits (params, grads) for the name w (None when the dicts are empty).
def _p_dtype(dt: Any) -> Callable[..., None]:
    def f(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
        values = np.array(p[w])
        if values.dtype.kind in "cO":  # an earlier defect made it complex or objects
            values = np.real(values.astype(complex))
        p[w] = values.astype(dt)
    return f


def _p_readonly_copy(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = np.array(p[w])
    p[w].setflags(write=False)


def _p_readonly_view(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    view = p[w].view()
    view.setflags(write=False)
    p[w] = view


def _p_list(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = p[w].tolist()


def _p_scalar(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = 1.5


def _p_byteswapped(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = p[w].astype(p[w].dtype.newbyteorder())


def _p_unaligned(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = _unaligned(p[w])


def _p_strided_copy(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = R.make_array(values_of(p[w]), p[w].dtype, "strided").array


def _p_view(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w] = p[w][...]


def _p_dup(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w + "#dup"] = p[w]
    g[w + "#dup"] = fresh_grad(world, p[w], draw)


def _p_alias_view(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    p[w + "#alias"] = p[w][...]
    g[w + "#alias"] = fresh_grad(world, p[w], draw)


def _p_new(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    name = draw(st.sampled_from(["new", "new.bias", "ω"]))
    if name not in p and name not in world.pool:
        shape = draw(st.sampled_from(SHAPES))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        p[name] = rand_values(world.rng, shape, 1.0).astype(dtype)
        g[name] = fresh_grad(world, p[name], draw)


def _p_nonstr_key(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    key = draw(st.sampled_from([7, None, ("t",), b"w", 1.5]))
    p[key] = np.ones(2)
    g[key] = np.ones(2)


def _g_missing(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    g.pop(w, None)


def _g_shape(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    shape = np.shape(p[w])
    options = [(*shape, 1), (*shape[::-1], 2), (1,) if shape != (1,) else (), shape[1:]]
    new = draw(st.sampled_from([s for s in options if s != shape]))
    g[w] = np.ones(new, dtype=draw(st.sampled_from([np.float32, np.float64])))


def _g_dtype(dt: Any) -> Callable[..., None]:
    def f(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
        g[w] = np.ones(np.shape(p[w])).astype(dt)
    return f


def _g_list(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    g[w] = g[w].tolist() if isinstance(g.get(w), np.ndarray) else []


def _g_scalar(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    g[w] = draw(st.sampled_from([0.5, np.float64(0.5), None, "g"]))


def _g_nonfinite(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    g[w] = _with(np.ones(np.shape(p[w])), value, world.rng).astype(
        draw(st.sampled_from([np.float16, np.float32, np.float64])))


def _g_overflow(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    # finite in float64, infinite once converted to a float32 parameter's dtype
    if getattr(p[w], "dtype", None) == np.float32:
        g[w] = _with(np.ones(np.shape(p[w])), 1e300, world.rng)
    else:
        g[w] = _with(np.ones(np.shape(p[w]), dtype=np.float32), np.nan, world.rng)


def _g_own(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    g[w] = p[w]


def _g_own_view(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    if isinstance(p[w], np.ndarray):
        g[w] = p[w][...]


def _g_other_param(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    others = [k for k in p if k != w]
    if others:
        g[w] = p[draw(st.sampled_from(others))]


def _renormalise_grad0(state: dict[Any, Any]) -> None:
    """A valid ``grad_norm0`` made the norm of the g0 of the names still pending (those
    with a saved value) after a defect removed one: a wrong but valid ‖g0‖ cannot be
    detected (see ``corrupt_state``'s "scalar"), so the fuzz must not make one."""
    norm0 = state.get("grad_norm0")
    pending = [state[k] for k in state if isinstance(k, str) and k.startswith("grad0_")
               and "saved_" + k[len("grad0_"):] in state]
    real = all(_numeric(v) and v.dtype.kind in "fiu" and np.isfinite(v).all() for v in pending)
    try:
        valid = norm0 is not None and 0 < float(norm0) < math.inf
    except (TypeError, ValueError):  # a defect's own invalid value: left for the load
        valid = False
    if not (valid and real):
        return
    state["grad_norm0"] = np.array(math.sqrt(sum(
        float(np.sum(np.square(np.asarray(v, np.float64)))) for v in pending)) or 1.0)


def _numeric(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind in "biufc"


def _g_byteswapped(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    if _numeric(g.get(w)):
        g[w] = g[w].astype(g[w].dtype.newbyteorder())


def _g_unaligned(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    if _numeric(g.get(w)):
        g[w] = _unaligned(np.ascontiguousarray(g[w]))


def _g_readonly(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    if isinstance(g.get(w), np.ndarray):
        g[w] = np.array(g[w])
        g[w].setflags(write=False)


def _g_extra(world: World, p: dict, g: dict, w: str, draw: Any) -> None:
    key = draw(st.sampled_from(["extra", "junk", 3, None, "nan", w + "_other"]))
    g[key] = draw(st.sampled_from([
        "junk", None, np.ones(3, dtype=int), np.array([np.nan]), np.ones((2, 2)), [1.0]]))


DEFECT_TABLE: dict[str, Callable[..., None]] = {
    "p_f16": _p_dtype(np.float16), "p_int": _p_dtype(np.int64), "p_bool": _p_dtype(np.bool_),
    "p_complex": _p_dtype(np.complex128), "p_object": _p_dtype(object),
    "p_readonly": _p_readonly_copy, "p_readonly_view": _p_readonly_view, "p_list": _p_list,
    "p_scalar": _p_scalar, "p_byteswapped": _p_byteswapped, "p_unaligned": _p_unaligned,
    "p_strided_copy": _p_strided_copy, "p_view": _p_view, "p_dup": _p_dup,
    "p_alias_view": _p_alias_view, "p_new": _p_new, "p_nonstr_key": _p_nonstr_key,
    "g_missing": _g_missing, "g_shape": _g_shape, "g_int": _g_dtype(np.int64),
    "g_uint8": _g_dtype(np.uint8), "g_bool": _g_dtype(np.bool_),
    "g_complex": _g_dtype(np.complex64), "g_object": _g_dtype(object),
    "g_longdouble": _g_dtype(np.longdouble), "g_list": _g_list, "g_scalar": _g_scalar,
    "g_nonfinite": _g_nonfinite, "g_overflow": _g_overflow, "g_own": _g_own,
    "g_own_view": _g_own_view, "g_other_param": _g_other_param,
    "g_byteswapped": _g_byteswapped, "g_unaligned": _g_unaligned, "g_readonly": _g_readonly,
    "g_extra": _g_extra,
}
NEEDS_ARRAY_PARAM = {"p_readonly_view", "p_list", "p_byteswapped", "p_unaligned",
                     "p_strided_copy", "p_view", "p_dup", "p_alias_view", "g_own_view"}


def draw_call_args(world: World, draw: Any, with_grads: bool = True,
                   pending: frozenset[str] | None = None) -> tuple[Any, Any, list[str]]:
    """(params, grads, defects) for one call: a subset of the pool (usually the pending
    names or all), fresh valid gradients, then 0-3 random defects."""
    pool_names = list(world.pool)
    choice = draw(st.integers(0, 9))
    if choice < 6:
        names = sorted(pending) if pending is not None else pool_names
    elif choice < 8:
        names = pool_names
    else:
        names = draw(st.lists(st.sampled_from(pool_names), max_size=len(pool_names),
                              unique=True))
    params: dict[Any, Any] = {n: world.pool[n] for n in names if n in world.pool}
    grads: dict[Any, Any] = {n: fresh_grad(world, params[n], draw) for n in params}
    defects = []
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 1, 2, 3]))):
        label = draw(st.sampled_from(sorted(DEFECT_TABLE)))
        str_names = [k for k in params if isinstance(k, str)]
        if not str_names and label != "p_new":
            continue
        w = draw(st.sampled_from(str_names)) if str_names else "new"
        if label in NEEDS_ARRAY_PARAM and not is_float_param(params.get(w)):
            continue
        if label.startswith("g_") and not with_grads:
            continue
        DEFECT_TABLE[label](world, params, grads, w, draw)
        defects.append(label)
    container = draw(st.sampled_from(["dict"] * 20 + ["proxy", "list", "none", "empty"]))
    if container == "proxy":
        params = types.MappingProxyType(params)
    elif container == "list":
        params = list(params.values())
    elif container == "none":
        params = None
    elif container == "empty":
        params, grads = {}, {}
    if container != "dict":
        defects.append("params_" + container)
    gcontainer = draw(st.sampled_from(["dict"] * 24 + ["proxy", "list", "none"]))
    if gcontainer == "proxy":
        grads = types.MappingProxyType(grads)
    elif gcontainer == "list":
        grads = list(grads.values())
    elif gcontainer == "none":
        grads = None
    if gcontainer != "dict" and with_grads:
        defects.append("grads_" + gcontainer)
    DEFECTS.update(defects)
    if TRACE:
        print(f"  args: names={names} defects={defects}")
    return params, grads, defects


# ----------------------------------------------------------------------------- running


class UserError(Exception):
    """Raised by a grad_fn: sam_step must let it through and change nothing."""


def run(world: World, label: str, call: Callable[[], Any], expect: Expect, args: tuple,
        on_success: Callable[[Any], None]) -> None:
    before = world.snapshot(*args)
    if TRACE:
        print(f"  {label}: pending={world.pending and sorted(world.pending)} "
              f"expect={sorted(expect.allowed)} {expect.why()}")
    try:
        result = call()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if isinstance(e, UserError) and expect.user:
            outcome = "user"
        elif isinstance(e, TrainError):
            outcome = "train"
        else:
            pytest.fail(f"{label}: raised {type(e).__module__}.{type(e).__name__}: {e} "
                        f"(expected: {expect.why() or 'success'})")
        assert outcome in expect.allowed, (
            f"{label}: raised {e!r} but SPEC says it must succeed")
        if outcome == "train":
            check_error(e, expect, label)
        after = world.snapshot(*args)
        assert after[0] == before[0], f"{label}: {e!r} but the optimizer state changed"
        assert after[1:4] == before[1:4], f"{label}: {e!r} but lr/pending/rho changed"
        assert after[4:] == before[4:], f"{label}: {e!r} but params/grads changed"
        COUNTS[f"call:{label}:error"] += 1
        return
    assert "ok" in expect.allowed, (
        f"{label}: succeeded, but SPEC says it must raise a TrainError: {expect.why()}")
    on_success(result)
    COUNTS[f"call:{label}:ok"] += 1


class Inputs:
    """The values a call starts from, captured before it runs: the parameters (float64)
    and copies of the gradients of their names."""

    def __init__(self, params: Any, *grad_dicts: Any) -> None:
        p = array_args(params)
        self.values = {k: values_of(v) for k, v in p.items() if is_float_param(v)}
        self.dtypes = {k: native(v.dtype) for k, v in p.items() if is_float_param(v)}
        self.grads = []
        for grads in grad_dicts:
            g = grads if isinstance(grads, Mapping) else {}
            self.grads.append({k: np.array(g[k]) for k in self.values
                               if k in g and is_float_grad(as_grad(g[k]))})
        self.frozen = [freeze(g) for g in grad_dicts]
        self.grad_dicts = grad_dicts
        self.params = p

    def ref_params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.values.items()}

    def ref_grads(self, i: int = 0) -> dict[str, np.ndarray]:
        return R.to_ref_grads(self.grads[i], self.dtypes)

    def check_grads_unchanged(self, label: str) -> None:
        """Gradients are never modified (unless they are views of a parameter)."""
        arrays = [v for v in self.params.values() if isinstance(v, np.ndarray)]
        for i, grads in enumerate(self.grad_dicts):
            if isinstance(grads, Mapping) and not any(
                    isinstance(g, np.ndarray) and any(np.shares_memory(g, a) for a in arrays)
                    for g in grads.values()):
                assert freeze(grads) == self.frozen[i], f"{label}: gradients modified"


def gsam_condition(world: World, g0: Mapping[str, np.ndarray] | None,
                   g1: Mapping[str, np.ndarray]) -> float:
    """How much GSAM's g1 − alpha·g0⊥ amplifies rounding: its parts cancel to g1 when g0 is
    (nearly) parallel to g1, leaving an error ~ eps·alpha·‖g0‖ against a result ~ ‖g1‖."""
    if world.kind != "gsam" or g0 is None:
        return 1.0
    n0 = R.scaled_norm({k: g0[k] for k in g1})
    n1 = R.scaled_norm(g1)
    return 1.0 + world.ref_sam.alpha * n0 / n1 if n1 > 0.0 else 1.0


def finish(world: World, label: str, params: Mapping[str, np.ndarray],
           ref_p: dict[str, np.ndarray], inputs: Inputs, exact: bool = False,
           condition: float = 1.0) -> None:
    """After a successful call: params against the reference, untouched others, state,
    then write replaced arrays back into the pool and re-synchronise."""
    before, dtypes = inputs.values, inputs.dtypes
    f64_tol = min(world.f64_tol(params) * condition, R.FLOAT32_TOL)
    for k, arr in params.items():
        if exact:
            assert arr.tobytes() == ref_p[k].astype(arr.dtype).tobytes(), (
                f"{label}: {k!r} not restored bitwise")
        else:
            scale = float(np.max(np.abs(before[k]))) if before[k].size else 0.0
            err = R.rel_err(arr, ref_p[k], scale)
            assert err <= R.tol_for(dtypes[k], f64_tol), (
                f"{label}: param {k!r} ({arr.dtype}) rel err {err:.3g}: before "
                f"{before[k].ravel()[:4]}, got {values_of(arr).ravel()[:4]}, reference "
                f"{ref_p[k].ravel()[:4]}")
    for h in world.holders:
        assert h.outside_untouched(), f"{label}: memory outside a strided parameter written"
    world.check_state(label, dtypes, {k: v.size for k, v in params.items()}, f64_tol)
    for k, arr in params.items():
        if k in world.pool:
            if arr is not world.pool[k]:
                world.pool[k][...] = arr
        else:
            world.pool[k] = arr  # a new parameter joins the model
    world.sync()


def array_args(params: Any) -> dict[str, np.ndarray]:
    return dict(params) if isinstance(params, Mapping) else {}


def do_step(world: World, draw: Any, method: str) -> None:
    pending = world.pending
    params, grads, _ = draw_call_args(world, draw, pending=pending)
    phase = {"step": "second" if world.is_sam else "base", "second_step": "second",
             "first_step": "first"}[method]
    expect = predict(world, params, grads, phase, pending)

    def on_success(_: Any) -> None:
        p = array_args(params)
        ref_p, ref_g = inputs.ref_params(), inputs.ref_grads()
        condition = 1.0
        if phase == "first":
            world.ref_sam.first_step(ref_p, ref_g)
        elif world.is_sam:
            condition = gsam_condition(world, getattr(world.ref_sam, "grad0", None), ref_g)
            world.ref_sam.second_step(ref_p, ref_g)
        else:
            world.ref_base.step(ref_p, ref_g)
        inputs.check_grads_unchanged(method)
        finish(world, method, p, ref_p, inputs, condition=condition)

    inputs = Inputs(params, grads)
    fn = getattr(world.opt, method)
    run(world, method, lambda: fn(params, grads), expect, (params, grads), on_success)


def do_restore(world: World, draw: Any) -> None:
    pending = world.pending
    params, _, _ = draw_call_args(world, draw, with_grads=False, pending=pending)
    expect = predict(world, params, None, "restore", pending)
    inputs = Inputs(params)

    def on_success(_: Any) -> None:
        if pending is None:
            after = world.snapshot(params)
            assert after == before, "restore with nothing pending changed something"
            return
        p = array_args(params)
        ref_p = inputs.ref_params()
        for k in p:
            ref_p[k] = world.ref_sam.saved[k].copy()
        world.ref_sam.saved = None
        if world.kind == "gsam":
            world.ref_sam.grad0 = None
        finish(world, "restore", p, ref_p, inputs, exact=True)

    before = world.snapshot(params)
    run(world, "restore", lambda: world.opt.restore(params), expect, (params,), on_success)


def first_norm(world: World, params: Mapping[str, Any], grads: Mapping[str, Any]) -> float:
    """The norm first_step computes (‖g‖, or ‖(|p|+eta)·g‖ for adaptive SAM)."""
    inputs = Inputs(params, grads)
    adaptive = world.kind == "asam"
    eta = world.ref_sam.eta if adaptive else 0.0
    _, n = R.sam_perturbation(inputs.ref_params(), inputs.ref_grads(), 1.0, 0.0, adaptive, eta)
    return n


def do_sam_step(world: World, draw: Any) -> None:
    pending = world.pending
    params, grads_a, _ = draw_call_args(world, draw, pending=pending)
    names = frozenset(k for k in array_args(params))
    grads_b = {k: fresh_grad(world, v, draw) for k, v in array_args(params).items()
               if isinstance(k, str)}
    if draw(st.integers(0, 3)) == 0 and grads_b:
        label = draw(st.sampled_from(sorted(k for k in DEFECT_TABLE if k.startswith("g_"))))
        w = draw(st.sampled_from(sorted(grads_b)))
        if label not in NEEDS_ARRAY_PARAM or is_float_param(params[w]):
            DEFECT_TABLE[label](world, dict(params), grads_b, w, draw)
            DEFECTS[label + "@2nd"] += 1
    behaviour = draw(st.sampled_from(["ok"] * 6 + ["raise1", "raise2", "bad1", "bad2"]))
    sam_call = world.calls % world.interval == 0
    loss = object()
    seen: list[int] = []
    DEFECTS["grad_fn_" + behaviour] += behaviour != "ok"

    def grad_fn(p: dict[str, np.ndarray]) -> Any:
        seen.append(len(seen))
        call = len(seen)
        if behaviour == f"raise{call}":
            raise UserError("grad_fn failed")
        if behaviour == f"bad{call}":
            return [loss, grads_a]
        return (loss, grads_a if call == 1 else grads_b)

    # The expected outcome, phase by phase (an error at any point undoes everything).
    expect = Expect()
    if not isinstance(params, Mapping):
        expect.must_fail("params", "params is not a mapping")
    elif pending is not None:
        expect.must_fail(None, "sam_step while a first_step is pending")
    elif behaviour == "raise1":
        expect.user = True
    elif behaviour == "bad1":
        expect.must_fail("grad_fn", "grad_fn returned a list")
    else:
        first = predict(world, params, grads_a, "first" if sam_call else "base", None)
        expect.fail, expect.maybe = list(first.fail), list(first.maybe)
        if not first.fail and sam_call:
            later = Expect()
            if behaviour == "raise2":
                later.user = True
            elif behaviour == "bad2":
                later.must_fail("grad_fn", "grad_fn returned a list")
            else:
                moved = first_norm(world, params, grads_a) > 0.0
                later = predict(world, params, grads_b, "second", names if moved else None)
            expect.fail, expect.user = later.fail, later.user
            expect.maybe = first.maybe + later.maybe
            if first.maybe:  # refused in the first phase, or on to the second
                expect.forced = {"train"} | later.allowed

    inputs = Inputs(params, grads_a, grads_b)

    def on_success(result: Any) -> None:
        assert result is loss, "sam_step must return the first loss"
        assert len(seen) == (2 if sam_call else 1), f"grad_fn called {len(seen)} times"
        p = array_args(params)
        ref_p = inputs.ref_params()
        condition = 1.0
        if sam_call:
            world.ref_sam.first_step(ref_p, inputs.ref_grads(0))
            condition = gsam_condition(world, getattr(world.ref_sam, "grad0", None),
                                       inputs.ref_grads(1))
            world.ref_sam.second_step(ref_p, inputs.ref_grads(1))
        else:
            world.ref_base.step(ref_p, inputs.ref_grads(0))
        world.calls += 1
        inputs.check_grads_unchanged("sam_step")
        finish(world, "sam_step", p, ref_p, inputs, condition=condition)

    run(world, "sam_step", lambda: world.opt.sam_step(params, grad_fn), expect,
        (params, grads_a, grads_b), on_success)


def do_norm(world: World, draw: Any) -> None:
    _, grads, _ = draw_call_args(world, draw)
    expect = Expect()
    if not isinstance(grads, Mapping):
        expect.must_fail("grads", "grads is not a mapping")
    else:
        for k, g in grads.items():
            g = as_grad(g)
            if not isinstance(k, str):
                expect.must_fail(repr(k), "non-str key")
            elif not is_float_grad(g):
                expect.must_fail(k, f"gradient {k!r} is not a float array")
            elif not g.dtype.isnative or not g.flags.aligned:
                expect.may_fail(k, f"gradient {k!r} is byte-swapped or unaligned")

    def on_success(result: Any) -> None:
        assert type(result) is float
        values = [np.asarray(g, dtype=np.float64) for g in grads.values()]
        if any(np.isnan(v).any() for v in values):
            assert math.isnan(result)
        elif any(np.isinf(v).any() for v in values):
            assert result == math.inf
        else:
            top = max((float(np.max(np.abs(v))) for v in values if v.size), default=0.0)
            ref = top * math.sqrt(sum(float(np.sum((v / top) ** 2)) for v in values)) \
                if top else 0.0
            assert abs(result - ref) <= 1e-13 * ref, (result, ref)
        assert world.snapshot(grads) == before

    before = world.snapshot(grads)
    run(world, "compute_gradient_norm", lambda: compute_gradient_norm(grads), expect,
        (grads,), on_success)


def do_set_lr(world: World, draw: Any) -> None:
    value = draw(st.sampled_from(LR_VALUES + BAD_NUMBERS))
    expect = Expect()
    if not real_ok(value, minimum=0.0):
        expect.must_fail(("lr", "learning_rate"), f"bad learning rate {value!r}")

    def on_success(_: Any) -> None:
        assert world.opt.get_lr() == float(value)
        world.ref_base.lr = float(value)
        world.check_state("set_lr", {}, {})
        world.sync()

    run(world, "set_lr", lambda: world.opt.set_lr(value), expect, (), on_success)


def do_set_rho(world: World, draw: Any) -> None:
    value = draw(st.sampled_from(RHO_VALUES + BAD_NUMBERS + [0, 0.0]))
    expect = Expect()
    if not real_ok(value, above=0.0):
        expect.must_fail("rho", f"bad rho {value!r}")
    elif world.kind == "gsam" and world.opt.rho_min is not None and \
            float(value) < world.opt.rho_min:
        expect.must_fail("rho", f"rho {value!r} below rho_min")

    def on_success(_: Any) -> None:
        world.set_ref_rho(float(value))
        if world.kind == "gsam":
            assert world.opt.rho_max == float(value)
            assert math.isclose(world.opt.rho, world.ref_sam.rho, rel_tol=1e-14)
        else:
            assert world.opt.rho == float(value)
        world.check_state("rho", {}, {})
        world.sync()

    run(world, "rho=", lambda: setattr(world.opt, "rho", value), expect, (), on_success)


def do_zero_grad(world: World, draw: Any) -> None:
    before = world.snapshot()

    def on_success(_: Any) -> None:
        assert world.snapshot() == before

    run(world, "zero_grad", world.opt.zero_grad, Expect(), (), on_success)


# ----------------------------------------------------------------------------- state dicts

SCALAR_KEYS = {"lr", "t", "rho", "sam_calls", "grad_norm0"}


def classify_state(world: World, state: Any) -> tuple[Expect, dict[str, Any] | None]:
    """SPEC's verdict on load_state_dict(state), and on success the state_dict() it must
    produce (scalars as Python numbers, arrays as given)."""
    ex = Expect()
    if not isinstance(state, Mapping):
        ex.must_fail(ANY, "state is not a mapping")
        return ex, None
    scalars = {"lr"} | ({"t"} if world.base_kind != "sgd" else set())
    prefixes = BASE_PREFIXES[world.base_kind]
    if world.is_sam:
        scalars |= {"rho", "sam_calls"}
        prefixes += ("saved_",)
    if world.kind == "gsam":
        scalars |= {"grad_norm0"}
        prefixes += ("grad0_",)
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, np.ndarray]] = {p: {} for p in prefixes}
    for key in state:
        if not isinstance(key, str):
            ex.must_fail(ANY, f"non-str key {key!r}")
            continue
        if key in scalars:
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            ex.must_fail(key, f"unknown key {key!r}")
            continue
        value = state[key]
        if not isinstance(value, np.ndarray) or value.dtype not in (np.float32, np.float64):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and \
                    value.dtype.itemsize in (4, 8):
                ex.may_fail(key, f"{key!r} is byte-swapped")  # SPEC is silent
            else:
                ex.must_fail(key, f"{key!r} is not a float32/float64 array")
            continue
        if not np.isfinite(value).all():
            ex.must_fail(key, f"{key!r} is not finite")
        if prefix == "v_" and (value < 0).any():
            ex.must_fail(key, f"{key!r} is negative")
        groups[prefix][key[len(prefix):]] = value
        out[key] = value

    def scalar(key: str, kind: str, required: bool = True) -> None:
        if key not in state:
            if required:
                ex.must_fail(key, f"missing {key!r}")
            return
        array = np.asarray(state[key]) if not isinstance(state[key], np.ndarray) \
            else state[key]
        if array.shape not in ((), (1,)):
            ex.must_fail(key, f"{key!r} is not a scalar")
            return
        value = array.reshape(()).item()
        if kind == "int":
            good = isinstance(value, numbers.Integral) and not isinstance(value, bool) \
                and value >= 0
            if good and value >= 2**63:
                ex.may_fail(key, f"{key!r} does not fit an int64")
            elif not good:
                ex.must_fail(key, f"{key!r} = {value!r}")
            out[key] = value
        else:
            ok = real_ok(value, above=0.0) if kind == "positive" else real_ok(value, minimum=0.0)
            if not ok:
                ex.must_fail(key, f"{key!r} = {value!r}")
            out[key] = value

    scalar("lr", "real")
    if world.base_kind != "sgd":
        scalar("t", "int")
        ms, vs = groups["m_"], groups["v_"]
        for name in set(ms) ^ set(vs):
            ex.must_fail(("m_" + name, "v_" + name), f"no m_/v_ partner for {name!r}")
        for name in set(ms) & set(vs):
            if ms[name].shape != vs[name].shape or ms[name].dtype != vs[name].dtype:
                ex.must_fail(("m_" + name, "v_" + name), f"m_/v_ {name!r} differ")
        # a non-array or non-float partner also breaks the pair
        for prefix, other in (("m_", "v_"), ("v_", "m_")):
            for key in state:
                if isinstance(key, str) and key.startswith(prefix) and \
                        key[len(prefix):] not in groups[prefix]:
                    ex.may_fail(other + key[len(prefix):], "partner of a bad entry")
    if world.is_sam:
        scalar("rho", "positive")
        scalar("sam_calls", "int", required=False)
        if "sam_calls" not in state:
            out["sam_calls"] = 0
    pending = world.is_sam and any(
        isinstance(k, str) and k.startswith("saved_") for k in state)
    if world.kind == "gsam":
        saved_names = {k[6:] for k in state if isinstance(k, str) and k.startswith("saved_")}
        grad0_names = {k[6:] for k in state if isinstance(k, str) and k.startswith("grad0_")}
        for name in saved_names ^ grad0_names:
            ex.must_fail(("saved_" + name, "grad0_" + name, name), f"saved_/grad0_ {name!r}")
        if pending:
            scalar("grad_norm0", "positive")
        else:
            out.pop("grad_norm0", None)
        for name in set(groups["saved_"]) & set(groups["grad0_"]):
            saved, grad0 = groups["saved_"][name], groups["grad0_"][name]
            if saved.dtype != grad0.dtype or saved.shape != grad0.shape:
                ex.must_fail("grad0_" + name, f"grad0_ {name!r} does not fit saved_")
    if pending and not world.foreign:
        # A pending first_step must fit the base's state, when it has any.
        known = groups[BASE_PREFIXES[world.base_kind][0]]
        for name, saved in groups["saved_"].items() if known else ():
            if name not in known:
                ex.must_fail("saved_" + name, f"saved_ {name!r}: the base has no state for it")
            elif saved.dtype != known[name].dtype or saved.shape != known[name].shape:
                ex.must_fail("saved_" + name, f"saved_ {name!r} does not fit the base's state")
    return ex, out


def do_load(world: World, draw: Any) -> None:
    source = draw(st.sampled_from(["current", "current", "checkpoint", "other_kind"]))
    if source == "checkpoint" and world.checkpoints:
        state: Any = dict(draw(st.sampled_from(world.checkpoints)))
    elif source == "other_kind":
        other = draw(st.sampled_from(["sgd", "adam", "sam"]))
        opt: Any = {"sgd": SgdOptimizer, "adam": AdamOptimizer}.get(other)
        opt = opt() if opt else SamOptimizer(AdamWOptimizer(), 0.2)
        p = {k: np.array(v) for k, v in world.pool.items()}
        g = {k: np.ones(v.shape, v.dtype) for k, v in p.items()}
        if isinstance(opt, SamOptimizer) and draw(st.booleans()):
            opt.first_step(p, g)
        else:
            opt.step(p, g)
        state = opt.state_dict()
    else:
        state = world.state()
    state = {k: v for k, v in state.items()}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        corrupt_state(world, state, draw)
    container = draw(st.sampled_from(["dict"] * 12 + ["proxy", "list", "none", "items"]))
    if container == "proxy":
        state = types.MappingProxyType(state)
    elif container == "list":
        state = list(state)
    elif container == "none":
        state = None
    elif container == "items":
        state = list(state.items())
    if container != "dict":
        DEFECTS["state_" + container] += 1
    expect, expected = classify_state(world, state)

    def on_success(_: Any) -> None:
        actual = world.state()
        assert expected is not None
        assert set(actual) == set(expected), (
            f"load_state_dict: state_dict() keys {sorted(actual)} != loaded {sorted(expected)}")
        for key, value in expected.items():
            got = actual[key]
            if key in SCALAR_KEYS:
                assert got.shape == () and got.item() == value, (key, got, value)
            else:
                assert got.dtype == value.dtype and got.shape == value.shape, key
                assert np.ascontiguousarray(got).tobytes() == \
                    np.ascontiguousarray(value).tobytes(), key
                assert not np.shares_memory(got, value), f"{key!r} not copied"
        if world.is_sam:
            assert world.opt.pending == any(k.startswith("saved_") for k in expected)
        world.sync()

    run(world, "load_state_dict", lambda: world.opt.load_state_dict(state), expect,
        (state,), on_success)


REAL_VALUES = [-1, -0.5, np.nan, np.inf, "x", None, True, np.array(True), [1, 2], [0.25],
               np.array([[0.1]]), 0, 0.0, np.float32(0.1), np.array(0.2, ">f8"),
               np.array(None), np.array(1 + 0j), 10**400, np.float64(-np.inf)]
COUNTER_VALUES = [-1, 2.5, "x", None, True, np.array(True), [1, 2], [3], np.array(3, np.uint8),
                  0, np.array(7, np.int32), np.array(2**63 + 5, np.uint64), 2**70,
                  np.float32(2), np.array(1 + 0j), np.array(-2, np.int8)]
INVALID_NORMS = [-1, -0.5, np.nan, np.inf, "x", None, True, [1, 2], np.array([[0.1]]), 0,
                 0.0, np.array(None), np.array(1 + 0j), 10**400]
INVALID_ARRAY_EDITS: list[Callable[[np.ndarray], Any]] = [
    lambda v: v.astype(np.float16), lambda v: v.astype(np.int64),
    lambda v: v.astype(object), lambda v: v.astype(np.complex128),
    lambda v: v.astype(v.dtype.newbyteorder()), lambda v: v.tolist(),
    lambda v: None, lambda v: float("nan"),
]


def corrupt_state(world: World, state: dict[Any, Any], draw: Any) -> None:
    keys = sorted(k for k in state if isinstance(k, str))
    per = [k for k in keys if k not in SCALAR_KEYS]
    names = list(world.pool)
    what = draw(st.sampled_from([
        "delete", "unknown", "nonstr", "scalar", "scalar", "array", "array", "wrong_shape",
        "add_saved", "drop_partner", "view", "readonly"]))
    DEFECTS["state_" + what] += 1
    if what == "delete" and keys:
        key = draw(st.sampled_from(keys))
        del state[key]
        if key.startswith(("saved_", "grad0_")):
            _renormalise_grad0(state)
    elif what == "unknown":
        key = draw(st.sampled_from(["bogus", "momentum_w", "velocity", "m", "rho_", "lr "]))
        state[key] = np.zeros(2)
    elif what == "nonstr":
        state[draw(st.sampled_from([1, None, ("lr",)]))] = np.zeros(1)
    elif what == "scalar":
        key = draw(st.sampled_from(["lr", "t", "rho", "sam_calls", "grad_norm0"]))
        if key in ("t", "sam_calls"):
            state[key] = draw(st.sampled_from(COUNTER_VALUES))
        elif key != "grad_norm0":
            state[key] = draw(st.sampled_from(REAL_VALUES))
        else:  # a wrong value of a valid ‖g0‖ is not detectable: only invalid ones
            state[key] = draw(st.sampled_from(INVALID_NORMS))
    elif what == "array" and [k for k in per if _numeric(state[k])]:
        key = draw(st.sampled_from([k for k in per if _numeric(state[k])]))
        value = state[key]
        edits = [*INVALID_ARRAY_EDITS,
            lambda v: _with(v.astype(np.float64), np.nan, world.rng),
            lambda v: _with(v.astype(np.float64), -np.inf, world.rng)]
        if not key.startswith("grad0_"):  # g0 must stay consistent with grad_norm0
            edits += [lambda v: -np.ones(v.shape), lambda v: v.astype(np.float32),
                      lambda v: v.astype(np.float64)]
        state[key] = draw(st.sampled_from(edits))(value)
    elif what == "wrong_shape" and names:
        # fits no parameter: accepted by the load (it cannot know), refused by the step
        name = draw(st.sampled_from(names))
        prefix = draw(st.sampled_from(
            list(BASE_PREFIXES[world.base_kind]) + (["saved_"] if world.is_sam else [])))
        shape = (*world.pool[name].shape, 2)
        state[prefix + name] = np.zeros(shape)
        if prefix in ("m_", "v_"):
            state[("v_" if prefix == "m_" else "m_") + name] = np.zeros(shape)
        if prefix == "saved_" and world.kind == "gsam":
            state["grad0_" + name] = np.ones(shape)
            state["grad_norm0"] = np.array(math.sqrt(sum(
                np.asarray(v).size for k, v in state.items()
                if isinstance(k, str) and k.startswith("grad0_"))) or 1.0)
    elif what == "add_saved" and names:
        for name in names:
            state["saved_" + name] = values_of(world.pool[name]).astype(world.pool[name].dtype)
            if world.kind == "gsam":
                state["grad0_" + name] = np.ones(world.pool[name].shape, world.pool[name].dtype)
        if world.kind == "gsam":
            size = sum(a.size for a in world.pool.values())
            state["grad_norm0"] = np.array(draw(st.sampled_from(
                [math.sqrt(size) or 1.0, 0.0, np.nan])))
    elif what == "drop_partner":
        for key in per:
            if key.startswith(("m_", "grad0_")):
                del state[key]
                break
        _renormalise_grad0(state)
    elif what in ("view", "readonly") and per:
        key = draw(st.sampled_from(per))
        value = state[key]
        if isinstance(value, np.ndarray):
            if what == "view":
                state[key] = R.make_array(values_of(value), value.dtype, "reversed").array
            else:
                value = np.array(value)
                value.setflags(write=False)
                state[key] = value


# ----------------------------------------------------------------------------- the tests

OPS = {  # relative frequencies
    "step": 40, "first_step": 30, "second_step": 30, "sam_step": 20, "restore": 10,
    "compute_gradient_norm": 10, "load_state_dict": 20, "set_lr": 10, "rho": 10,
    "zero_grad": 3,
}
SAM_ONLY = {"first_step", "second_step", "sam_step", "restore", "rho"}


@settings(max_examples=SEQUENCE_EXAMPLES)
@given(world=worlds(), data=st.data())
def test_random_call_sequences(world: World, data: st.DataObject) -> None:
    COUNTS["examples"] += 1
    if TRACE:
        print(f"\n{world!r}")
    pick = st.sampled_from([op for op, weight in OPS.items() for _ in range(weight)
                            if world.is_sam or op not in SAM_ONLY])
    for _ in range(data.draw(st.integers(1, MAX_CALLS))):
        op = data.draw(pick)
        draw = data.draw
        if op in ("step", "first_step", "second_step"):
            do_step(world, draw, op)
        elif op == "sam_step":
            do_sam_step(world, draw)
        elif op == "restore":
            do_restore(world, draw)
        elif op == "compute_gradient_norm":
            do_norm(world, draw)
        elif op == "load_state_dict":
            do_load(world, draw)
        elif op == "set_lr":
            do_set_lr(world, draw)
        elif op == "rho":
            do_set_rho(world, draw)
        else:
            do_zero_grad(world, draw)
        if data.draw(st.integers(0, 4)) == 0:
            world.checkpoints.append(world.state())


CONFIG_FIELDS = {
    "learning_rate": dict(minimum=0.0), "momentum": dict(minimum=0.0),
    "beta1": dict(minimum=0.0, below=1.0), "beta2": dict(minimum=0.0, below=1.0),
    "epsilon": dict(above=0.0), "weight_decay": dict(minimum=0.0), "grad_clip": dict(above=0.0),
}
GOOD_FIELD_VALUES = [0.0, 0.5, 0.9, 1e-8, 0.001, 2, np.float32(0.25), Fraction(1, 3)]


@settings(max_examples=CONSTRUCTOR_EXAMPLES)
@given(data=st.data())
def test_random_constructors(data: st.DataObject) -> None:
    """OptimizerConfig, the base optimizers, SamOptimizer and GsamOptimizer with random
    (good and bad) arguments: either built with exactly those values, or a TrainError that
    names the argument and leaves the base optimizer untouched."""
    draw = data.draw
    values = GOOD_FIELD_VALUES + BAD_NUMBERS

    def pick(good: list[Any]) -> Any:
        """Mostly a good value, so that several arguments are rarely all bad at once."""
        return draw(st.sampled_from(good if draw(st.integers(0, 4)) else values))

    what = draw(st.sampled_from(["config", "base", "sam", "gsam"]))
    COUNTS["constructors"] += 1
    expect = Expect()
    if what == "config":
        fields = draw(st.lists(st.sampled_from([*sorted(CONFIG_FIELDS), "grad_clip_mode"]),
                               max_size=3, unique=True))
        kwargs: dict[str, Any] = {}
        for field in fields:
            if field == "grad_clip_mode":
                kwargs[field] = draw(st.sampled_from([GradClipMode.NORM, "norm", None, 1]))
                if not isinstance(kwargs[field], GradClipMode):
                    expect.must_fail(field, "not a GradClipMode")
                continue
            kwargs[field] = pick([0.0, 0.5, 1e-8, 2, np.float32(0.25), Fraction(1, 3)])
            if field in ("grad_clip", "weight_decay") and kwargs[field] is None:
                continue  # None is valid: no clipping; the optimizer's own weight decay
            if not real_ok(kwargs[field], **CONFIG_FIELDS[field]):
                expect.must_fail(field, f"{field}={kwargs[field]!r}")

        def build() -> Any:
            return OptimizerConfig(**kwargs)

        def verify(cfg: Any) -> None:
            for field, value in kwargs.items():
                got = getattr(cfg, field)
                if field == "grad_clip_mode" or value is None:
                    assert got is value, (field, got)
                else:
                    assert type(got) is float and got == float(value), (field, got)
    elif what == "base":
        cls = draw(st.sampled_from([SgdOptimizer, AdamOptimizer, AdamWOptimizer]))
        arg = draw(st.sampled_from([OptimizerConfig(), None, {}, "cfg", 0.1]))
        if arg is not None and not isinstance(arg, OptimizerConfig):
            expect.must_fail("config", "not an OptimizerConfig")

        def build() -> Any:
            return cls(arg)

        def verify(opt: Any) -> None:
            assert opt.get_lr() == 1e-3 and opt.state_dict()["lr"] == 1e-3
    else:
        base = draw(st.sampled_from(["sgd", "adam", "foreign", "none", "object"]))
        base_opt: Any = {"sgd": SgdOptimizer(), "adam": AdamOptimizer(),
                         "foreign": Foreign(SgdOptimizer()), "none": None,
                         "object": object()}[base]
        if base in ("none", "object"):
            expect.must_fail("base_optimizer", "not an Optimizer")
        rho = pick(RHO_VALUES)
        if not real_ok(rho, above=0.0):
            expect.must_fail(("rho", "rho_max"), f"rho={rho!r}")
        interval = draw(st.sampled_from([1, 1, 1, 2, 0, -1, 1.0, True, "1", None, np.int64(2)]))
        if isinstance(interval, np.integer):
            expect.may_fail("interval", "a NumPy integer interval")
        elif isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            expect.must_fail("interval", f"interval={interval!r}")
        kwargs = {"interval": interval}
        eps = pick([0.0, 1e-12, 0.1])
        kwargs["eps"] = eps
        if not real_ok(eps, minimum=0.0):
            expect.must_fail("eps", f"eps={eps!r}")
        if what == "sam":
            adaptive = draw(st.sampled_from([False, True, False, True, 1, None, np.bool_(True)]))
            eta = pick([0.0, 0.01])
            kwargs.update(adaptive=adaptive, eta=eta)
            if isinstance(adaptive, np.bool_):
                expect.may_fail("adaptive", "a NumPy bool")
            elif not isinstance(adaptive, bool):
                expect.must_fail("adaptive", f"adaptive={adaptive!r}")
            if not real_ok(eta, minimum=0.0):
                expect.must_fail("eta", f"eta={eta!r}")

            def build() -> Any:
                return SamOptimizer(base_opt, rho, **kwargs)
        else:
            rho_min = pick([None, 0.01, 1.0])
            alpha = pick([0.0, 0.4, 2])
            lr_min = pick([0.0, 1e-5, 1.0])
            kwargs.update(lr_min=lr_min)
            if rho_min is not None:
                if not real_ok(rho_min, above=0.0):
                    expect.must_fail("rho_min", f"rho_min={rho_min!r}")
                elif real_ok(rho, above=0.0) and float(rho_min) > float(rho):
                    expect.must_fail("rho_min", "rho_min > rho_max")
            if not real_ok(alpha, minimum=0.0):
                expect.must_fail("alpha", f"alpha={alpha!r}")
            if not real_ok(lr_min, minimum=0.0):
                expect.must_fail("lr_min", f"lr_min={lr_min!r}")

            def build() -> Any:
                return GsamOptimizer(base_opt, rho, rho_min, alpha, **kwargs)

        def verify(opt: Any) -> None:
            assert opt.base_optimizer is base_opt
            rho_max = opt.rho_max if what == "gsam" else opt.rho
            assert rho_max == float(rho) and opt.interval == interval
            assert not opt.pending and opt.state_dict()["rho"] == float(rho)

    base_snap = None
    if what in ("sam", "gsam") and hasattr(base_opt, "state_dict"):
        base_snap = (R.state_snapshot(base_opt.state_dict()), base_opt.get_lr())
    try:
        built = build()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if not isinstance(e, TrainError):
            pytest.fail(f"{what}: raised {type(e).__module__}.{type(e).__name__}: {e} "
                        f"(expected: {expect.why() or 'success'})")
        assert "train" in expect.allowed, f"{what}: {e!r}, but SPEC says it must succeed"
        check_error(e, expect, what)
        COUNTS[f"call:ctor_{what}:error"] += 1
    else:
        assert "ok" in expect.allowed, f"{what}: built, but SPEC says: {expect.why()}"
        verify(built)
        COUNTS[f"call:ctor_{what}:ok"] += 1
    if base_snap is not None:
        assert (R.state_snapshot(base_opt.state_dict()), base_opt.get_lr()) == base_snap


# ----------------------------------------------------------------------------- regressions
# Minimal reproducers of what the fuzzer found, so each shows up as its own failure.


def _expect_train_error(call: Callable[[], Any]) -> TrainError:
    try:
        call()
    except TrainError as e:
        return e
    except BaseException as e:
        pytest.fail(f"expected a TrainError, got {type(e).__module__}.{type(e).__name__}: {e}")
    pytest.fail("expected a TrainError, nothing raised")


@pytest.mark.parametrize("cls", [SgdOptimizer, AdamOptimizer, AdamWOptimizer])
@pytest.mark.parametrize("state", [None, ["lr", "t"], 3], ids=["None", "list", "int"])
def test_base_load_state_dict_rejects_non_mappings(cls: type, state: Any) -> None:
    opt = cls()
    before = R.state_snapshot(opt.state_dict())
    _expect_train_error(lambda: opt.load_state_dict(state))
    assert R.state_snapshot(opt.state_dict()) == before


@pytest.mark.parametrize("method", ["second_step", "restore"])
def test_pending_names_check_with_non_str_keys(method: str) -> None:
    sam = SamOptimizer(SgdOptimizer(), 0.1)
    params = {"a": np.ones(3)}
    sam.first_step(params, {"a": np.ones(3)})
    bad = {"a": params["a"], 7: np.ones(1), "b": np.ones(1)}
    before = params["a"].copy()
    if method == "second_step":
        _expect_train_error(lambda: sam.second_step(bad, {}))
    else:
        _expect_train_error(lambda: sam.restore(bad))
    assert sam.pending and params["a"].tobytes() == before.tobytes()


@pytest.mark.parametrize("call", ["set_lr", "rho", "config", "sam"])
def test_huge_int_hyperparameter_is_a_train_error(call: str) -> None:
    huge = 10**400  # a Python int no float can hold: not finite
    if call == "set_lr":
        opt = SgdOptimizer()
        _expect_train_error(lambda: opt.set_lr(huge))
        assert opt.get_lr() == 1e-3
    elif call == "rho":
        sam = SamOptimizer(SgdOptimizer(), 0.1)
        _expect_train_error(lambda: setattr(sam, "rho", huge))
        assert sam.rho == 0.1
    elif call == "config":
        _expect_train_error(lambda: OptimizerConfig(learning_rate=huge))
    else:
        _expect_train_error(lambda: SamOptimizer(SgdOptimizer(), huge))


@pytest.mark.parametrize("key", ["t", "sam_calls"])
def test_counter_beyond_int64_never_breaks_state_dict(key: str) -> None:
    """A loaded t / sam_calls too large for the int64 that state_dict() stores is either
    refused by load_state_dict or kept loadable: state_dict() must not raise afterwards."""
    opt: Any = SamOptimizer(AdamOptimizer(), 0.1)
    state = {"lr": np.array(0.1), "t": np.array(3), "rho": np.array(0.1), key: 2**70}
    try:
        opt.load_state_dict(state)
    except TrainError:
        return
    opt.state_dict()


def test_sam_step_while_first_step_pending_is_an_error() -> None:
    """With interval=2 the second sam_step call is a plain base step. Made while a
    first_step is pending, it used to step from the perturbed point and leave the
    perturbation pending: the next second_step then restored the pre-first_step values and
    silently discarded that base step (while its momentum was kept)."""
    cfg = OptimizerConfig(learning_rate=0.1, momentum=0.0)
    sam = SamOptimizer(SgdOptimizer(cfg), 0.5, interval=2)
    params = {"a": np.zeros(2)}
    grads = {"a": np.ones(2)}
    sam.sam_step(params, lambda p: (0.0, grads))  # call 0: a SAM step
    sam.first_step(params, grads)
    snap = params["a"].copy()
    state = R.state_snapshot(sam.state_dict())
    _expect_train_error(lambda: sam.sam_step(params, lambda p: (0.0, grads)))
    assert params["a"].tobytes() == snap.tobytes()
    assert R.state_snapshot(sam.state_dict()) == state


class _RaisingBase(Foreign):
    """A Python base optimizer whose step fails before touching anything."""

    def step(self, params: Any, grads: Any) -> None:
        raise RuntimeError("base optimizer failed")


@pytest.mark.parametrize("cls", [SamOptimizer, GsamOptimizer])
def test_python_base_failing_in_second_step_changes_nothing(cls: type) -> None:
    """SPEC "Errors" and README ("SAM swaps ... so it can swap back if the base raises"):
    when a Python-written base optimizer raises in second_step, the parameters stay
    perturbed, the step stays pending, and restore() then gives the original values."""
    sam = cls(_RaisingBase(SgdOptimizer()), 0.1)
    params = {"a": np.linspace(-1.0, 1.0, 5), "b": np.ones((2, 2), np.float32)}
    original = {k: v.copy() for k, v in params.items()}
    sam.first_step(params, {"a": np.ones(5), "b": np.ones((2, 2))})
    perturbed = {k: v.copy() for k, v in params.items()}
    state = R.state_snapshot(sam.state_dict())
    with pytest.raises(RuntimeError):
        sam.second_step(params, {"a": np.ones(5), "b": np.ones((2, 2))})
    for k in params:
        assert params[k].tobytes() == perturbed[k].tobytes(), f"{k!r} changed"
    assert sam.pending
    assert R.state_snapshot(sam.state_dict()) == state
    sam.restore(params)
    for k in params:
        assert params[k].tobytes() == original[k].tobytes()
