"""A plain float64 NumPy reference for samopt, written from SPEC.md's formulas.

It does not use samopt. Everything here is float64 and loops over dicts: simple over fast.

Conventions, as in SPEC.md and the API contract:
- a gradient is first converted to its parameter's dtype (that is what samopt does), then
  everything is computed in float64 (`to_ref_grads`);
- state keys: SGD `lr`, `velocity_<name>`; Adam/AdamW `lr`, `t`, `m_<name>`, `v_<name>`;
  SAM adds `rho` and `saved_<name>` while a perturbation is pending; GSAM (issue 4) also
  `grad0_<name>` and `grad_norm0`; sam_step's counter is `sam_calls`;
- state entries are created (zeros) at a parameter's first step.

The second half of this file holds small helpers the tests share (array builders,
snapshots, comparisons against the reference); they are not part of the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------


def to_ref_grads(
    grads: Mapping[str, np.ndarray], param_dtypes: Mapping[str, np.dtype]
) -> dict[str, np.ndarray]:
    """Gradients as samopt sees them: converted to the parameter dtype, then float64.

    Only the names in `param_dtypes` are kept (gradients of absent names are ignored).
    """
    return {
        k: np.asarray(grads[k]).astype(param_dtypes[k]).astype(np.float64)
        for k in param_dtypes
    }


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all elements of all arrays, float64."""
    total = 0.0
    for g in grads.values():
        total += float(np.sum(np.asarray(g, dtype=np.float64) ** 2))
    return math.sqrt(total)


def clip_grads(
    grads: Mapping[str, np.ndarray], clip: float | None, mode: str
) -> dict[str, np.ndarray]:
    """SPEC "Clipping": VALUE clamps each element to [-c, c]; NORM scales every gradient
    by c/||g|| when the global norm ||g|| exceeds c. Works on copies."""
    out = {k: np.array(g, dtype=np.float64, copy=True) for k, g in grads.items()}
    if clip is None:
        return out
    if mode == "value":
        return {k: np.clip(g, -clip, clip) for k, g in out.items()}
    if mode == "norm":
        n = global_norm(out)
        if n > clip:
            return {k: g * (clip / n) for k, g in out.items()}
        return out
    raise ValueError(mode)


class RefSGD:
    """g <- g + wd*p (L2, after clipping) ; v <- mu*v + lr*g ; p <- p - v, or with Nesterov
    momentum p <- p - (lr*g + mu*v) (PyTorch's nesterov=True written in the crate's form).
    `groups` maps a parameter name to overrides of lr, momentum, weight_decay, nesterov."""

    def __init__(self, lr: float, momentum: float, clip: float | None = None,
                 clip_mode: str = "value", weight_decay: float = 0.0,
                 nesterov: bool = False,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.lr = lr
        self.momentum = momentum
        self.clip = clip
        self.clip_mode = clip_mode
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.groups = dict(groups or {})
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        for k in params:
            h = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                 "nesterov": self.nesterov, **self.groups.get(k, {})}
            if k not in self.velocity:
                self.velocity[k] = np.zeros(params[k].shape)
            gk = g[k] + h["weight_decay"] * params[k]
            self.velocity[k] = h["momentum"] * self.velocity[k] + h["lr"] * gk
            step = h["lr"] * gk + h["momentum"] * self.velocity[k] if h["nesterov"] \
                else self.velocity[k]
            params[k] = params[k] - step

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr)}
        for k, v in self.velocity.items():
            out["velocity_" + k] = v.copy()
        return out


class RefAdam:
    """t <- t+1 ; g <- g + wd*p (Adam's L2, after clipping) ;
    lr_t = lr*sqrt(1-b2^t)/(1-b1^t) ; m <- b1*m + (1-b1)*g ; v <- b2*v + (1-b2)*g^2 ;
    p <- p - lr_t*m/(sqrt(v)+eps), and for AdamW (decoupled, no L2) - lr*wd*p_old.
    `groups` maps a parameter name to overrides of lr, beta1, beta2, eps, weight_decay."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float = 0.0, decoupled: bool = False,
                 clip: float | None = None, clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.clip = clip
        self.clip_mode = clip_mode
        self.groups = dict(groups or {})
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        self.t += 1
        t = self.t
        for k in params:
            h = {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                 "weight_decay": self.weight_decay, **self.groups.get(k, {})}
            lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
            lr_t = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
            if k not in self.m:
                self.m[k] = np.zeros(params[k].shape)
                self.v[k] = np.zeros(params[k].shape)
            p_old = params[k]
            gk = g[k] if self.decoupled else g[k] + h["weight_decay"] * p_old
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * gk
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * gk * gk
            new = p_old - lr_t * self.m[k] / (np.sqrt(self.v[k]) + h["eps"])
            if self.decoupled:
                new = new - lr * h["weight_decay"] * p_old
            params[k] = new

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr), "t": np.array(self.t, dtype=np.int64)}
        for k in self.m:
            out["m_" + k] = self.m[k].copy()
            out["v_" + k] = self.v[k].copy()
        return out


def effective_weight_decay(kind: str, weight_decay: float | None) -> float:
    """SPEC: weight_decay None is the optimizer's own default, 0 for SGD and Adam and
    0.01 for AdamW; an explicit value is applied as it is."""
    if weight_decay is not None:
        return weight_decay
    return 0.01 if kind == "adamw" else 0.0


def RefAdamW(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             clip: float | None = None, clip_mode: str = "value") -> RefAdam:
    return RefAdam(lr, beta1, beta2, eps, weight_decay, decoupled=True, clip=clip,
                   clip_mode=clip_mode)


class RefSAM:
    """first_step: n = ||g|| (or ||T*g|| with T = |p|+eta when adaptive); if n == 0 nothing
    happens; else save p and p <- p + rho*g/n (or rho*T^2*g/n).
    second_step: p <- saved; base.step(p, g)."""

    def __init__(self, base: Any, rho: float, adaptive: bool = False,
                 eta: float = 0.0) -> None:
        self.base = base
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.saved: dict[str, np.ndarray] | None = None

    def first_step(self, params: dict[str, np.ndarray],
                   grads: Mapping[str, np.ndarray]) -> None:
        assert self.saved is None
        if self.adaptive:
            scale = {k: np.abs(params[k]) + self.eta for k in params}
            n = global_norm({k: scale[k] * grads[k] for k in params})
        else:
            n = global_norm({k: grads[k] for k in params})
        if n == 0.0:
            return
        self.saved = {k: params[k].copy() for k in params}
        for k in params:
            if self.adaptive:
                params[k] = params[k] + self.rho * scale[k] * scale[k] * grads[k] / n
            else:
                params[k] = params[k] + self.rho * grads[k] / n

    def second_step(self, params: dict[str, np.ndarray],
                    grads: Mapping[str, np.ndarray]) -> None:
        if self.saved is not None:
            for k in params:
                params[k] = self.saved[k].copy()
            self.saved = None
        self.base.step(params, grads)

    step = second_step

    def state_dict(self) -> dict[str, np.ndarray]:
        out = self.base.state_dict()
        out["rho"] = np.array(self.rho)
        if self.saved is not None:
            for k, v in self.saved.items():
                out["saved_" + k] = v.copy()
        return out


class RefGroupedSAM(RefSAM):
    """SAM with parameter groups, davda54/sam's way: `groups` maps a name to overrides of
    rho, adaptive, eta and perturb. n is the norm over the perturbed names only (each
    weighted by its own T when adaptive); each moves by its own rho*(T^2)*g/n; a name with
    perturb False is neither moved nor counted (its value is kept, the restore is exact)."""

    def __init__(self, base: Any, rho: float, adaptive: bool = False, eta: float = 0.0,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__(base, rho, adaptive, eta)
        self.groups = dict(groups or {})

    def hyper(self, name: str) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive, "eta": self.eta, "perturb": True,
                **self.groups.get(name, {})}

    def first_step(self, params: dict[str, np.ndarray],
                   grads: Mapping[str, np.ndarray]) -> None:
        assert self.saved is None
        h = {k: self.hyper(k) for k in params}
        moved = [k for k in params if h[k]["perturb"]]
        scale = {k: (np.abs(params[k]) + h[k]["eta"]) if h[k]["adaptive"] else 1.0
                 for k in moved}
        n = global_norm({k: scale[k] * grads[k] for k in moved})
        if n == 0.0:
            return
        self.saved = {k: params[k].copy() for k in params}
        for k in moved:
            params[k] = params[k] + h[k]["rho"] * scale[k] * scale[k] * grads[k] / n


# --------------------------------------------------------------------------------------
# SAM in practice (issue 4): eps, sam_step with interval, GSAM
#
# Written from the issue and the papers: davda54/sam's `scale = rho / (grad_norm + 1e-12)`
# for eps; Zhuang et al. (ICLR 2022), Algorithm 1, for GSAM. Same conventions as above
# (float64, gradients already passed through `to_ref_grads`).
# --------------------------------------------------------------------------------------


def global_dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """sum over all arrays of sum(a*b), float64 (a and b have the same keys)."""
    total = 0.0
    for k in a:
        total += float(np.sum(np.asarray(a[k], dtype=np.float64) *
                              np.asarray(b[k], dtype=np.float64)))
    return total


def scaled_norm(grads: Mapping[str, np.ndarray]) -> float:
    """The global L2 norm computed as m*||g/m|| with m = max|g|: no overflow or underflow
    of the squares for any finite input (1e-200 and 1e200 stay representable)."""
    m = max((float(np.max(np.abs(np.asarray(g, dtype=np.float64)), initial=0.0))
             for g in grads.values()), default=0.0)
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * global_norm({k: np.asarray(g, dtype=np.float64) / m for k, g in grads.items()})


def sam_perturbation(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                     rho: float, eps: float = 0.0, adaptive: bool = False,
                     eta: float = 0.0) -> tuple[dict[str, np.ndarray] | None, float]:
    """SAM's ascent e = rho*g/(n + eps), n = ||g|| (davda54/sam with eps = 1e-12); adaptive:
    T = |p| + eta, n = ||T*g||, e = rho*T^2*g/(n + eps). Returns (e, n); e is None when
    n == 0 (nothing moves)."""
    if adaptive:
        scale = {k: np.abs(np.asarray(params[k], dtype=np.float64)) + eta for k in params}
        n = scaled_norm({k: scale[k] * grads[k] for k in params})
    else:
        scale = {k: 1.0 for k in params}
        n = scaled_norm({k: grads[k] for k in params})
    if n == 0.0:
        return None, n
    # g/(n + eps) first: exact-ish even for subnormal g (rho*g first would round there)
    return {k: rho * (scale[k] * scale[k]) *
            (np.asarray(grads[k], dtype=np.float64) / (n + eps)) for k in params}, n


def gsam_decompose(g0: Mapping[str, np.ndarray], g1: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GSAM's decomposition of g0 with respect to g1 (global dot products over all arrays):
    g0 = par + perp with par = (g0.g1 / ||g1||^2)*g1 and perp = g0 - par, which is
    orthogonal to g1. When g1 == 0 everything of g0 is orthogonal: par = 0, perp = g0.

    Computed as par = (g0.u)*u with u = g1/||g1||, g1 scaled by max|g1| first, so that
    neither ||g1||^2 nor the coefficient over- or underflows (g1 ~ 1e-300, or subnormal)."""
    m1 = max((float(np.max(np.abs(np.asarray(g, dtype=np.float64)), initial=0.0))
              for g in g1.values()), default=0.0)
    if m1 == 0.0:
        par = {k: np.zeros(np.shape(g0[k])) for k in g0}
    else:
        v = {k: np.asarray(g1[k], dtype=np.float64) / m1 for k in g0}
        nv = global_norm(v)
        u = {k: v[k] / nv for k in g0}
        c = global_dot(g0, u)
        par = {k: c * u[k] for k in g0}
    perp = {k: np.asarray(g0[k], dtype=np.float64) - par[k] for k in g0}
    return par, perp


def gsam_gradient(g0: Mapping[str, np.ndarray], g1: Mapping[str, np.ndarray],
                  alpha: float) -> dict[str, np.ndarray]:
    """The gradient GSAM gives the base optimizer: g1 - alpha*g0_perp."""
    _, perp = gsam_decompose(g0, g1)
    return {k: np.asarray(g1[k], dtype=np.float64) - alpha * perp[k] for k in g0}


def gsam_rho(rho_max: float, rho_min: float | None, lr: float, lr_min: float,
             lr_max: float) -> float:
    """GSAM's rho schedule: rho_max without rho_min or when lr_max <= lr_min, else
    rho_min + (rho_max - rho_min)*(lr - lr_min)/(lr_max - lr_min), clamped into
    [rho_min, rho_max] (samopt's documented behaviour for lr outside [lr_min, lr_max])."""
    if rho_min is None or lr_max <= lr_min:
        return rho_max
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return min(rho_max, max(rho_min, rho))


class RefSAMEps(RefSAM):
    """RefSAM with eps added to the norm: p <- p + rho*g/(n + eps) (adaptive likewise)."""

    def __init__(self, base: Any, rho: float, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 0.0) -> None:
        super().__init__(base, rho, adaptive, eta)
        self.eps = eps

    def first_step(self, params: dict[str, np.ndarray],
                   grads: Mapping[str, np.ndarray]) -> None:
        assert self.saved is None
        e, _ = sam_perturbation(params, grads, self.rho, self.eps, self.adaptive, self.eta)
        if e is None:
            return
        self.saved = {k: params[k].copy() for k in params}
        for k in params:
            params[k] = params[k] + e[k]


class RefGSAM:
    """GSAM (Zhuang et al., ICLR 2022) over a reference base optimizer (with an `lr`).

    first_step: g0 = grads, n0 = ||g0||; if n0 == 0 nothing happens; else save p and g0,
    p <- p + rho*g0/(n0 + eps) with rho = gsam_rho(rho_max, rho_min, base.lr, lr_min,
    lr_max), lr_max being the base's lr at construction.
    second_step(g1): p <- saved; base.step(p, g1 - alpha*g0_perp) (a plain base step with
    g1 when nothing is pending). The base clips (if it does) the combined gradient."""

    def __init__(self, base: Any, rho_max: float = 0.05, rho_min: float | None = None,
                 alpha: float = 0.4, lr_min: float = 0.0, eps: float = 0.0) -> None:
        self.base = base
        self.rho_max = rho_max
        self.rho_min = rho_min
        self.alpha = alpha
        self.lr_min = lr_min
        self.lr_max = base.lr
        self.eps = eps
        self.saved: dict[str, np.ndarray] | None = None
        self.grad0: dict[str, np.ndarray] | None = None
        self.grad_norm0 = 0.0

    @property
    def rho(self) -> float:
        return gsam_rho(self.rho_max, self.rho_min, self.base.lr, self.lr_min, self.lr_max)

    def first_step(self, params: dict[str, np.ndarray],
                   grads: Mapping[str, np.ndarray]) -> None:
        assert self.saved is None
        e, n = sam_perturbation(params, grads, self.rho, self.eps)
        if e is None:
            return
        self.saved = {k: params[k].copy() for k in params}
        self.grad0 = {k: np.array(grads[k], dtype=np.float64) for k in params}
        self.grad_norm0 = n  # ||g0||, without eps
        for k in params:
            params[k] = params[k] + e[k]

    def second_step(self, params: dict[str, np.ndarray],
                    grads: Mapping[str, np.ndarray]) -> None:
        if self.saved is None:
            self.base.step(params, grads)
            return
        assert self.grad0 is not None
        for k in params:
            params[k] = self.saved[k].copy()
        combined = gsam_gradient(self.grad0, {k: grads[k] for k in params}, self.alpha)
        self.saved = self.grad0 = None
        self.base.step(params, combined)

    step = second_step

    def state_dict(self) -> dict[str, np.ndarray]:
        out = self.base.state_dict()
        out["rho"] = np.array(self.rho_max)
        if self.saved is not None:
            assert self.grad0 is not None
            for k in self.saved:
                out["saved_" + k] = self.saved[k].copy()
                out["grad0_" + k] = self.grad0[k].copy()
            out["grad_norm0"] = np.array(self.grad_norm0)
        return out


class RefSamStep:
    """sam_step(params, grad_fn) over a reference SAM/GSAM, with `interval`:
    calls 0, k, 2k, ... are SAM steps (grad_fn at p, first_step, grad_fn at the perturbed
    point, second_step); the others a plain base step with the one gradient at p. Returns
    the first loss. `sam_calls` counts the calls."""

    def __init__(self, sam: Any, interval: int = 1) -> None:
        self.sam = sam
        self.interval = interval
        self.calls = 0

    def sam_step(self, params: dict[str, np.ndarray], grad_fn: Any) -> Any:
        loss, grads = grad_fn(params)
        if self.calls % self.interval:
            self.sam.base.step(params, grads)
        else:
            self.sam.first_step(params, grads)
            _, grads2 = grad_fn(params)
            self.sam.second_step(params, grads2)
        self.calls += 1
        return loss

    def state_dict(self) -> dict[str, np.ndarray]:
        out = self.sam.state_dict()
        out["sam_calls"] = np.array(self.calls, dtype=np.int64)
        return out


# --------------------------------------------------------------------------------------
# Helpers shared by the tests (not part of the reference)
# --------------------------------------------------------------------------------------

# State keys samopt may add beyond SPEC.md: SamOptimizer's counter of sam_step calls (for
# its `interval` option, a later extension); 0-d int64, 0 unless sam_step is used.
EXTRA_SAM_KEYS = ("sam_calls",)

FLOAT64_TOL = 1e-12
FLOAT32_TOL = 2e-5

LAYOUTS = ("C", "F", "strided", "reversed", "transposed")


class Holder:
    """An array built in a given memory layout; `array` may be a view into `base`.
    `outside` is a mask of the elements of `base` that are not part of `array`."""

    def __init__(self, array: np.ndarray, base: np.ndarray | None,
                 outside: np.ndarray | None) -> None:
        self.array = array
        self.base = base
        self.outside = outside
        self.outside_values = None if base is None else base[outside].copy()

    def outside_untouched(self) -> bool:
        if self.base is None:
            return True
        return bool(np.array_equal(self.base[self.outside], self.outside_values,
                                   equal_nan=True))


def make_array(values: np.ndarray, dtype: Any, layout: str) -> Holder:
    """An array of `dtype` holding `values` (float64), in the requested memory layout."""
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape
    nd = values.ndim
    if layout == "F":
        return Holder(np.array(values, dtype=dtype, order="F"), None, None)
    if layout == "strided" and nd > 0:
        big = np.full(tuple(2 * d + 1 for d in shape), -7.25, dtype=dtype)
        sl = tuple(slice(1, None, 2) for _ in shape)
        view = big[sl]
        view[...] = values
        outside = np.ones(big.shape, dtype=bool)
        outside[sl] = False
        return Holder(view, big, outside)
    if layout == "reversed" and nd > 0:
        big = np.full((*shape[:-1], shape[-1] + 3), 3.5, dtype=dtype)
        view = big[..., : shape[-1]][..., ::-1]
        view[...] = values
        outside = np.ones(big.shape, dtype=bool)
        outside[..., : shape[-1]] = False
        return Holder(view, big, outside)
    if layout == "transposed" and nd > 1:
        perm = tuple(range(nd))[::-1]
        base = np.empty(tuple(shape[i] for i in perm), dtype=dtype)
        view = base.transpose(np.argsort(perm))
        view[...] = values
        assert view.shape == shape
        return Holder(view, None, None)
    return Holder(np.array(values, dtype=dtype, order="C"), None, None)


def snapshot(d: Mapping[str, Any]) -> dict[str, Any]:
    """A bitwise snapshot of a dict of arrays (or other objects)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            out[k] = ("nd", id(v), v.dtype.str, v.shape,
                      np.ascontiguousarray(v).tobytes() if v.dtype != object
                      else repr(v.tolist()))
        else:
            out[k] = ("obj", id(v), repr(v))
    return out


def assert_same_snapshot(before: Mapping[str, Any], after: Mapping[str, Any],
                         what: str = "") -> None:
    assert list(before.keys()) == list(after.keys()), f"{what}: keys changed"
    for k in before:
        assert before[k] == after[k], f"{what}: {k!r} changed"


def without_extra_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k not in EXTRA_SAM_KEYS}


def state_snapshot(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Bitwise snapshot of a state dict (order-insensitive, dtype-sensitive)."""
    return {k: (np.asarray(v).dtype.str, np.asarray(v).shape,
                np.ascontiguousarray(v).tobytes())
            for k, v in sorted(state.items())}


class ScaleTracker:
    """The largest max|ref| each array (param or state entry) has had so far.

    Used as the denominator of the relative error: a value that passes near zero (a 0-d
    Adam moment whose gradients cancel, a weight crossing zero) carries the rounding error
    of the larger values it was computed from, and dividing that by its own tiny size
    would measure the cancellation, not samopt."""

    def __init__(self) -> None:
        self.hist: dict[str, float] = {}

    def update(self, arrays: Mapping[str, np.ndarray], prefix: str = "") -> None:
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.size and v.dtype.kind == "f":
                m = float(np.max(np.abs(v)))
                key = prefix + k
                if not m <= self.hist.get(key, 0.0):
                    self.hist[key] = m

    def get(self, key: str) -> float:
        return self.hist.get(key, 0.0)


def rel_err(x: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    """max|x - ref| / max(max|ref|, floor); when that is zero, x must equal ref exactly."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ref.size == 0:
        return 0.0
    diff = float(np.max(np.abs(x - ref)))
    if math.isnan(diff):
        return math.inf
    scale = max(float(np.max(np.abs(ref))), floor)
    if scale == 0.0:
        return diff * 1e300 if diff else 0.0  # zero reference: must be exactly zero
    return diff / scale


def tol_for(dtype: Any, f64_tol: float = FLOAT64_TOL) -> float:
    return f64_tol if np.dtype(dtype) == np.float64 else FLOAT32_TOL


def coupled_f64_tol(params: Mapping[str, np.ndarray], coupled: bool) -> float:
    """The tolerance for float64 arrays. When one array's update depends on the values of
    the others' parameters (adaptive SAM's norm over |p|*g, or gradients that are functions
    of the params entering a global norm), float32 parameters in the same dict, stored
    rounded, pass their float32-level deviation from the float64 reference on to the
    float64 ones: those then get the float32 tolerance."""
    if coupled and any(p.dtype == np.float32 and p.size for p in params.values()):
        return FLOAT32_TOL
    return FLOAT64_TOL


def assert_params_close(params: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                        what: str = "", f64_tol: float = FLOAT64_TOL,
                        scales: ScaleTracker | None = None) -> None:
    for k, p in params.items():
        assert p.shape == ref[k].shape, f"{what} {k!r}: shape"
        e = rel_err(p, ref[k], scales.get("param:" + k) if scales else 0.0)
        assert e <= tol_for(p.dtype, f64_tol), (
            f"{what} param {k!r} ({p.dtype}): rel err {e:.3g}")


def state_key_param(key: str, param_names: Any) -> str | None:
    for prefix in ("velocity_", "m_", "v_", "saved_"):
        if key.startswith(prefix) and key[len(prefix):] in param_names:
            return key[len(prefix):]
    return None


def assert_state_close(state: Mapping[str, np.ndarray], ref_state: Mapping[str, np.ndarray],
                       params: Mapping[str, np.ndarray], what: str = "",
                       f64_tol: float = FLOAT64_TOL,
                       scales: ScaleTracker | None = None) -> None:
    """samopt's state_dict against the reference's.

    Scalars (lr, t, rho) must match exactly with dtypes float64 / int64 / float64; per-
    parameter arrays must have the parameter's dtype and shape and agree within SPEC's
    tolerance. Entries for size-0 parameters may be absent (nothing to store)."""
    assert isinstance(state, dict), f"{what}: state_dict() is not a dict"
    for k in ref_state:
        pk = state_key_param(k, params)
        if k not in state:
            assert pk is not None and params[pk].size == 0, f"{what}: missing key {k!r}"
    for k, v in state.items():
        if k in EXTRA_SAM_KEYS and "rho" in ref_state:
            assert v.shape == () and v.dtype == np.int64 and int(v) == 0, f"{what}: {k!r}"
            continue
        assert k in ref_state, f"{what}: unexpected state key {k!r}"
        assert isinstance(v, np.ndarray), f"{what}: {k!r} is not an ndarray"
        r = ref_state[k]
        if k in ("lr", "rho"):
            assert v.shape == () and v.dtype == np.float64, f"{what}: {k!r} {v.dtype}{v.shape}"
            assert float(v) == float(r), f"{what}: {k!r} = {float(v)!r}, expected {float(r)!r}"
        elif k == "t":
            assert v.shape == () and v.dtype == np.int64, f"{what}: t is {v.dtype}{v.shape}"
            assert int(v) == int(r), f"{what}: t = {int(v)}, expected {int(r)}"
        else:
            pk = state_key_param(k, params)
            assert pk is not None
            p = params[pk]
            assert v.dtype == p.dtype, f"{what}: {k!r} has dtype {v.dtype}, param {p.dtype}"
            assert v.shape == p.shape, f"{what}: {k!r} has shape {v.shape}, param {p.shape}"
            e = rel_err(v, r, scales.get("state:" + k) if scales else 0.0)
            assert e <= tol_for(p.dtype, f64_tol), (
                f"{what}: state {k!r} ({p.dtype}) rel err {e:.3g}")
