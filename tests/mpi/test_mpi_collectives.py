"""allreduce_mean, broadcast_parameters and replicas_consistent under ``mpirun -n 2``."""

from __future__ import annotations

from typing import Any

import mpi_helpers as h
import numpy as np
import pytest
from samopt import OptimizerConfig, OptimizerError, SamOptimizer, SgdOptimizer
from samopt.mpi import (
    ReplicaMismatchError,
    allreduce_mean,
    broadcast_parameters,
    collective_counts,
    params_digest,
    replicas_consistent,
)


def _rank_grads(rank: int, reverse: bool) -> dict[str, Any]:
    rng = np.random.default_rng(1000 + rank)
    items = [
        ("a64", rng.standard_normal((3, 4))),
        ("b64", rng.standard_normal(())),  # 0-d
        ("c32", rng.standard_normal(5).astype(np.float32)),
        ("d16", rng.standard_normal((2, 2)).astype(np.float16)),
        ("e64", np.asfortranarray(rng.standard_normal((4, 3)))),  # non-contiguous order
        ("f64", rng.standard_normal((6, 4))[::2, 1:3]),  # a strided view
        ("g32", np.zeros((0, 3), dtype=np.float32)),  # size 0
    ]
    if reverse:
        items.reverse()
    return dict(items)


def test_allreduce_mean_is_the_mean_and_leaves_inputs_alone(comm: Any) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    grads = _rank_grads(rank, reverse=rank % 2 == 1)  # insertion order differs per rank
    before = {k: (np.array(v, copy=True), v.flags.c_contiguous) for k, v in grads.items()}
    everyone = h.all_ranks(comm, {k: np.array(v) for k, v in grads.items()})

    out = allreduce_mean(grads, comm)

    # The layout agreement, then one Allreduce per bucket dtype: float64, and float32
    # (shared by float16).
    assert collective_counts() == {"Allreduce": 3, "Bcast": 0, "allgather": 0}
    assert list(out) == sorted(grads)
    for k, g in grads.items():
        np.testing.assert_array_equal(g, before[k][0])  # inputs untouched
        assert g.flags.c_contiguous == before[k][1]
        assert out[k] is not g and not np.shares_memory(out[k], g)
        assert out[k].dtype == g.dtype and out[k].shape == g.shape
        ref = sum(np.asarray(e[k], dtype=np.float64) for e in everyone) / size
        tol = {2: 1e-3, 4: 1e-6, 8: 1e-15}[g.dtype.itemsize]
        np.testing.assert_allclose(out[k], ref, rtol=tol, atol=tol)
    h.assert_same_on_all_ranks(comm, h.bits(out), "allreduce_mean result")


def test_allreduce_mean_single_dtype_is_a_single_collective(comm: Any) -> None:
    grads = {f"g{i}": np.full(i + 1, float(comm.Get_rank())) for i in range(20)}
    out = allreduce_mean(grads, comm)
    assert collective_counts()["Allreduce"] == 2  # the agreement and the one buffer
    mean = sum(range(comm.Get_size())) / comm.Get_size()
    for v in out.values():
        np.testing.assert_array_equal(v, mean)


def test_allreduce_mean_of_nothing(comm: Any) -> None:
    assert allreduce_mean({}, comm) == {}
    assert collective_counts()["Allreduce"] == 1  # every rank still takes part: the agreement


def test_allreduce_mean_mismatch_raises_on_every_rank(comm: Any) -> None:
    """Same sizes, different shapes: every rank raises instead of mixing values."""
    shape = (2, 3) if comm.Get_rank() == 0 else (3, 2)
    with pytest.raises(ReplicaMismatchError) as info:
        allreduce_mean({"a": np.ones(shape)}, comm)
    assert info.value.key == "a"
    assert "'a': float64 of shape (2, 3) on rank 0, float64 of shape (3, 2) on " in str(info.value)
    h.assert_same_on_all_ranks(comm, str(info.value), "error message")


def test_allreduce_mean_invalid_entry_raises_on_every_rank(comm: Any) -> None:
    g = np.ones(4) if comm.Get_rank() == 0 else np.ones(4, dtype=np.int64)
    with pytest.raises(OptimizerError) as info:
        allreduce_mean({"x": np.zeros(2), "y": g}, comm)
    assert getattr(info.value, "key", None) == "y"
    h.assert_same_on_all_ranks(comm, str(info.value), "error message")


@pytest.mark.parametrize("root", [0, -1], ids=["root0", "last_rank"])
def test_broadcast_parameters_in_place(comm: Any, root: int) -> None:
    root %= comm.Get_size()
    rank = comm.Get_rank()
    rng = np.random.default_rng(rank)
    base = rng.standard_normal((5, 4))
    params = {
        "w": rng.standard_normal((3, 4)),
        "v": base[:, 1:3].T,  # a non-contiguous view: written through
        "s": np.array(float(rank)),  # 0-d
        "h": rng.standard_normal(7).astype(np.float32),
    }
    ids = {k: id(v) for k, v in params.items()}
    root_values = comm.bcast(h.copy_params(params), root=root)
    broadcast_parameters(params, comm, root=root)
    # The agreement, then one Bcast per dtype.
    assert collective_counts() == {"Allreduce": 1, "Bcast": 2, "allgather": 0}
    assert {k: id(v) for k, v in params.items()} == ids
    for k, v in params.items():
        np.testing.assert_array_equal(v, root_values[k])
    np.testing.assert_array_equal(base[:, 1:3].T, root_values["v"])
    assert replicas_consistent(params, comm)


def test_broadcast_parameters_mismatch_changes_nothing(comm: Any) -> None:
    rank = comm.Get_rank()
    params = {"w": np.full(3, float(rank)), "extra" if rank == 0 else "other": np.zeros(2)}
    before = h.bits(params)
    with pytest.raises(ReplicaMismatchError):
        broadcast_parameters(params, comm)
    assert h.bits(params) == before
    assert collective_counts()["Bcast"] == 0


def test_broadcast_parameters_read_only_raises_everywhere(comm: Any) -> None:
    w = np.full(3, float(comm.Get_rank()))
    if comm.Get_rank() == 1:
        w.flags.writeable = False
    with pytest.raises(OptimizerError) as info:
        broadcast_parameters({"w": w}, comm, root=0)
    assert getattr(info.value, "key", None) == "w"
    with pytest.raises(ValueError):
        broadcast_parameters({"w": w}, comm, root=comm.Get_size())


def test_replicas_consistent_detects_one_flipped_bit(comm: Any) -> None:
    params: dict[str, Any] = {"a": np.linspace(0, 1, 10), "b": np.ones((2, 2), np.float32)}
    assert replicas_consistent(params, comm)
    assert collective_counts() == {"Allreduce": 1, "Bcast": 0, "allgather": 0}
    if comm.Get_rank() == comm.Get_size() - 1:
        params["a"].view(np.uint64)[3] ^= np.uint64(1)
    assert not replicas_consistent(params, comm)


def test_replicas_consistent_includes_optimizer_state(comm: Any) -> None:
    params = {"a": np.linspace(0, 1, 10)}
    opt = SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.1)), rho=0.05)
    assert replicas_consistent(params, comm, opt)
    local = h.copy_params(params)
    if comm.Get_rank() == 0:  # a step on a copy: same params, different momentum
        opt.step(local, {"a": np.ones(10)})
    assert replicas_consistent(params, comm)
    assert not replicas_consistent(params, comm, opt)


def test_params_digest_ignores_order_and_layout() -> None:
    a = np.arange(12.0).reshape(3, 4)
    d1 = params_digest({"x": a, "y": np.zeros(2)})
    d2 = params_digest({"y": np.zeros(2), "x": np.asfortranarray(a)})
    assert d1 == d2
    assert params_digest({"x": a, "y": -np.zeros(2)}) != d1  # -0.0 is another bit pattern
    assert params_digest({"x": a.astype(np.float32), "y": np.zeros(2)}) != d1
    assert 0 <= d1 < 2**56
