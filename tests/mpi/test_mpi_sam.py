"""DataParallelSam under ``mpirun -n 2`` (see run.sh)."""

from __future__ import annotations

from typing import Any

import mpi_helpers as h
import numpy as np
import pytest
import samopt
from samopt import (
    AdamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
)
from samopt.mpi import (
    DataParallelSam,
    broadcast_parameters,
    collective_counts,
    replicas_consistent,
    reset_collective_counts,
)

STEPS = 20
RHO = 0.1


def _base(kind: str) -> Any:
    if kind == "sgd":
        return SgdOptimizer(OptimizerConfig(learning_rate=0.05, momentum=0.9))
    return AdamOptimizer(OptimizerConfig(learning_rate=0.01))


def _grad_fn(X: Any, Y: Any) -> Any:
    return lambda p: h.mse_loss_and_grads(p, X, Y)


# --------------------------------------------------------------------------------------
# Equivalence with one process
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sync_perturbation_matches_one_process_on_the_full_batch(comm: Any, base: str) -> None:
    """Two ranks on half-batches == one process on the full batch (float64, 1e-12)."""
    size = comm.Get_size()
    dp_params, X, Y = h.make_problem(seed=1, n=16 * size)
    ref_params = h.copy_params(dp_params)
    dp = DataParallelSam(SamOptimizer(_base(base), rho=RHO), comm, sync_perturbation=True)
    ref = SamOptimizer(_base(base), rho=RHO)
    rng = np.random.default_rng(7)  # the same batches on every rank
    worst = 0.0
    for _ in range(STEPS):
        idx = rng.permutation(X.shape[0])  # a new full batch order, each rank its half
        Xb, Yb = X[idx], Y[idx]
        Xs, Ys = h.shard(comm, Xb, Yb)
        loss = dp.sam_step(dp_params, _grad_fn(Xs, Ys))

        ref_loss, g = h.mse_loss_and_grads(ref_params, Xb, Yb)
        ref.first_step(ref_params, g)
        ref.second_step(ref_params, h.mse_loss_and_grads(ref_params, Xb, Yb)[1])

        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
        worst = max([worst] + [h.rel_err(dp_params[k], ref_params[k]) for k in ref_params])
    assert_moved = any(
        h.rel_err(dp_params[k], h.make_problem(seed=1, n=16 * size)[0][k]) > 1e-3 for k in dp_params
    )
    h.assert_all_ranks(comm, worst <= 1e-12, f"max relative error {worst:.3g} > 1e-12")
    h.assert_all_ranks(comm, assert_moved, "the parameters did not move")
    h.assert_same_on_all_ranks(comm, h.bits(dp_params), "parameters")
    h.assert_same_on_all_ranks(comm, h.state_bits(dp.optimizer), "optimizer state")


def test_msharpness_replicas_stay_bitwise_identical(comm: Any) -> None:
    """sync_perturbation=False: every rank perturbs with its own shard's gradient, the
    replicas stay bitwise identical and match a one-process m-sharpness reference."""
    size = comm.Get_size()
    params, X, Y = h.make_problem(seed=2, n=12 * size)
    ref_params = h.copy_params(params)
    dp = DataParallelSam(
        SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.05, momentum=0.9)), rho=RHO),
        comm,
    )
    ref_base = h.SgdMomentumReference(lr=0.05, momentum=0.9)
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(STEPS):
        idx = rng.permutation(X.shape[0])
        Xb, Yb = X[idx], Y[idx]
        Xs, Ys = h.shard(comm, Xb, Yb)
        loss = dp.sam_step(params, _grad_fn(Xs, Ys))
        shards = [(Xb[r * 12 : (r + 1) * 12], Yb[r * 12 : (r + 1) * 12]) for r in range(size)]
        ref_loss = h.msharpness_reference_step(
            ref_params, shards, h.mse_loss_and_grads, RHO, ref_base
        )
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
        h.assert_same_on_all_ranks(comm, h.bits(params), "parameters")
        worst = max([worst] + [h.rel_err(params[k], ref_params[k]) for k in params])
    h.assert_all_ranks(comm, worst <= 1e-12, f"max relative error {worst:.3g} > 1e-12")
    h.assert_same_on_all_ranks(comm, h.state_bits(dp.optimizer), "optimizer state")
    assert replicas_consistent(params, comm, dp.optimizer)  # type: ignore[arg-type]
    assert dp.replicas_consistent(params)


def test_float32_params_with_float16_grads(comm: Any) -> None:
    params, X, Y = h.make_problem(seed=4, n=8 * comm.Get_size(), dtype=np.float32)
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm, sync_perturbation=True)
    Xs, Ys = h.shard(comm, X, Y)
    before = h.copy_params(params)

    def grad_fn(p: Any) -> Any:
        loss, g = h.mse_loss_and_grads(p, Xs, Ys)
        return loss, {k: v.astype(np.float16) for k, v in g.items()}

    for _ in range(3):
        dp.sam_step(params, grad_fn)
    assert all(params[k].dtype == np.float32 for k in params)
    assert any(not np.array_equal(params[k], before[k]) for k in params)
    h.assert_same_on_all_ranks(comm, h.bits(params), "parameters")


def test_interval_alternates_sam_and_plain_steps(comm: Any) -> None:
    """SamOptimizer(interval=2): SAM on calls 0, 2, 4, ...; a plain base step (one gradient,
    one all-reduce) otherwise; the same trajectory as one process's sam_step."""
    size = comm.Get_size()
    params, X, Y = h.make_problem(seed=11, n=8 * size)
    ref_params = h.copy_params(params)

    def make() -> Any:
        return SamOptimizer(_base("sgd"), rho=RHO, interval=2)

    dp = DataParallelSam(make(), comm, sync_perturbation=True)
    ref = make()
    Xs, Ys = h.shard(comm, X, Y)
    counts = []
    for _ in range(6):
        dp.sam_step(params, _grad_fn(Xs, Ys))
        counts.append(dp.last_step_collectives)
        ref.sam_step(ref_params, _grad_fn(X, Y))
    # Each step: an agreement, its averages, an agreement after second_step.
    assert counts == [4, 3, 4, 3, 4, 3]
    assert dp.collectives_per_step(params) == 4
    assert dp.collectives_per_step(params, sam=False) == 3
    worst = max(h.rel_err(params[k], ref_params[k]) for k in params)
    h.assert_all_ranks(comm, worst <= 1e-12, f"max relative error {worst:.3g} > 1e-12")


def test_loss_is_the_mean_of_the_local_losses(comm: Any) -> None:
    """Also with float32 parameters only (the loss then rides in the float32 buffer)."""
    params = {"w": np.ones(2, dtype=np.float32)}
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm)
    local = 1.0 / 3.0 + comm.Get_rank() * 1e-9
    loss = dp.sam_step(params, lambda p: (local, {"w": np.ones(2, dtype=np.float32)}))
    assert dp.local_loss == local
    expected = sum(1.0 / 3.0 + r * 1e-9 for r in range(comm.Get_size())) / comm.Get_size()
    assert abs(loss - expected) <= 1e-13
    h.assert_same_on_all_ranks(comm, loss, "returned loss")


# --------------------------------------------------------------------------------------
# Collective failure
# --------------------------------------------------------------------------------------


def _failing_step(
    comm: Any, sync: bool, culprit: int, phase: int, corrupt: Any
) -> tuple[Any, dict[str, Any], DataParallelSam, BaseException | None]:
    """Three good steps, then a step whose ``phase``-th gradient is corrupted on rank
    ``culprit``; returns (params, snapshot before the bad step, dp, raised exception)."""
    params, X, Y = h.make_problem(seed=5, n=8 * comm.Get_size())
    dp = DataParallelSam(
        SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.05)), rho=RHO),
        comm,
        sync_perturbation=sync,
    )
    Xs, Ys = h.shard(comm, X, Y)
    for _ in range(3):
        dp.sam_step(params, _grad_fn(Xs, Ys))
    snapshot = {"params": h.bits(params), "state": h.state_bits(dp.optimizer)}
    calls = [0]

    def bad_grad_fn(p: Any) -> Any:
        loss, g = h.mse_loss_and_grads(p, Xs, Ys)
        if comm.Get_rank() == culprit and calls[0] == phase:
            calls[0] += 1
            return corrupt(loss, g)
        calls[0] += 1
        return loss, g

    raised: BaseException | None = None
    try:
        dp.sam_step(params, bad_grad_fn)
    except BaseException as exc:  # inspected by the caller (KeyboardInterrupt too)
        raised = exc
    return params, snapshot, dp, raised


def _nan_in_w1(loss: float, g: dict[str, Any]) -> Any:
    g["W1"][1, 2] = np.nan
    return loss, g


def _check_unchanged_and_usable(comm: Any, params: Any, snapshot: Any, dp: Any) -> None:
    h.assert_all_ranks(comm, h.bits(params) == snapshot["params"], "parameters changed")
    h.assert_all_ranks(comm, h.state_bits(dp.optimizer) == snapshot["state"], "state changed")
    # The ranks are still in step: a good step works and keeps the replicas identical.
    X = np.linspace(-1, 1, 5 * 4).reshape(4, 5)
    Y = np.ones((4, 3))
    dp.sam_step(params, _grad_fn(X, Y))
    h.assert_all_ranks(comm, h.bits(params) != snapshot["params"], "the good step did nothing")
    assert dp.replicas_consistent(params)


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
@pytest.mark.parametrize("phase", [0, 1], ids=["at_w", "at_perturbed"])
@pytest.mark.parametrize("culprit", [0, -1], ids=["rank0", "last_rank"])
def test_nan_on_one_rank_raises_on_every_rank(
    comm: Any, sync: bool, phase: int, culprit: int
) -> None:
    culprit %= comm.Get_size()
    params, snapshot, dp, raised = _failing_step(comm, sync, culprit, phase, _nan_in_w1)
    h.assert_all_ranks(
        comm, type(raised) is NonFiniteGradientError, f"raised {type(raised).__name__}"
    )
    assert raised is not None
    h.assert_same_on_all_ranks(comm, getattr(raised, "key", None), "error key")
    assert getattr(raised, "key", None) == "W1"
    # With m-sharpness the NaN at w reaches first_step, which raises on its rank: that rank
    # raises its own exception, the others the collective one, naming the culprit.
    own = not sync and phase == 0
    if comm.Get_rank() != culprit or not own:
        assert f"rank {culprit}: non-finite gradient for key 'W1'" in str(raised)
    messages = h.all_ranks(comm, str(raised))
    others = [m for r, m in enumerate(messages) if r != culprit or not own]
    assert all(m == others[0] for m in others), messages
    # Every rank made the same number of collectives.
    h.assert_same_on_all_ranks(comm, dp.last_step_collectives, "collectives in the failed step")
    _check_unchanged_and_usable(comm, params, snapshot, dp)


def test_exception_in_grad_fn_on_one_rank(comm: Any) -> None:
    """The rank where grad_fn raised raises that very exception; the others a TrainError
    that says where and what."""

    def boom(loss: float, g: Any) -> Any:
        raise RuntimeError("disk on fire")

    params, snapshot, dp, raised = _failing_step(comm, False, 1, 1, boom)
    if comm.Get_rank() == 1:
        assert type(raised) is RuntimeError and str(raised) == "disk on fire"
    else:
        assert type(raised) is TrainError
        assert (
            "rank 1: exception in grad_fn at the perturbed point (RuntimeError: disk on fire)"
            in str(raised)
        )
    _check_unchanged_and_usable(comm, params, snapshot, dp)


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
def test_invalid_gradient_on_one_rank(comm: Any, sync: bool) -> None:
    def wrong_shape(loss: float, g: Any) -> Any:
        g["b2"] = np.zeros(g["b2"].size + 1)
        return loss, g

    params, snapshot, dp, raised = _failing_step(comm, sync, 0, 0, wrong_shape)
    h.assert_all_ranks(comm, type(raised) is OptimizerError, f"raised {type(raised)!r}")
    h.assert_same_on_all_ranks(comm, getattr(raised, "key", None), "error key")
    assert getattr(raised, "key", None) == "b2"
    _check_unchanged_and_usable(comm, params, snapshot, dp)


def test_most_severe_failure_wins(comm: Any) -> None:
    """NaN on one rank (found while averaging) and an exception on another: TrainError (not
    the skippable NonFiniteGradientError) where no exception was raised."""
    params, X, Y = h.make_problem(seed=6, n=4 * comm.Get_size())
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm, sync_perturbation=True)
    before = h.bits(params)

    def grad_fn(p: Any) -> Any:
        loss, g = h.mse_loss_and_grads(p, X, Y)
        if comm.Get_rank() == 0:
            g["b1"][0] = np.inf
            return loss, g
        raise KeyError("label")

    expected: type[BaseException] = TrainError if comm.Get_rank() == 0 else KeyError
    with pytest.raises(expected) as info:
        dp.sam_step(params, grad_fn)
    assert type(info.value) is expected
    if comm.Get_rank() == 0:
        assert "rank 0: non-finite gradient for key 'b1'" in str(info.value)
        assert "rank 1: exception in grad_fn at the current point (KeyError: 'label')" in str(
            info.value
        )
    h.assert_all_ranks(comm, h.bits(params) == before, "parameters changed")


def test_failed_first_step_on_every_rank_is_reported_collectively(comm: Any) -> None:
    """An optimizer error in first_step (here: a perturbation already pending) is caught,
    reported in the next collective, and leaves the replicas as they were."""
    params, X, Y = h.make_problem(seed=7, n=4 * comm.Get_size())
    sam = SamOptimizer(SgdOptimizer(), rho=RHO)
    dp = DataParallelSam(sam, comm)
    _loss, g = h.mse_loss_and_grads(params, X, Y)
    sam.first_step(params, g)  # misuse: a pending perturbation
    perturbed = h.bits(params)
    with pytest.raises(OptimizerError):
        dp.sam_step(params, _grad_fn(X, Y))
    h.assert_all_ranks(comm, h.bits(params) == perturbed, "parameters changed")
    sam.restore(params)


def test_no_spurious_overflow_in_the_average(comm: Any) -> None:
    """Finite float32 gradients near the top of the range average without overflow (each
    rank divides before the sum)."""
    params = {"w": np.ones(3, dtype=np.float32)}

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def first_step(self, params: Any, grads: Any) -> None:
            self.seen.append(np.array(grads["w"]))

        def second_step(self, params: Any, grads: Any) -> None:
            self.seen.append(np.array(grads["w"]))

        def restore(self, params: Any) -> None:
            pass

    rec = Recorder()
    dp = DataParallelSam(rec, comm, sync_perturbation=True)
    big = np.float32(3e38)
    dp.sam_step(params, lambda p: (0.0, {"w": np.array([1.0, big, -big], dtype=np.float32)}))
    for g in rec.seen:
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, np.array([1.0, big, -big], dtype=np.float32), rtol=1e-6)


# --------------------------------------------------------------------------------------
# Collective counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
@pytest.mark.parametrize("mixed", [False, True], ids=["float64", "float32+float64"])
def test_collectives_per_step(comm: Any, sync: bool, mixed: bool) -> None:
    """(2 if sync else 1) all-reduces per parameter dtype per step, whatever the number of
    arrays; counted by samopt.mpi and, independently, on a wrapped communicator."""
    params, X, Y = h.make_problem(seed=8, n=4 * comm.Get_size())
    for i in range(12):  # many small arrays still make one bucket per dtype
        params[f"extra{i:02d}"] = np.full((i % 3 + 1, 2), 0.5)
    if mixed:
        params["W2"] = params["W2"].astype(np.float32)
        params["extra05"] = params["extra05"].astype(np.float32)
    Xs, Ys = h.shard(comm, X, Y)

    def grad_fn(p: Any) -> Any:
        loss, g = h.mse_loss_and_grads(p, Xs, Ys)
        g.update({k: np.ones_like(v) * 1e-3 for k, v in p.items() if k.startswith("extra")})
        return loss, g

    counting = h.CountingComm(comm)
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), counting, sync_perturbation=sync)
    # An agreement, the averages, an agreement after second_step.
    expected = (2 if sync else 1) * (2 if mixed else 1) + 2
    assert dp.collectives_per_step(params) == expected
    reset_collective_counts()
    steps = 5
    for _ in range(steps):
        dp.sam_step(params, grad_fn)
        assert dp.last_step_collectives == expected
    assert collective_counts() == {"Allreduce": expected * steps, "Bcast": 0, "allgather": 0}
    assert counting.calls == {"Allreduce": expected * steps}
    h.assert_same_on_all_ranks(comm, h.bits(params), "parameters")


def test_empty_params(comm: Any) -> None:
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm, sync_perturbation=True)
    rank = comm.Get_rank()
    loss = dp.sam_step({}, lambda p: (float(rank), {}))
    assert loss == sum(range(comm.Get_size())) / comm.Get_size()
    assert dp.last_step_collectives == 4  # two agreements, two averages of the status only


# --------------------------------------------------------------------------------------
# Set-up helpers and other optimizers
# --------------------------------------------------------------------------------------


def test_broadcast_then_train_from_a_common_start(comm: Any) -> None:
    """Every rank initializes differently; broadcast_parameters gives a common start."""
    params, X, Y = h.make_problem(seed=100 + comm.Get_rank(), n=4 * comm.Get_size())
    assert not replicas_consistent(params, comm)
    broadcast_parameters(params, comm, root=0)
    assert replicas_consistent(params, comm)
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm)
    Xs, Ys = h.shard(comm, X, Y)
    for _ in range(3):
        dp.sam_step(params, _grad_fn(Xs, Ys))
    assert dp.replicas_consistent(params)


def test_python_two_phase_optimizer(comm: Any) -> None:
    """Any object with first_step/second_step/restore works (duck typing)."""

    class Plain:
        """Not SAM at all: first_step does nothing, second_step is SGD."""

        def __init__(self) -> None:
            self.calls: list[str] = []

        def first_step(self, params: Any, grads: Any) -> None:
            self.calls.append("first")

        def second_step(self, params: Any, grads: Any) -> None:
            self.calls.append("second")
            for k in params:
                params[k] -= 0.1 * grads[k]

        def restore(self, params: Any) -> None:
            self.calls.append("restore")

    params = {"w": np.zeros(4)}
    opt = Plain()
    dp = DataParallelSam(opt, comm, sync_perturbation=True)
    r = comm.Get_rank()
    dp.sam_step(params, lambda p: (0.0, {"w": np.full(4, float(r))}))
    mean = sum(range(comm.Get_size())) / comm.Get_size()
    np.testing.assert_array_equal(params["w"], np.full(4, -0.1 * mean))
    assert opt.calls == ["first", "second"]


def test_gsam_needs_sync_perturbation(comm: Any) -> None:
    gsam_cls = getattr(samopt, "GsamOptimizer", None)
    if gsam_cls is None:
        pytest.skip("samopt has no GsamOptimizer yet")
    with pytest.raises(OptimizerError):
        DataParallelSam(gsam_cls(SgdOptimizer()), comm)
    params, X, Y = h.make_problem(seed=9, n=4 * comm.Get_size())
    dp = DataParallelSam(gsam_cls(SgdOptimizer()), comm, sync_perturbation=True)
    Xs, Ys = h.shard(comm, X, Y)
    for _ in range(3):
        dp.sam_step(params, _grad_fn(Xs, Ys))
    assert dp.replicas_consistent(params)


def test_failing_second_step_restores_and_raises_everywhere(comm: Any) -> None:
    """second_step gets the same inputs on every rank, so it fails on every rank; the
    pending perturbation is abandoned (restore) and each rank raises its exception."""

    class Broken:
        def __init__(self) -> None:
            self.sam = SamOptimizer(SgdOptimizer(), rho=RHO)

        def first_step(self, params: Any, grads: Any) -> None:
            self.sam.first_step(params, grads)

        def second_step(self, params: Any, grads: Any) -> None:
            raise ZeroDivisionError("broken base")

        def restore(self, params: Any) -> None:
            self.sam.restore(params)

    params, X, Y = h.make_problem(seed=12, n=4 * comm.Get_size())
    before = h.bits(params)
    opt = Broken()
    dp = DataParallelSam(opt, comm)
    with pytest.raises(ZeroDivisionError, match="broken base"):
        dp.sam_step(params, _grad_fn(*h.shard(comm, X, Y)))
    assert h.bits(params) == before
    assert not opt.sam.pending


def test_grad_fn_returning_garbage(comm: Any) -> None:
    params = {"w": np.ones(2)}
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=RHO), comm, sync_perturbation=True)
    with pytest.raises(TrainError):
        dp.sam_step(params, lambda p: "not a tuple")  # type: ignore[arg-type,return-value]
    with pytest.raises(TrainError):
        dp.sam_step(params, lambda p: (0.0, [np.ones(2)]))  # type: ignore[arg-type,return-value]
    with pytest.raises(OptimizerError) as info:
        dp.sam_step(params, lambda p: (0.0, {"w": np.ones(2, dtype=np.int64)}))
    assert getattr(info.value, "key", None) == "w"
    np.testing.assert_array_equal(params["w"], np.ones(2))


def test_constructor_checks(comm: Any) -> None:
    with pytest.raises(TypeError):
        DataParallelSam(SgdOptimizer(), comm)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DataParallelSam(SamOptimizer(SgdOptimizer()), object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DataParallelSam(SamOptimizer(SgdOptimizer()), comm, sync_perturbation=1)  # type: ignore[arg-type]
