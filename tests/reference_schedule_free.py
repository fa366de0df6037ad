"""A plain float64 NumPy reference for Schedule-Free AdamW, written from the paper
(Defazio et al., "The Road Less Scheduled", NeurIPS 2024, Algorithm 1) with its three
sequences kept explicitly — the iterate z, the average x, the gradient point
y = (1-b1)*z + b1*x — and not from samopt's code (which keeps y and z - y). It does not use
samopt. Conventions as reference.py: gradients already converted to the parameter dtype
then float64, clipping on copies, state created at a parameter's first step (z = x = y).

    v <- b2*v + (1-b2)*g^2
    lr_t = lr * sqrt(1 - b2^t) * min(1, t / warmup_steps)
    z <- z - lr_t * (g / (sqrt(v) + eps) + wd * y)
    c = lr_t^2 / sum_{i<=t} lr_i^2
    x <- (1-c)*x + c*z
    y = (1-b1)*z + b1*x          (what the caller's parameters hold)

`eval` puts the parameters at x, `train` back at y.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from reference import clip_grads

SLOTS = ("z_minus_y_", "v_")


class RefScheduleFreeAdamW:
    """The paper's Algorithm 1 over a dict; `groups` overrides hyperparameters by name
    (lr, beta1, beta2, eps, weight_decay), each name with its own sum of weights."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.01, warmup_steps: int = 0,
                 clip: float | None = None, clip_mode: str = "norm",
                 groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.clip = clip
        self.clip_mode = clip_mode
        self.groups = dict(groups or {})
        self.t = 0
        self.z: dict[str, np.ndarray] = {}
        self.x: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.weight_sum: dict[str, float] = {}
        self.own_weight_sum = 0.0
        self.training = True

    def hyper(self, name: str) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay, **self.groups.get(name, {})}

    def scheduled_lr(self, lr: float, beta2: float, t: int) -> float:
        warmup = 1.0 if self.warmup_steps == 0 else min(1.0, t / self.warmup_steps)
        return lr * math.sqrt(1.0 - beta2 ** t) * warmup

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        assert self.training
        if not params:
            return
        self.t += 1
        t = self.t
        own = self.scheduled_lr(self.lr, self.beta2, t)
        self.own_weight_sum += own * own
        g = clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        for k in params:
            h = self.hyper(k)
            y = params[k]
            if k not in self.z:
                self.z[k], self.x[k] = y.copy(), y.copy()
                self.v[k] = np.zeros(y.shape)
                # A name first stepped late still counts its group's earlier steps.
                self.weight_sum[k] = sum(
                    self.scheduled_lr(h["lr"], h["beta2"], i) ** 2 for i in range(1, t))
            lr_t = self.scheduled_lr(h["lr"], h["beta2"], t)
            self.weight_sum[k] += lr_t * lr_t
            c = lr_t * lr_t / self.weight_sum[k] if self.weight_sum[k] > 0 else 0.0
            v = h["beta2"] * self.v[k] + (1 - h["beta2"]) * g[k] ** 2
            z = self.z[k] - lr_t * (g[k] / (np.sqrt(v) + h["eps"]) + h["weight_decay"] * y)
            x = (1 - c) * self.x[k] + c * z
            self.v[k], self.z[k], self.x[k] = v, z, x
            params[k] = (1 - h["beta1"]) * z + h["beta1"] * x

    def eval(self, params: dict[str, np.ndarray]) -> None:
        if self.training:
            for k in params:
                if k in self.x:
                    params[k] = self.x[k].copy()
        self.training = False

    def train(self, params: dict[str, np.ndarray]) -> None:
        if not self.training:
            for k in params:
                if k in self.z:
                    b1 = self.hyper(k)["beta1"]
                    params[k] = (1 - b1) * self.z[k] + b1 * self.x[k]
        self.training = True

    def state_dict(self) -> dict[str, np.ndarray]:
        """samopt's keys: z - y as `z_minus_y_<name>`, `v_<name>`, `t`, `lr`, `weight_sum`
        (the optimizer's own) and `training_mode`."""
        out: dict[str, np.ndarray] = {
            "lr": np.array(self.lr), "t": np.array(self.t, dtype=np.int64),
            "weight_sum": np.array(self.own_weight_sum),
            "training_mode": np.array(1.0 if self.training else 0.0),
        }
        for k in self.z:
            # z - y = b1*(z - x), without the cancellation of z - ((1-b1)*z + b1*x).
            out["z_minus_y_" + k] = self.hyper(k)["beta1"] * (self.z[k] - self.x[k])
            out["v_" + k] = self.v[k].copy()
        return out
