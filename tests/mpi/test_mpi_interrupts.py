"""A BaseException on one rank at any point of a data-parallel step, under ``mpirun -n 2``:
every rank puts its replica back and raises — the original exception where it happened, a
TrainError on the others — the replicas stay bitwise identical and the next step works.

Each test runs the failing step on one DataParallelSam and none on a twin that otherwise
takes the same steps: after the failure both must hold bitwise the same parameters and
optimizer state, and stay so over the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpi_helpers as h
import numpy as np
import pytest
from samopt import OptimizerConfig, SamOptimizer, SgdOptimizer, TrainError
from samopt.mpi import DataParallelSam

RHO = 0.1
GOOD_STEPS = 3


class Run:
    """A DataParallelSam and its twin, each with its own copy of the parameters, after
    the same good steps."""

    def __init__(self, comm: Any, sync: bool, make: Callable[[], Any]) -> None:
        self.comm = comm
        self.params, X, Y = h.make_problem(seed=21, n=8 * comm.Get_size())
        self.twin_params = h.copy_params(self.params)
        self.X, self.Y = h.shard(comm, X, Y)
        self.dp = DataParallelSam(make(), comm, sync_perturbation=sync)
        self.twin = DataParallelSam(make(), comm, sync_perturbation=sync)
        for _ in range(GOOD_STEPS):
            self.both_step()

    def good(self, params: Any) -> tuple[float, dict[str, Any]]:
        return h.mse_loss_and_grads(params, self.X, self.Y)

    def both_step(self) -> None:
        self.dp.sam_step(self.params, self.good)
        self.twin.sam_step(self.twin_params, self.good)

    def failing_step(self, grad_fn: Callable[[Any], Any] | None = None) -> BaseException | None:
        try:
            self.dp.sam_step(self.params, grad_fn or self.good)
        except BaseException as exc:  # inspected by the test (KeyboardInterrupt too)
            return exc
        return None

    def check_put_back_and_in_step(self) -> None:
        comm = self.comm
        h.assert_all_ranks(
            comm, h.bits(self.params) == h.bits(self.twin_params), "parameters not put back"
        )
        h.assert_all_ranks(
            comm,
            h.state_bits(self.dp.optimizer) == h.state_bits(self.twin.optimizer),
            "optimizer state not put back",
        )
        h.assert_all_ranks(comm, not getattr(self.dp.optimizer, "pending", False), "pending")
        assert self.dp.replicas_consistent(self.params)
        before = h.bits(self.params)
        self.both_step()
        h.assert_all_ranks(comm, h.bits(self.params) != before, "the next step did nothing")
        h.assert_all_ranks(
            comm, h.bits(self.params) == h.bits(self.twin_params), "the next step differs"
        )
        assert self.dp.replicas_consistent(self.params)


def _sam() -> SamOptimizer:
    return SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.05, momentum=0.9)), rho=RHO)


def _check_raised(comm: Any, raised: BaseException | None, culprit: int, expected: Any,
                  names: str) -> None:
    """The culprit raised ``expected`` itself; every other rank a TrainError whose message,
    the same on all of them, says ``names``."""
    if comm.Get_rank() == culprit:
        assert type(raised) is expected, repr(raised)
    else:
        assert type(raised) is TrainError, repr(raised)
        assert names in str(raised), str(raised)
        assert "(every replica left as it was)" in str(raised)
    others = [m for r, m in enumerate(h.all_ranks(comm, str(raised))) if r != culprit]
    assert all(m == others[0] for m in others), others


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
@pytest.mark.parametrize("phase", [0, 1], ids=["at_w", "at_perturbed"])
@pytest.mark.parametrize("culprit", [0, -1], ids=["rank0", "last_rank"])
def test_keyboard_interrupt_in_grad_fn_on_one_rank(
    comm: Any, sync: bool, phase: int, culprit: int
) -> None:
    culprit %= comm.Get_size()
    run = Run(comm, sync, _sam)
    calls = [0]

    def interrupted(params: Any) -> Any:
        calls[0] += 1
        if comm.Get_rank() == culprit and calls[0] == phase + 1:
            raise KeyboardInterrupt
        return run.good(params)

    raised = run.failing_step(interrupted)
    where = "the current point" if phase == 0 else "the perturbed point"
    names = f"rank {culprit}: exception in grad_fn at {where} (KeyboardInterrupt)"
    _check_raised(comm, raised, culprit, KeyboardInterrupt, names)
    run.check_put_back_and_in_step()


class PythonMomentum:
    """SGD with momentum written in Python (v <- 0.9 v + lr g; p <- p - v, in place). When
    armed, its step raises halfway, after changing some parameters and its own state."""

    def __init__(self) -> None:
        self.v: dict[str, Any] = {}
        self.lr = 0.05
        self.fail: BaseException | None = None

    def step(self, params: Any, grads: Any) -> None:
        for k in sorted(params):
            self.v[k] = 0.9 * self.v.get(k, 0.0) + self.lr * grads[k]
            params[k] -= self.v[k]
            if self.fail is not None and k == "W2":
                fail, self.fail = self.fail, None
                raise fail

    def zero_grad(self) -> None:
        pass

    def get_lr(self) -> float:
        return self.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {f"velocity_{k}": np.array(v, copy=True) for k, v in self.v.items()}

    def load_state_dict(self, state: Any) -> None:
        prefix = "velocity_"
        self.v = {k[len(prefix) :]: np.array(v, copy=True) for k, v in state.items()}


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_python_base_raising_on_one_rank(comm: Any, sync: bool, error: Any) -> None:
    """The other ranks' second_step has committed when the culprit's base raises: they put
    back their copy of the replica from before the step."""
    culprit = comm.Get_size() - 1
    run = Run(comm, sync, lambda: SamOptimizer(PythonMomentum(), rho=RHO))
    if comm.Get_rank() == culprit:
        run.dp.optimizer.base_optimizer.fail = error("the base gave up")  # type: ignore[attr-defined]
    raised = run.failing_step()
    names = f"rank {culprit}: exception in second_step ({error.__name__}: the base gave up)"
    _check_raised(comm, raised, culprit, error, names)
    run.check_put_back_and_in_step()


class InterruptedAfter:
    """A SamOptimizer whose ``phase`` raises KeyboardInterrupt on one rank once the phase
    has returned: an interrupt that arrives as the phase's native call returns, with the
    phase committed."""

    def __init__(self) -> None:
        self.sam = _sam()
        self.trip: str | None = None

    def _interrupt_after(self, phase: str) -> None:
        if self.trip == phase:
            self.trip = None
            raise KeyboardInterrupt

    def first_step(self, params: Any, grads: Any) -> None:
        self.sam.first_step(params, grads)
        self._interrupt_after("first_step")

    def second_step(self, params: Any, grads: Any) -> None:
        self.sam.second_step(params, grads)
        self._interrupt_after("second_step")

    def restore(self, params: Any) -> None:
        self.sam.restore(params)

    @property
    def pending(self) -> bool:
        return self.sam.pending

    def state_dict(self) -> dict[str, Any]:
        return self.sam.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.sam.load_state_dict(state)


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
@pytest.mark.parametrize("phase", ["first_step", "second_step"])
def test_an_interrupt_as_either_phase_returns_on_one_rank(
    comm: Any, sync: bool, phase: str
) -> None:
    culprit = 0
    run = Run(comm, sync, InterruptedAfter)
    if comm.Get_rank() == culprit:
        run.dp.optimizer.trip = phase  # type: ignore[attr-defined]
    raised = run.failing_step()
    names = f"rank {culprit}: exception in {phase} (KeyboardInterrupt)"
    _check_raised(comm, raised, culprit, KeyboardInterrupt, names)
    run.check_put_back_and_in_step()
