"""A plain float64 NumPy reference for tensorlogic-train's other element-wise optimizers
(Adagrad, RMSprop, NAdam, AdaMax, RAdam, AdaBelief, Lion), written from their papers and
the crate's source (where the two differ, the paper; README "differences"). It does not
use samopt. Same conventions as reference.py: gradients already converted to the
parameter dtype then float64, clipping on copies, the L2 penalty `g <- g + wd*p` after
clipping, state created as zeros at a parameter's first step.

One exception to "everything in float64": Lion's update is the sign of
`b1*m + (1-b1)*g`, discontinuous at 0, so a float32 momentum stored rounded (SPEC: state
has the parameter's dtype) and a float64 one could step in opposite directions where that
value is near 0. The reference keeps Lion's momentum at the parameter's precision
(`state_dtypes`), computing in float64 from the stored value, as a float32 implementation
must.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from reference import clip_grads

# The optimizers' state keys (the crate's), the slot prefixes first.
SLOTS = {
    "adagrad": ("sum_squared_grads_",),
    "rmsprop": ("v_",),
    "nadam": ("m_", "v_"),
    "adamax": ("m_", "u_"),
    "radam": ("m_", "v_"),
    "adabelief": ("m_", "s_"),
    "lion": ("momentum.",),
}
COUNTS_STEPS = {"nadam", "adamax", "radam", "adabelief"}
# Which take weight_decay as L2 (added to the clipped gradient), which decoupled, and what
# weight_decay=None means (the crate's behaviour: ignored, or AdaBelief's 0.01).
DECOUPLED = {"adabelief", "lion"}
DEFAULT_WEIGHT_DECAY = {"adabelief": 0.01}


class RefElementwise:
    """What the seven share: hyperparameters with per-name overrides (`groups`), clipping,
    L2 or decoupled weight decay, the step count, lazily created state."""

    kind = ""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, clip: float | None = None,
                 clip_mode: str = "value",
                 groups: Mapping[str, Mapping[str, Any]] | None = None,
                 state_dtypes: Mapping[str, Any] | None = None) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay
        self.clip = clip
        self.clip_mode = clip_mode
        self.groups = dict(groups or {})
        self.state_dtypes = dict(state_dtypes or {})
        self.t = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def hyper(self, name: str) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay, **self.groups.get(name, {})}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if not params:
            return
        self.t += 1
        g = clip_grads({k: grads[k] for k in params}, self.clip, self.clip_mode)
        for k in params:
            h = self.hyper(k)
            if k not in self.state:
                self.state[k] = {s: np.zeros(params[k].shape) for s in SLOTS[self.kind]}
            gk = g[k] if self.kind in DECOUPLED else g[k] + h["weight_decay"] * params[k]
            params[k] = self.update(k, params[k], gk, h, self.state[k])

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr)}
        if self.kind in COUNTS_STEPS:
            out["t"] = np.array(self.t, dtype=np.int64)
        for k, slots in self.state.items():
            for prefix, v in slots.items():
                out[prefix + k] = v.copy()
        return out


class RefAdagrad(RefElementwise):
    """Duchi et al. (2011): s <- s + g^2 ; p <- p - lr*g/(sqrt(s) + eps)."""

    kind = "adagrad"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        s["sum_squared_grads_"] = s["sum_squared_grads_"] + g * g
        return p - h["lr"] * g / (np.sqrt(s["sum_squared_grads_"]) + h["eps"])


class RefRMSprop(RefElementwise):
    """Tieleman & Hinton (2012), alpha = beta2: v <- a*v + (1-a)*g^2 ;
    p <- p - lr*g/(sqrt(v) + eps)."""

    kind = "rmsprop"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        a = h["beta2"]
        s["v_"] = a * s["v_"] + (1 - a) * g * g
        return p - h["lr"] * g / (np.sqrt(s["v_"]) + h["eps"])


def nadam_mu(beta1: float, t: int) -> float:
    """Dozat (2016): mu_t = b1*(1 - 0.5*0.96^(t/250))."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (t / 250))


class RefNAdam(RefElementwise):
    """Dozat (2016), Algorithm 2 as PyTorch's NAdam writes it: with P_t = mu_1*...*mu_t,
    m <- b1*m + (1-b1)*g ; v <- b2*v + (1-b2)*g^2 ; d = sqrt(v/(1-b2^t)) + eps ;
    p <- p - lr*(1-mu_t)/(1-P_t)*g/d - lr*mu_{t+1}/(1-P_t*mu_{t+1})*m/d."""

    kind = "nadam"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        b1, b2, t = h["beta1"], h["beta2"], self.t
        product = math.prod(nadam_mu(b1, i) for i in range(1, t + 1))
        mu, mu_next = nadam_mu(b1, t), nadam_mu(b1, t + 1)
        s["m_"] = b1 * s["m_"] + (1 - b1) * g
        s["v_"] = b2 * s["v_"] + (1 - b2) * g * g
        d = np.sqrt(s["v_"] / (1 - b2**t)) + h["eps"]
        return (p - h["lr"] * (1 - mu) / (1 - product) * g / d
                - h["lr"] * mu_next / (1 - product * mu_next) * s["m_"] / d)


class RefAdaMax(RefElementwise):
    """Kingma & Ba (2015), section 7.1, with the crate's eps: m <- b1*m + (1-b1)*g ;
    u <- max(b2*u, |g|) ; p <- p - lr/(1-b1^t)*m/(u + eps)."""

    kind = "adamax"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        b1, b2 = h["beta1"], h["beta2"]
        s["m_"] = b1 * s["m_"] + (1 - b1) * g
        s["u_"] = np.maximum(b2 * s["u_"], np.abs(g))
        return p - h["lr"] / (1 - b1**self.t) * s["m_"] / (s["u_"] + h["eps"])


class RefRAdam(RefElementwise):
    """Liu et al. (2020): rho_inf = 2/(1-b2) - 1 ; rho_t = rho_inf - 2t*b2^t/(1-b2^t) ;
    m, v as Adam's ; m_hat = m/(1-b1^t) ; if rho_t > 5:
    r = sqrt((rho_t-4)(rho_t-2)rho_inf/((rho_inf-4)(rho_inf-2)rho_t)),
    p <- p - lr*r*m_hat/(sqrt(v/(1-b2^t)) + eps) ; else p <- p - lr*m_hat."""

    kind = "radam"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        b1, b2, t = h["beta1"], h["beta2"], self.t
        s["m_"] = b1 * s["m_"] + (1 - b1) * g
        s["v_"] = b2 * s["v_"] + (1 - b2) * g * g
        m_hat = s["m_"] / (1 - b1**t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho_t > 5:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                          / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            v_hat = s["v_"] / (1 - b2**t)
            return p - h["lr"] * r * m_hat / (np.sqrt(v_hat) + h["eps"])
        return p - h["lr"] * m_hat


class RefAdaBelief(RefElementwise):
    """Zhuang et al. (2020), Algorithm 2, decoupled decay: m <- b1*m + (1-b1)*g ;
    s <- b2*s + (1-b2)*(g-m)^2 + eps ; p <- p*(1 - lr*wd) - lr*m_hat/(sqrt(s_hat) + eps)."""

    kind = "adabelief"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        b1, b2, t = h["beta1"], h["beta2"], self.t
        s["m_"] = b1 * s["m_"] + (1 - b1) * g
        s["s_"] = b2 * s["s_"] + (1 - b2) * (g - s["m_"]) ** 2 + h["eps"]
        m_hat = s["m_"] / (1 - b1**t)
        s_hat = s["s_"] / (1 - b2**t)
        decayed = p * (1 - h["lr"] * h["weight_decay"])
        return decayed - h["lr"] * m_hat / (np.sqrt(s_hat) + h["eps"])


class RefLion(RefElementwise):
    """Chen et al. (2023), Program 1: c = b1*m + (1-b1)*g ;
    p <- p - lr*(sign(c) + wd*p) ; m <- b2*m + (1-b2)*g (m kept at `state_dtypes`)."""

    kind = "lion"

    def update(self, name: str, p: np.ndarray, g: np.ndarray, h: dict[str, Any],
               s: dict[str, np.ndarray]) -> np.ndarray:
        b1, b2 = h["beta1"], h["beta2"]
        m = s["momentum."]
        c = b1 * m + (1 - b1) * g
        stored = self.state_dtypes.get(name, np.float64)
        s["momentum."] = (b2 * m + (1 - b2) * g).astype(stored).astype(np.float64)
        return p - h["lr"] * (np.sign(c) + h["weight_decay"] * p)


REFERENCES: dict[str, type[RefElementwise]] = {
    "adagrad": RefAdagrad,
    "rmsprop": RefRMSprop,
    "nadam": RefNAdam,
    "adamax": RefAdaMax,
    "radam": RefRAdam,
    "adabelief": RefAdaBelief,
    "lion": RefLion,
}
