"""Shared pieces of the MPI tests: a small regression problem and cross-rank assertions.

Assertions are made on data gathered from every rank (``allgather``), so every rank
reaches the same verdict and a failure never leaves one rank waiting in a collective.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[Any]
Params = dict[str, Array]


def make_problem(
    seed: int, n: int, d: int = 5, h: int = 7, o: int = 3, dtype: Any = np.float64
) -> tuple[Params, Array, Array]:
    """A 2-layer tanh network and a regression data set (X, Y) of ``n`` rows."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    Y = rng.standard_normal((n, o))
    params = {
        "W1": (rng.standard_normal((d, h)) * 0.5).astype(dtype),
        "b1": (rng.standard_normal(h) * 0.1).astype(dtype),
        "W2": (rng.standard_normal((h, o)) * 0.5).astype(dtype),
        "b2": np.zeros(o, dtype=dtype),
    }
    return params, X, Y


def mse_loss_and_grads(params: Mapping[str, Array], X: Array, Y: Array) -> tuple[float, Params]:
    """Mean squared error over all outputs (so the full-batch gradient is the mean of the
    gradients of equal shards) and its gradients, in the parameters' dtype."""
    W1, b1, W2, b2 = (np.asarray(params[k], dtype=np.float64) for k in ("W1", "b1", "W2", "b2"))
    A = np.tanh(X @ W1 + b1)
    R = A @ W2 + b2 - Y
    loss = float(np.mean(R * R))
    dout = 2.0 * R / R.size
    dZ = (dout @ W2.T) * (1.0 - A * A)
    grads = {"W1": X.T @ dZ, "b1": dZ.sum(axis=0), "W2": A.T @ dout, "b2": dout.sum(axis=0)}
    return loss, {k: g.astype(params[k].dtype) for k, g in grads.items()}


def shard(comm: Any, *arrays: Array) -> tuple[Array, ...]:
    """This rank's equal contiguous slice of each array."""
    size, rank = comm.Get_size(), comm.Get_rank()
    out = []
    for a in arrays:
        assert a.shape[0] % size == 0, "use a batch divisible by the number of ranks"
        m = a.shape[0] // size
        out.append(a[rank * m : (rank + 1) * m])
    return tuple(out)


def copy_params(params: Mapping[str, Array]) -> Params:
    return {k: np.array(v, copy=True) for k, v in params.items()}


def rel_err(x: Array, ref: Array) -> float:
    """max |x - ref| / max |ref| (absolute when ref is all zeros)."""
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(r64))) if r64.size else 0.0
    err = float(np.max(np.abs(x64 - r64))) if r64.size else 0.0
    return err / scale if scale > 0 else err


def bits(params: Mapping[str, Array]) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in sorted(params.items())}


def state_bits(opt: Any) -> dict[str, bytes]:
    return bits(opt.state_dict())


def all_ranks(comm: Any, value: Any) -> list[Any]:
    """``value`` from every rank (a pickle allgather; fine for test-sized data)."""
    return list(comm.allgather(value))


def assert_same_on_all_ranks(comm: Any, value: Any, what: str) -> None:
    values = all_ranks(comm, value)
    assert all(v == values[0] for v in values), f"{what} differs between ranks: {values}"


def assert_all_ranks(comm: Any, ok: bool, what: str) -> None:
    """Assert on every rank that ``ok`` holds on every rank."""
    oks = all_ranks(comm, bool(ok))
    assert all(oks), f"{what}: failed on ranks {[r for r, v in enumerate(oks) if not v]}"


class CountingComm:
    """Wraps a communicator and counts every call of a communication method."""

    _LOCAL = frozenset({"Get_size", "Get_rank", "Get_name", "Get_group", "Get_topology"})

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        if name in self._LOCAL or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class SgdMomentumReference:
    """Float64 NumPy SGD with momentum, SPEC's formulas (v <- mu v + lr g; p <- p - v)."""

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum
        self.v: dict[str, Array] = {}

    def step(self, params: Params, grads: Mapping[str, Array]) -> None:
        for k in sorted(params):
            v = self.momentum * self.v.get(k, 0.0) + self.lr * grads[k]
            self.v[k] = v
            params[k] = params[k] - v


def msharpness_reference_step(
    params: Params,
    shards: list[tuple[Array, Array]],
    grad_fn: Callable[[Mapping[str, Array], Array, Array], tuple[float, Params]],
    rho: float,
    base: SgdMomentumReference,
) -> float:
    """One m-sharpness SAM step in one process: every shard perturbs with its own
    gradient, the perturbed-point gradients are averaged."""
    losses, second = [], []
    for X, Y in shards:
        loss, g = grad_fn(params, X, Y)
        losses.append(loss)
        n = math.sqrt(sum(float(np.sum(g[k] ** 2)) for k in sorted(g)))
        perturbed = {k: params[k] + rho * g[k] / n for k in params}
        second.append(grad_fn(perturbed, X, Y)[1])
    mean: Params = {k: np.sum([g[k] for g in second], axis=0) / len(shards) for k in params}
    base.step(params, mean)
    return math.fsum(losses) / len(losses)
