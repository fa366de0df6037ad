"""Ranks whose arrays differ in layout, under ``mpirun -n 2``: every collective function
refuses together, naming what differs, and changes nothing.

Before a fixed-size agreement preceded the collectives whose size depends on the layout,
these cases corrupted memory (MPI_ERR_TRUNCATE, free() aborts, heap corruption) or hung.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpi_helpers as h
import numpy as np
import pytest
from samopt import OptimizerConfig, SamOptimizer, SgdOptimizer
from samopt.mpi import (
    DataParallelSam,
    ReplicaMismatchError,
    allreduce_mean,
    broadcast_parameters,
    replicas_consistent,
)

Params = dict[str, Any]


def _others(comm: Any) -> str:
    """How a message names every rank but rank 0."""
    ranks = list(range(1, comm.Get_size()))
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _length(comm: Any) -> tuple[Params, str, str]:
    n = 1000 if comm.Get_rank() == 0 else 1001
    return (
        {"w": np.ones(n)},
        "w",
        f"'w': float64 of shape (1000,) on rank 0, float64 of shape (1001,) on {_others(comm)}",
    )


def _million(comm: Any) -> tuple[Params, str, str]:
    n = 1_000_000 if comm.Get_rank() == 0 else 10
    return (
        {"w": np.ones(n)},
        "w",
        f"'w': float64 of shape (1000000,) on rank 0, float64 of shape (10,) on {_others(comm)}",
    )


def _dtype(comm: Any) -> tuple[Params, str, str]:
    dtype = np.float32 if comm.Get_rank() == 0 else np.float64
    return (
        {"w": np.ones(1000, dtype=dtype)},
        "w",
        f"'w': float32 of shape (1000,) on rank 0, float64 of shape (1000,) on {_others(comm)}",
    )


def _extra(comm: Any) -> tuple[Params, str, str]:
    params: Params = {"w": np.ones(1000)}
    if comm.Get_rank() != 0:
        params["x"] = np.ones(3, dtype=np.float32)
    return params, "x", f"'x': absent on rank 0, float32 of shape (3,) on {_others(comm)}"


def _names(comm: Any) -> tuple[Params, str, str]:
    name = "a" if comm.Get_rank() == 0 else "b"
    others = _others(comm)
    return (
        {name: np.ones(1000)},
        "a",
        f"'a': float64 of shape (1000,) on rank 0, absent on {others}; "
        f"'b': absent on rank 0, float64 of shape (1000,) on {others}",
    )


def _shape(comm: Any) -> tuple[Params, str, str]:
    shape = (2, 3) if comm.Get_rank() == 0 else (3, 2)
    return (
        {"w": np.ones(shape)},
        "w",
        f"'w': float64 of shape (2, 3) on rank 0, float64 of shape (3, 2) on {_others(comm)}",
    )


CASES: dict[str, Callable[[Any], tuple[Params, str, str]]] = {
    "length": _length,
    "length_1e6": _million,
    "dtype": _dtype,
    "extra_parameter": _extra,
    "names": _names,
    "shape": _shape,
}


def _halves(params: Params) -> tuple[float, Params]:
    """grad_fn: a gradient of 0.5 everywhere."""
    return 0.0, {k: np.full_like(v, 0.5) for k, v in params.items()}


def _sam_step(comm: Any, params: Params, sync: bool) -> Callable[[], object]:
    dp = DataParallelSam(
        SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.1)), rho=0.05),
        comm,
        sync_perturbation=sync,
    )
    return lambda: dp.sam_step(params, _halves)


CALLS: dict[str, Callable[[Any, Params], Callable[[], object]]] = {
    "sam_step": lambda comm, params: _sam_step(comm, params, sync=False),
    "sam_step_sync": lambda comm, params: _sam_step(comm, params, sync=True),
    "allreduce_mean": lambda comm, params: lambda: allreduce_mean(params, comm),
    "broadcast_parameters": lambda comm, params: lambda: broadcast_parameters(params, comm),
    "replicas_consistent": lambda comm, params: lambda: replicas_consistent(params, comm),
}


def _still_in_step(comm: Any) -> None:
    """The ranks pair their next collectives as usual."""
    rank = comm.Get_rank()
    mean = allreduce_mean({"z": np.full(3, float(rank))}, comm)["z"]
    np.testing.assert_array_equal(mean, np.full(3, sum(range(comm.Get_size())) / comm.Get_size()))
    params = {"v": np.full(4, float(rank))}
    broadcast_parameters(params, comm)
    assert replicas_consistent(params, comm)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("call", list(CALLS))
def test_a_layout_mismatch_raises_on_every_rank_and_changes_nothing(
    comm: Any, call: str, case: str
) -> None:
    params, key, differs = CASES[case](comm)
    before = h.bits(params)
    run = CALLS[call](comm, params)
    with pytest.raises(ReplicaMismatchError) as info:
        run()
    error = info.value
    assert error.key == key
    assert differs in str(error), str(error)
    assert "(every replica left as it was)" in str(error)
    h.assert_same_on_all_ranks(comm, str(error), "error message")
    h.assert_all_ranks(comm, h.bits(params) == before, "the arrays changed")
    _still_in_step(comm)


def test_a_mismatch_leaves_the_optimizer_as_it_was(comm: Any) -> None:
    rank = comm.Get_rank()
    params: Params = {"w": np.linspace(-1.0, 1.0, 6)}
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.1))), comm)
    dp.sam_step(params, _halves)
    state = h.state_bits(dp.optimizer)
    mismatched = dict(params, **({"extra": np.zeros(2)} if rank == 0 else {}))
    with pytest.raises(ReplicaMismatchError):
        dp.sam_step(mismatched, _halves)
    assert h.state_bits(dp.optimizer) == state
    assert not dp.optimizer.pending  # type: ignore[attr-defined]
    dp.sam_step(params, _halves)  # the next step works
    assert dp.replicas_consistent(params)


def test_ranks_in_different_calls_refuse_together(comm: Any) -> None:
    """One rank in allreduce_mean, the others in replicas_consistent: both fixed-size
    agreements pair, see that the calls differ, and every rank raises."""
    params: Params = {"w": np.ones(5)}
    with pytest.raises(ReplicaMismatchError) as info:
        if comm.Get_rank() == 0:
            allreduce_mean(params, comm)
        else:
            replicas_consistent(params, comm)
    message = str(info.value)
    assert "the ranks are not in the same call" in message
    assert f"rank 0 in allreduce_mean; {_others(comm)} in replicas_consistent" in message
    # Each rank's message starts with the call it is in; the rest is the same everywhere.
    h.assert_same_on_all_ranks(comm, message.split(": ", 1)[1], "error message")
    _still_in_step(comm)


def test_sync_perturbation_that_differs_between_ranks_is_refused(comm: Any) -> None:
    """sync_perturbation=True makes one more average per step: ranks that disagree on it
    would pair an average with an agreement."""
    params: Params = {"w": np.ones(5)}
    before = h.bits(params)
    run = _sam_step(comm, params, sync=comm.Get_rank() == 0)
    with pytest.raises(ReplicaMismatchError) as info:
        run()
    assert "rank 0 in sam_step, a SAM step with sync_perturbation=True" in str(info.value)
    assert h.bits(params) == before
    _still_in_step(comm)
