"""Gradient accumulation (issue 14): GradAccumulator's sums against NumPy, its errors, and
SAM over k micro-batches equal to the full-batch SAM step (SGD and Adam bases)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import reference as R
from samopt import (
    AdamOptimizer,
    GradAccumulator,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
)

RNG = np.random.default_rng(3)
X = RNG.standard_normal((96, 6))
Y = np.tanh(X @ RNG.standard_normal(6)) + 0.1 * RNG.standard_normal(96)


def loss_grads(params: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """Mean squared error of a one-hidden-layer net on X[rows]: its mean gradient."""
    x, y = X[rows], Y[rows]
    h = np.tanh(x @ params["w1"] + params["b1"])
    r = h @ params["w2"] + params["b2"] - y
    n = len(y)
    dh = np.outer(r, params["w2"]) * (1 - h * h) * (2 / n)
    return {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ r * (2 / n),
            "b2": np.asarray(2 * r.mean())}


def start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"w1": rng.standard_normal((6, 8)) * 0.5, "b1": np.zeros(8),
            "w2": rng.standard_normal(8) * 0.5, "b2": np.zeros(())}


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_sam_over_micro_batches_equals_the_full_batch_step(base: str, k: int) -> None:
    def make() -> SamOptimizer:
        cfg = OptimizerConfig(learning_rate=0.05 if base == "sgd" else 0.01, weight_decay=1e-3)
        return SamOptimizer(SgdOptimizer(cfg) if base == "sgd" else AdamOptimizer(cfg), 0.1)

    full, micro = make(), make()
    p_full, p_micro = start(), start()
    acc = GradAccumulator()
    size = len(Y) // k
    batches = [slice(i * size, (i + 1) * size) for i in range(k)]
    for _ in range(30):
        full.first_step(p_full, loss_grads(p_full, slice(0, k * size)))
        full.second_step(p_full, loss_grads(p_full, slice(0, k * size)))
        for phase in (micro.first_step, micro.second_step):
            acc.reset()
            for rows in batches:
                acc.add(loss_grads(p_micro, rows), 1.0 / k)
            phase(p_micro, acc.grads)
    for name in p_full:
        err = np.max(np.abs(p_micro[name] - p_full[name]), initial=0.0)
        scale = max(np.max(np.abs(p_full[name]), initial=0.0), 1e-300)
        assert err / scale <= 1e-14, (name, err / scale)


def test_sums_and_mean_match_numpy_and_reuse_their_arrays() -> None:
    rng = np.random.default_rng(0)
    acc = GradAccumulator()
    grads = [{"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5).astype(np.float32),
              "c": np.float64(rng.standard_normal())} for _ in range(4)]
    weights = [0.5, 2.0, 1.0, 0.25]
    for g, w in zip(grads, weights):
        acc.add(g, w)
    sums = acc.grads
    expected = {k: sum(w * np.asarray(g[k], np.float64) for g, w in zip(grads, weights))
                for k in grads[0]}
    assert sums["a"].dtype == np.float64 and sums["b"].dtype == np.float32
    np.testing.assert_allclose(sums["a"], expected["a"], rtol=1e-14)
    np.testing.assert_allclose(sums["b"], expected["b"], rtol=1e-6)
    assert acc.total_weight == sum(weights)
    mean = acc.mean()
    np.testing.assert_allclose(mean["a"], expected["a"] / sum(weights), rtol=1e-14)
    arrays = {k: id(v) for k, v in acc.grads.items()}
    mean_arrays = {k: id(v) for k, v in mean.items()}
    acc.reset()
    assert acc.total_weight == 0.0
    assert all(not np.any(v) for v in acc.grads.values())
    acc.add(grads[0])
    assert {k: id(v) for k, v in acc.grads.items()} == arrays  # no new arrays
    assert {k: id(v) for k, v in acc.mean().items()} == mean_arrays


def test_errors_change_nothing() -> None:
    acc = GradAccumulator()
    acc.add({"a": np.ones(3), "b": np.ones(2)}, 2.0)
    before = R.state_snapshot(acc.grads)
    bad: list[tuple[Any, Any, type, Any]] = [
        ({"a": np.array([1.0, np.nan, 0.0]), "b": np.ones(2)}, 1.0, NonFiniteGradientError, "a"),
        ({"a": np.ones(3)}, 1.0, OptimizerError, "b"),
        ({"a": np.ones(3), "b": np.ones(2), "c": np.ones(1)}, 1.0, OptimizerError, "c"),
        ({"a": np.ones(4), "b": np.ones(2)}, 1.0, OptimizerError, "a"),
        ({"a": np.ones(3, dtype=int), "b": np.ones(2)}, 1.0, OptimizerError, "a"),
        ({"a": np.ones(3), "b": np.ones(2)}, float("inf"), OptimizerError, "weight"),
        ({"a": np.ones(3), "b": np.ones(2)}, "2", OptimizerError, "weight"),
    ]
    for grads, weight, exc, key in bad:
        with pytest.raises(exc) as info:
            acc.add(grads, weight)
        assert info.value.key == key, info.value
        assert R.state_snapshot(acc.grads) == before
        assert acc.total_weight == 2.0
    with pytest.raises(OptimizerError):
        GradAccumulator().mean()
