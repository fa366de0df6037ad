"""A plain float64 NumPy reference for Prodigy (Mishchenko & Defazio, 2023, Algorithm 3,
Adam form), written from the paper and the authors' code (konstmish/prodigy): not from
samopt, nor from the crate, whose estimate of d is a different rule (README "differences",
item 18). Same conventions as reference.py: gradients converted to the parameter dtype then
float64, clipping on copies, state created (zeros) at a parameter's first step.

x0 - x, the distance from where a parameter started, is kept as the sum of the steps it
took: the same number as the difference of the two values, without the cancellation of
subtracting two nearby float64 values (with x ~ 5 and x0 - x ~ 1e-3 the difference alone
is off by 1e-13 relative, and the sum <g, x0 - x> over mixed signs amplifies that).

Step k (t = k + 1), with gamma = lr*sqrt(1 - b2^t)/(1 - b1^t) (bias correction) or lr, and
dlr = d*gamma, every parameter of a group with lr > 0:
    r    += (d/d0)*dlr*<g, x0 - x>          (r first decayed by b3, once per step)
    m     = b1*m + (1 - b1)*d*g
    v     = b2*v + (1 - b2)*d^2*g^2
    s     = b3*s + (d/d0)*dlr*g
    x     = x - dlr*wd*x - dlr*m/(sqrt(v) + d*eps)     (decoupled decay, the authors')
then, when ||s||_1 > 0: d_hat = d_coef*r/||s||_1; d = max(d, d_hat) if d == d0;
d_max = max(d_max, d_hat); d = min(d_max, (1 + d_growth_rate)*d). The step of x uses the
d the step started with (the paper's x_{k+1} = x_k - gamma*d_k*...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from reference import clip_grads

SLOTS = ("exp_avg.", "exp_avg_sq.", "s.", "p0_minus_p.")
SCALARS = ("lr", "step", "d", "d_max", "d_numerator")


class RefProdigy:
    def __init__(self, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, d0: float = 1e-6,
                 d_coef: float = 1.0, d_growth_rate: float = math.inf,
                 bias_correction: bool = True, beta3: float | None = None,
                 clip: float | None = None, clip_mode: str = "norm",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.lr = lr
        self.beta1, self.beta2 = beta1, beta2
        self.beta3 = math.sqrt(beta2) if beta3 is None else beta3
        self.eps = eps
        self.weight_decay = weight_decay
        self.d0, self.d_coef, self.d_growth_rate = d0, d_coef, d_growth_rate
        self.bias_correction = bias_correction
        self.clip, self.clip_mode = clip, clip_mode
        self.groups = dict(groups or {})
        self.k = 0
        self.d = self.d_max = d0
        self.numerator = 0.0
        # The same sum over |terms|: the scale r's rounding is relative to (r is a sum of
        # mixed signs that passes near 0). For the tests' comparison, not the algorithm.
        self.numerator_magnitude = 0.0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def hyper(self, name: str) -> dict[str, float]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, **self.groups.get(name, {})}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        g = clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        t = self.k + 1
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        correction = math.sqrt(1 - b2**t) / (1 - b1**t) if self.bias_correction else 1.0
        d = self.d
        numerator_step, magnitude_step, denominator = 0.0, 0.0, 0.0
        for k, x in params.items():
            st = self.state.setdefault(k, {"m": np.zeros(x.shape), "v": np.zeros(x.shape),
                                           "s": np.zeros(x.shape), "x0_x": np.zeros(x.shape)})
            h = self.hyper(k)
            if h["lr"] == 0.0:
                continue
            dlr = d * h["lr"] * correction
            numerator_step += (d / self.d0) * dlr * float(np.sum(g[k] * st["x0_x"]))
            magnitude_step += (d / self.d0) * dlr * float(np.sum(np.abs(g[k] * st["x0_x"])))
            st["m"] = b1 * st["m"] + (1 - b1) * d * g[k]
            st["v"] = b2 * st["v"] + (1 - b2) * d * d * g[k] ** 2
            st["s"] = b3 * st["s"] + (d / self.d0) * dlr * g[k]
            denominator += float(np.sum(np.abs(st["s"])))
            step = dlr * h["weight_decay"] * x + dlr * st["m"] / (np.sqrt(st["v"]) + d * self.eps)
            params[k] = x - step
            st["x0_x"] = st["x0_x"] + step
        self.k += 1
        if denominator == 0.0:
            return
        self.numerator = b3 * self.numerator + numerator_step
        self.numerator_magnitude = b3 * self.numerator_magnitude + magnitude_step
        d_hat = self.d_coef * self.numerator / denominator
        if d == self.d0:
            d = max(d, d_hat)
        self.d_max = max(self.d_max, d_hat)
        self.d = min(self.d_max, (1 + self.d_growth_rate) * d)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as samopt names it."""
        out = {"lr": np.array(self.lr), "step": np.array(self.k, dtype=np.int64),
               "d": np.array(self.d), "d_max": np.array(self.d_max),
               "d_numerator": np.array(self.numerator)}
        for k, st in self.state.items():
            out["exp_avg." + k] = st["m"].copy()
            out["exp_avg_sq." + k] = st["v"].copy()
            out["s." + k] = st["s"].copy()
            out["p0_minus_p." + k] = st["x0_x"].copy()
        return out
