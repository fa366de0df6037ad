"""A plain float64 NumPy reference for samopt's AdamPOptimizer, written from the AdamP
paper (Heo et al., ICLR 2021, Algorithm 2, as the authors' clovaai/AdamP code writes it)
and never from samopt's code. Everything is float64 and loops over dicts: simple over fast.

The authors' `_projection` tries two views of an array of two or more axes in turn, the
channel view (`p.view(p.size(0), -1)`: one row per slice of the first axis) then the layer
view (`p.view(1, -1)`: the whole array as one row), and projects with the first whose
largest row cosine is below delta/√(row length). Conventions as in tests/reference.py:
gradients are converted to the parameter dtype, then to float64
(`reference.to_ref_grads`), and clipping is `reference.clip_grads`, first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import reference as R


def l2(x: np.ndarray) -> float:
    """The L2 norm without overflow or underflow (math.hypot scales as it sums)."""
    return math.hypot(*np.asarray(x, dtype=np.float64).ravel().tolist())


class RefAdamP:
    """t ← t+1 ; m ← b1·m + (1−b1)·g ; v ← b2·v + (1−b2)·g² ;
    denom = √v/√(1−b2^t) + eps ; u = (b1·m + (1−b1)·g)/denom with nesterov, else m/denom ;
    for an array of two or more axes, viewed as rows (shape[0] rows, then one row): per row
    c, cos_c = |g_c·p_c|/(max(‖g_c‖, eps)·max(‖p_c‖, eps)) (PyTorch's cosine_similarity);
    with the first view whose max_c cos_c < delta/√(row length): p̂_c = p_c/(‖p_c‖ + eps),
    u_c ← u_c − p̂_c·Σ(p̂_c·u_c) and r = wd_ratio; with neither r = 1 ;
    p ← p·(1 − lr·wd·r) − lr/(1−b1^t)·u. `groups` maps a name to overrides of lr, beta1,
    beta2, eps, weight_decay, nesterov. `projected[name]`: the view of the last step,
    "channel", "layer" or None."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 nesterov: bool = True, delta: float = 0.1, wd_ratio: float = 1.0,
                 clip: float | None = None, clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.defaults = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, nesterov=nesterov)
        self.lr = lr
        self.delta, self.wd_ratio = delta, wd_ratio
        self.clip, self.clip_mode = clip, clip_mode
        self.groups = dict(groups or {})
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.projected: dict[str, str | None] = {}

    def project(self, p: np.ndarray, grad: np.ndarray, perturb: np.ndarray,
                eps: float) -> tuple[np.ndarray, str | None]:
        """The authors' `_projection`: the update with its radial part removed row by row
        in the first view that applies, and that view's name (None: unchanged)."""
        for view, rows in (("channel", p.shape[0]), ("layer", 1)):
            p_rows, g_rows = p.reshape(rows, -1), grad.reshape(rows, -1)
            cosines = [abs(float(np.sum(g_c * p_c))) / (max(l2(g_c), eps) * max(l2(p_c), eps))
                       for p_c, g_c in zip(p_rows, g_rows)]
            if max(cosines) < self.delta / math.sqrt(p_rows.shape[1]):
                norms = np.array([l2(p_c) for p_c in p_rows])
                unit = p_rows / (norms + eps)[:, None]
                u_rows = perturb.reshape(rows, -1)
                along = np.array([float(np.sum(a * b)) for a, b in zip(unit, u_rows)])
                return (u_rows - unit * along[:, None]).reshape(p.shape), view
        return perturb, None

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = R.clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        self.t += 1
        for name in params:
            h = {**self.defaults, **self.groups.get(name, {})}
            b1, b2, eps = h["beta1"], h["beta2"], h["eps"]
            p, grad = params[name], g[name]
            m = b1 * self.m.get(name, np.zeros(p.shape)) + (1 - b1) * grad
            v = b2 * self.v.get(name, np.zeros(p.shape)) + (1 - b2) * grad ** 2
            denom = np.sqrt(v) / math.sqrt(1 - b2 ** self.t) + eps
            step_size = h["lr"] / (1 - b1 ** self.t)
            perturb = (b1 * m + (1 - b1) * grad) / denom if h["nesterov"] else m / denom
            projected = None
            if p.ndim > 1 and p.size > 0:
                perturb, projected = self.project(p, grad, perturb, eps)
            ratio = 1.0 if projected is None else self.wd_ratio
            params[name] = p * (1 - h["lr"] * h["weight_decay"] * ratio) - step_size * perturb
            self.m[name], self.v[name] = m, v
            self.projected[name] = projected

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr), "t": np.array(self.t, dtype=np.int64)}
        for name in self.m:
            out["m_" + name] = self.m[name].copy()
            out["v_" + name] = self.v[name].copy()
        return out
