"""A plain float64 NumPy reference for the SAM family, written from the papers' algorithms
(and, for the random draws, from the generator's definition in the README), not from
samopt's code. Gradients are passed through `reference.to_ref_grads` by the tests, as
samopt converts them to the parameters' dtypes.

Every reference takes a base optimizer from tests/reference.py (`RefSGD`, `RefAdam`) and
parameter groups as in `RefGroupedSAM`: `groups` maps a name to overrides of `rho` and
`perturb`; the ascent's norm runs over the perturbed names, each moved by its own rho.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from reference import global_dot, global_norm

Arrays = dict[str, np.ndarray]
GradFn = Callable[[Arrays], tuple[float, Mapping[str, np.ndarray]]]


def centralize(g: np.ndarray) -> np.ndarray:
    """Gradient centralisation (Yong et al., 2020): for an array of two or more dimensions,
    the mean over every axis but the first is removed from each slice along the first."""
    g = np.asarray(g, dtype=np.float64)
    if g.ndim < 2:
        return g.copy()
    return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)


class Ascent:
    """SAM's ascent with davda54/sam's groups: `e_k = rho_k·d_k/n` over the perturbed
    names, n given or the norm of d over them; saved values restored exactly."""

    def __init__(self, rho: float, groups: Mapping[str, Mapping[str, Any]] | None = None,
                 eps: float = 0.0) -> None:
        self.rho = rho
        self.eps = eps
        self.groups = dict(groups or {})
        self.saved: Arrays | None = None

    def hyper(self, name: str) -> dict[str, Any]:
        return {"rho": self.rho, "perturb": True, **self.groups.get(name, {})}

    def moved(self, params: Mapping[str, np.ndarray]) -> list[str]:
        return [k for k in params if self.hyper(k)["perturb"]]

    def perturb(self, params: Arrays, d: Mapping[str, np.ndarray],
                norm: float | None = None, factor: float = 1.0) -> None:
        """p ← p + factor·rho_k·d_k/(n + eps); nothing moves when d is zero over the
        perturbed names."""
        moved = self.moved(params)
        if global_norm({k: d[k] for k in moved}) == 0.0:
            return
        n = global_norm({k: d[k] for k in moved}) if norm is None else norm
        self.saved = {k: params[k].copy() for k in params}
        for k in moved:
            params[k] = params[k] + factor * self.hyper(k)["rho"] * (d[k] / (n + self.eps))

    def restore(self, params: Arrays) -> None:
        if self.saved is not None:
            for k in params:
                params[k] = self.saved[k].copy()
            self.saved = None


class RefFamilySAM:
    """SAM (Foret et al.) and GCSAM (Hassan et al., 2025: the ascent follows the
    centralised gradient, `e = rho·g_c/‖g_c‖`; the base steps with the gradient at the
    perturbed point), and m-sharpness: each sub-batch's ascent from w, its gradient at its
    own perturbed point, the mean of those, one base step."""

    def __init__(self, base: Any, rho: float, centralized: bool = False,
                 groups: Mapping[str, Mapping[str, Any]] | None = None,
                 interval: int = 1) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.centralized = centralized
        self.interval = interval
        self.calls = 0

    def direction(self, g: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> Arrays:
        return {k: centralize(g[k]) if self.centralized else np.asarray(g[k]) for k in params}

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        return self.sam_step_splits(params, [grad_fn])[0]

    def sam_step_splits(self, params: Arrays, grad_fns: Sequence[GradFn]) -> list[Any]:
        sam_call = self.calls % self.interval == 0
        total = {k: np.zeros(params[k].shape) for k in params}
        losses = []
        for fn in grad_fns:
            loss, g = fn(params)
            losses.append(loss)
            if sam_call:
                self.ascent.perturb(params, self.direction(g, params))
                _, g = fn(params)
                self.ascent.restore(params)
            for k in params:
                total[k] = total[k] + np.asarray(g[k], dtype=np.float64)
        self.base.step(params, {k: total[k] / len(grad_fns) for k in params})
        self.calls += 1
        return losses


class RefLookSAM:
    """LookSAM (Liu et al., CVPR 2022), Algorithm 1, with whole-model norms: at steps
    t ≡ 0 (mod k) `g_s = ∇L(w + rho·g/‖g‖)`, `g_v = g_s − ‖g_s‖·cos θ·g/‖g‖` with
    `cos θ = g·g_s/(‖g‖‖g_s‖)`, and the base steps with g_s; otherwise it steps with
    `g + alpha·(‖g‖/‖g_v‖)·g_v`."""

    def __init__(self, base: Any, rho: float, k: int, alpha: float,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.k = k
        self.alpha = alpha
        self.gv: Arrays | None = None
        self.gs: Arrays = {}
        self.calls = 0

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        loss, g = grad_fn(params)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        if self.calls % self.k == 0:
            self.ascent.perturb(params, g)
            _, gs = grad_fn(params)
            self.ascent.restore(params)
            gs = {k: np.asarray(gs[k], dtype=np.float64) for k in params}
            self.gs = gs
            n, ns = global_norm(g), global_norm(gs)
            if n > 0 and ns > 0:
                cos = global_dot(g, gs) / (n * ns)
                self.gv = {k: gs[k] - ns * cos * g[k] / n for k in params}
            else:
                self.gv = {k: gs[k].copy() for k in params}
            self.base.step(params, gs)
        elif self.gv is None:
            self.base.step(params, g)
        else:
            nv = global_norm(self.gv)
            factor = self.alpha * global_norm(g) / nv if nv > 0 else 0.0
            self.base.step(params, {k: g[k] + factor * self.gv[k] for k in params})
        self.calls += 1
        return loss


# The family's counter-based generator (README, "The SAM family"): SplitMix64's
# finaliser, FNV-1a of the name, key = mix(mix(seed ^ mix(draw)) ^ name_key), element i's
# number in [0, 1) = (mix(key + (i+1)·0x9E3779B97F4A7C15) >> 11)·2^-53, in C order.
_U64 = (1 << 64) - 1


def mix64(z: Any) -> Any:
    """On Python ints or uint64 arrays (whose arithmetic wraps)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def name_key(name: str) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _U64
    return h


def uniforms(seed: int, draw: int, key: int, size: int) -> np.ndarray:
    k = mix64(mix64(seed ^ mix64(draw)) ^ key)
    index = np.arange(1, size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = mix64(np.uint64(k) + index * np.uint64(0x9E3779B97F4A7C15))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def bernoulli_mask(seed: int, draw: int, name: str, shape: tuple[int, ...],
                   beta: float) -> np.ndarray:
    size = math.prod(shape)
    return (uniforms(seed, draw, name_key(name), size) < beta).reshape(shape)


class RefESAM:
    """ESAM's stochastic weight perturbation (Du et al., ICLR 2022):
    `e = (rho/beta)·m⊙g/‖g‖`, `m_i ~ Bernoulli(beta)` drawn afresh at each ascent, ‖g‖
    over the perturbed names; the base steps with the gradient at w + e."""

    def __init__(self, base: Any, rho: float, beta: float, seed: int,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.beta = beta
        self.seed = seed
        self.draws = 0

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        loss, g = grad_fn(params)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        masked = {k: g[k] * bernoulli_mask(self.seed, self.draws, k, g[k].shape, self.beta)
                  for k in params}
        self.draws += 1
        norm = global_norm({k: g[k] for k in self.ascent.moved(params)})
        self.ascent.perturb(params, masked, norm=norm, factor=1.0 / self.beta)
        _, g2 = grad_fn(params)
        self.ascent.restore(params)
        self.base.step(params, g2)
        return loss


class RefRandomizedSAM:
    """Each call is a SAM step with probability p (u < p, u the generator's draw number
    `call` at name key 0, element 0), else one base step with the gradient at w."""

    def __init__(self, sam: RefFamilySAM, p: float | Callable[[int], float], seed: int) -> None:
        self.sam = sam
        self.p = p
        self.seed = seed
        self.calls = 0

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        p = self.p(self.calls) if callable(self.p) else self.p
        u = float(uniforms(self.seed, self.calls, 0, 1)[0])
        if u < p:
            loss = self.sam.sam_step(params, grad_fn)
        else:
            loss, g = grad_fn(params)
            self.sam.base.step(params, g)
        self.calls += 1
        return loss


class RefWSAM:
    """WSAM (Yue et al., KDD 2023): with alpha = gamma/(1 - gamma) and g~ the gradient at
    w + e (SAM's ascent), decoupled: the base steps with g, then
    w <- w - lr*alpha*(g~ - g) (lr each name's); coupled: the base steps with
    (1 - alpha)*g + alpha*g~."""

    def __init__(self, base: Any, rho: float, gamma: float, decouple: bool,
                 lrs: Mapping[str, float] | float,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.alpha = gamma / (1.0 - gamma)
        self.decouple = decouple
        self.lrs = lrs

    def lr(self, name: str) -> float:
        return self.lrs if isinstance(self.lrs, float) else self.lrs[name]

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        loss, g = grad_fn(params)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        self.ascent.perturb(params, g)
        _, gt = grad_fn(params)
        self.ascent.restore(params)
        a = self.alpha
        if self.decouple:
            self.base.step(params, g)
            for k in params:
                params[k] = params[k] - self.lr(k) * a * (gt[k] - g[k])
        else:
            self.base.step(params, {k: (1 - a) * g[k] + a * gt[k] for k in params})
        return loss


class RefFisherSAM:
    """Fisher SAM (Kim et al., ICML 2022): f = 1 + eta*g^2 (the mini-batch gradient's
    squares), e = rho*g/f / sqrt(sum g^2/f) over the perturbed names."""

    def __init__(self, base: Any, rho: float, eta: float,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.eta = eta

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        loss, g = grad_fn(params)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        d = {k: g[k] / (1.0 + self.eta * g[k] ** 2) for k in params}
        moved = self.ascent.moved(params)
        self.ascent.perturb(params, d, norm=math.sqrt(global_dot(
            {k: g[k] for k in moved}, {k: d[k] for k in moved})))
        _, g2 = grad_fn(params)
        self.ascent.restore(params)
        self.base.step(params, g2)
        return loss


class RefFriendlySAM:
    """F-SAM (Li et al., CVPR 2024), the paper's equations: m <- lmbda*m + (1-lmbda)*g
    (m starting at 0), d = g - sigma*m, e = rho*d/||d||."""

    def __init__(self, base: Any, rho: float, sigma: float, lmbda: float,
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.ascent = Ascent(rho, groups)
        self.sigma = sigma
        self.lmbda = lmbda
        self.m: Arrays = {}

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        loss, g = grad_fn(params)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        self.m = {k: self.lmbda * self.m.get(k, np.zeros(g[k].shape)) + (1 - self.lmbda) * g[k]
                  for k in params}
        self.ascent.perturb(params, {k: g[k] - self.sigma * self.m[k] for k in params})
        _, g2 = grad_fn(params)
        self.ascent.restore(params)
        self.base.step(params, g2)
        return loss


def normals(seed: int, draw: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal numbers by Box-Muller on the generator's uniform numbers 2i, 2i+1."""
    size = math.prod(shape)
    u = uniforms(seed, draw, name_key(name), 2 * size)
    z = np.sqrt(-2.0 * np.log(1.0 - u[0::2])) * np.cos(2.0 * np.pi * u[1::2])
    return z.reshape(shape)


class RefBSAM:
    """bSAM (Moellenhoff & Khan, ICLR 2023; the authors' code with one split):
    e ~ N(0, 1/(N s)), g = grad at w + e; g_e = grad at w + rho*g/s;
    m <- b1*m + (1-b1)*(g_e + d*w); w <- w - lr*m/s; s <- b2*s + (1-b2)*(sqrt(s)*|g| + damping + d)
    with d = prior_precision/N, m starting at 0 and s at s_init. ``groups`` maps a name to
    its own values of lr, beta1, beta2, prior_precision, rho and damping."""

    def __init__(self, num_data: int, lr: float, beta1: float, beta2: float,
                 prior_precision: float, rho: float, damping: float, s_init: float,
                 seed: int, groups: dict[str, dict[str, float]] | None = None) -> None:
        self.n, self.s_init, self.seed = num_data, s_init, seed
        self.own = {"lr": lr, "beta1": beta1, "beta2": beta2,
                    "prior_precision": prior_precision, "rho": rho, "damping": damping}
        self.groups = groups or {}
        self.m: Arrays = {}
        self.s: Arrays = {}
        self.draws = 0

    def values(self, name: str) -> dict[str, float]:
        return {**self.own, **self.groups.get(name, {})}

    def sam_step(self, params: Arrays, grad_fn: GradFn) -> Any:
        for k in params:
            self.m.setdefault(k, np.zeros(params[k].shape))
            self.s.setdefault(k, np.full(params[k].shape, self.s_init))
        w = {k: params[k].copy() for k in params}
        noisy = {k: w[k] + normals(self.seed, self.draws, k, w[k].shape)
                 / np.sqrt(self.n * self.s[k]) for k in params}
        loss, g = grad_fn(noisy)
        g = {k: np.asarray(g[k], dtype=np.float64) for k in params}
        _, ge = grad_fn({k: w[k] + self.values(k)["rho"] * g[k] / self.s[k] for k in params})
        for k in params:
            v = self.values(k)
            delta = v["prior_precision"] / self.n
            self.m[k] = v["beta1"] * self.m[k] + (1 - v["beta1"]) * (ge[k] + delta * w[k])
            params[k] = w[k] - v["lr"] * self.m[k] / self.s[k]
            self.s[k] = v["beta2"] * self.s[k] + (1 - v["beta2"]) * (
                np.sqrt(self.s[k]) * np.abs(g[k]) + v["damping"] + delta)
        self.draws += 1
        return loss
