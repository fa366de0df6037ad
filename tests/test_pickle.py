"""Pickling (issue 5, point 6): every optimizer pickles and unpickles with every protocol
(and deep-copies), and the copy resumes bit-exactly: the steps it takes after the round
trip equal, bitwise, the steps the original takes — fresh optimizers, trained ones, SAM
with a pending first_step, adaptive SAM, GSAM, sam_step's interval counter, a base written
in Python, and across a real process boundary. (That the exceptions pickle is
tests/test_exceptions.py.)"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GradClipMode,
    GsamOptimizer,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
)

PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))
CFG = OptimizerConfig(learning_rate=0.02, momentum=0.8, beta1=0.85, beta2=0.99,
                      epsilon=1e-7, weight_decay=0.05, grad_clip=0.7,
                      grad_clip_mode=GradClipMode.NORM)
VCFG = OptimizerConfig(learning_rate=0.01, grad_clip=0.05, grad_clip_mode=GradClipMode.VALUE)


class PyMomentum:
    """A base optimizer written in Python (SGD with momentum), picklable by reference."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.5) -> None:
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: Any, grads: Any) -> None:
        for k, p in params.items():
            g = np.asarray(grads[k], dtype=p.dtype)
            v = self.velocity.get(k, np.zeros_like(p))
            self.velocity[k] = self.momentum * v + self.lr * g
            p -= self.velocity[k]

    def zero_grad(self) -> None:
        pass

    def get_lr(self) -> float:
        return self.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"lr": np.array(self.lr)}
        out.update({"velocity_" + k: v.copy() for k, v in self.velocity.items()})
        return out

    def load_state_dict(self, state: Any) -> None:
        self.lr = float(state["lr"])
        self.velocity = {k[9:]: np.array(v) for k, v in state.items() if k != "lr"}


OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "sgd": lambda: SgdOptimizer(CFG),
    "sgd-value-clip": lambda: SgdOptimizer(VCFG),
    "adam": lambda: AdamOptimizer(CFG),
    "adamw": lambda: AdamWOptimizer(CFG),
    "sam-sgd": lambda: SamOptimizer(SgdOptimizer(CFG), 0.1),
    "sam-adam": lambda: SamOptimizer(AdamOptimizer(CFG), 0.07, eps=1e-12),
    "sam-adamw-interval": lambda: SamOptimizer(AdamWOptimizer(CFG), 0.05, interval=3),
    "asam": lambda: SamOptimizer(SgdOptimizer(CFG), 0.5, adaptive=True, eta=0.01),
    "gsam": lambda: GsamOptimizer(AdamOptimizer(CFG), 0.1, 0.02, 0.4, lr_min=0.001),
    "gsam-sgd": lambda: GsamOptimizer(SgdOptimizer(VCFG), 0.05, alpha=1.0, interval=2),
    "sam-python-base": lambda: SamOptimizer(PyMomentum(), 0.1),
    "gsam-python-base": lambda: GsamOptimizer(PyMomentum(), 0.1, alpha=0.3),
}
# how far each is trained before pickling ("pending": SAM between first and second step)
CASES = [(name, history) for name in OPTIMIZERS for history in ("fresh", "trained", "pending")
         if history != "pending" or "sam" in name]


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((6, 5)),
        "b": rng.standard_normal(5).astype(np.float32),
        "s": np.asarray(rng.standard_normal()),
        "f": np.asfortranarray(rng.standard_normal((3, 4))),
        "e": np.zeros((0, 3)),
    }


def grads_at(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {k: np.asarray(rng.standard_normal(v.shape) + 0.1 * v, dtype=v.dtype)
            for k, v in params.items()}


def step(opt: Any, params: dict[str, np.ndarray], i: int) -> None:
    """Step i of a run: for SAM, alternately first/second_step and sam_step (so that the
    interval counter moves); gradients depend on the params and on i only."""
    if isinstance(opt, SamOptimizer):
        if opt.pending:
            opt.second_step(params, grads_at(params, i))
        elif i % 2:
            counter = [0]

            def grad_fn(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
                counter[0] += 1
                return float(i), grads_at(p, 100 * i + counter[0])

            assert opt.sam_step(params, grad_fn) == float(i)
        else:
            opt.first_step(params, grads_at(params, i))
            opt.second_step(params, grads_at(params, i + 50))
    else:
        opt.step(params, grads_at(params, i))


def prepared(name: str, history: str) -> tuple[Any, dict[str, np.ndarray]]:
    opt, params = OPTIMIZERS[name](), make_params()
    if history in ("trained", "pending"):
        for i in range(5):
            step(opt, params, i)
        opt.set_lr(opt.get_lr() * 0.5)  # a changed hyperparameter travels too
        if isinstance(opt, SamOptimizer):
            opt.rho = opt.rho_max * 0.9 if isinstance(opt, GsamOptimizer) else opt.rho * 0.9
    if history == "pending":
        opt.first_step(params, grads_at(params, 77))
        assert opt.pending
    return opt, params


def observable(opt: Any) -> Any:
    """Everything the public API shows about an optimizer, bitwise."""
    out: dict[str, Any] = {
        "type": type(opt), "repr": re.sub("0x[0-9a-f]+", "0x", repr(opt)),
        "lr": opt.get_lr(), "state": R.state_snapshot(opt.state_dict()),
    }
    if isinstance(opt, SamOptimizer):
        out.update(rho=opt.rho, pending=opt.pending, adaptive=opt.adaptive, eta=opt.eta,
                   eps=opt.eps, interval=opt.interval, base=type(opt.base_optimizer))
    if isinstance(opt, GsamOptimizer):
        out.update(rho_max=opt.rho_max, rho_min=opt.rho_min, alpha=opt.alpha,
                   lr_min=opt.lr_min, lr_max=opt.lr_max)
    base = opt.base_optimizer if isinstance(opt, SamOptimizer) else opt
    if isinstance(base, (SgdOptimizer, AdamOptimizer)):
        out["config"] = base.config
    return out


def bits(params: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in params.items()}


def check_resumes(opt: Any, params: dict[str, np.ndarray], clone: Any,
                  steps: int = 6) -> None:
    """The clone and the original, each on its own copy of the arrays, take the same
    steps bitwise; stepping one never changes the other."""
    assert clone is not opt
    assert observable(clone) == observable(opt)
    mine, theirs = {k: v.copy() for k, v in params.items()}, \
        {k: v.copy() for k, v in params.items()}
    for i in range(steps):
        before = observable(opt)
        step(clone, theirs, 10 + i)
        assert observable(opt) == before, "stepping the copy changed the original"
        step(opt, mine, 10 + i)
        assert bits(theirs) == bits(mine), f"step {i}: parameters differ"
        assert observable(clone) == observable(opt), f"step {i}: state differs"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name,history", CASES)
def test_pickle_round_trip_resumes_bit_exactly(name: str, history: str, protocol: int) -> None:
    opt, params = prepared(name, history)
    clone = pickle.loads(pickle.dumps(opt, protocol=protocol))
    check_resumes(opt, params, clone)


@pytest.mark.parametrize("name,history", CASES)
def test_deepcopy_resumes_bit_exactly(name: str, history: str) -> None:
    opt, params = prepared(name, history)
    check_resumes(opt, params, copy.deepcopy(opt))


@pytest.mark.parametrize("name", ["sam-adam", "gsam"])
def test_pickle_holds_no_caller_arrays(name: str) -> None:
    """A pending SAM remembers names and its own saved values, not the caller's arrays:
    the unpickled one restores the caller's (other) arrays, in place."""
    opt, params = prepared(name, "pending")
    clone = pickle.loads(pickle.dumps(opt))
    other = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in other.items()}
    clone.restore(other)
    opt.restore(params)
    assert {k: id(v) for k, v in other.items()} == ids
    assert bits(other) == bits(params)
    assert not clone.pending and not opt.pending


def test_pickled_optimizer_is_usable_from_threads() -> None:
    """The lock is re-created on unpickling (not shared, not missing)."""
    opt, params = prepared("sam-adam", "trained")
    clone = pickle.loads(pickle.dumps(opt))
    twin = pickle.loads(pickle.dumps(opt))
    p1, p2 = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
    g = grads_at(params, 5)
    threads = [threading.Thread(target=clone.step, args=(p1, g)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    twin.step(p2, g)
    twin.step(p2, g)
    assert bits(p1) == bits(p2)
    assert observable(clone) == observable(twin)


def _step_in_child(payload: bytes) -> bytes:
    opt, params = pickle.loads(payload)
    for i in range(4):
        step(opt, params, 20 + i)
    return pickle.dumps((opt.state_dict(), params))


@pytest.mark.parametrize("name", ["adamw", "sam-adamw-interval", "gsam"])
def test_resume_in_another_process(name: str) -> None:
    """Sent to a fresh interpreter (spawn, as a DataLoader or a process pool would), the
    optimizer continues there exactly as it does here."""
    opt, params = prepared(name, "pending" if "sam" in name else "trained")
    payload = pickle.dumps((opt, params))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        state, remote = pickle.loads(pool.apply(_step_in_child, (payload,)))
    for i in range(4):
        step(opt, params, 20 + i)
    assert bits(remote) == bits(params)
    assert R.state_snapshot(state) == R.state_snapshot(opt.state_dict())
