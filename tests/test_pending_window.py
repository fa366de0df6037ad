"""Between first_step and second_step the parameters belong to the pending step: its
restore would wipe any other optimizer's write to them, so such a write is refused (a
TrainError that changes nothing) until the step ends; reading them stays allowed."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from samopt import (
    AdamOptimizer,
    GsamOptimizer,
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
    compute_gradient_norm,
)

CFG = OptimizerConfig(learning_rate=0.1, momentum=0.9)


def problem() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(5)
    params = {
        "w": rng.standard_normal((4, 3)),
        "b": rng.standard_normal(3).astype(np.float32),
        "t": rng.standard_normal((6, 5))[::2, 1:4],  # strided: staged by the kernels
    }
    g0 = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    g1 = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    return params, g0, g1


def bits(arrays: dict[str, Any]) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in sorted(arrays.items())}


def copies(params: dict[str, Any]) -> dict[str, Any]:
    return {k: np.array(v) for k, v in params.items()}


def test_another_optimizers_step_is_refused_until_the_step_ends() -> None:
    params, g0, g1 = problem()
    reference = copies(params)
    sam = SamOptimizer(SgdOptimizer(CFG), rho=0.05)
    other = SgdOptimizer(CFG)
    expected = SamOptimizer(SgdOptimizer(CFG), rho=0.05)

    sam.first_step(params, g0)
    expected.first_step(reference, g0)
    perturbed, other_state = bits(params), bits(other.state_dict())
    for name in ("w", "b", "t"):  # each parameter alone is refused too
        with pytest.raises(OptimizerError) as info:
            other.step({name: params[name]}, {name: g1[name]})
        assert isinstance(info.value, TrainError)
        assert info.value.key == name
        assert "awaits its second_step" in str(info.value)
    assert bits(params) == perturbed
    assert bits(other.state_dict()) == other_state

    # Reading the parameters, even through samopt, is fine between the phases.
    norm = compute_gradient_norm(params)
    assert norm == pytest.approx(
        np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in params.values())),
        rel=1e-12,
    )

    sam.second_step(params, g1)
    expected.second_step(reference, g1)
    assert bits(params) == bits(reference)
    assert bits(sam.state_dict()) == bits(expected.state_dict())

    other.step(params, g1)  # the step has ended: the arrays are free again
    assert bits(params) != bits(reference)


def test_a_second_sam_first_step_on_the_same_arrays_is_refused() -> None:
    params, g0, _ = problem()
    first, second = SamOptimizer(SgdOptimizer(CFG)), SamOptimizer(AdamOptimizer(CFG))
    first.first_step(params, g0)
    perturbed = bits(params)
    with pytest.raises(OptimizerError, match="awaits its second_step"):
        second.first_step(params, g0)
    with pytest.raises(OptimizerError, match="awaits its second_step"):
        first.base_optimizer.step(params, g0)  # its own base, called directly, too
    assert bits(params) == perturbed and not second.pending
    first.restore(params)
    second.first_step(params, g0)
    second.restore(params)


@pytest.mark.parametrize("ending", ["restore", "load_state_dict", "sam_step_error"])
def test_every_way_a_pending_step_ends_frees_the_arrays(ending: str) -> None:
    params, g0, g1 = problem()
    sam = SamOptimizer(SgdOptimizer(CFG))
    fresh_state = sam.state_dict()
    other = SgdOptimizer(CFG)
    if ending == "sam_step_error":
        calls = []

        def grad_fn(p: Any) -> Any:
            calls.append(len(calls))
            if len(calls) == 2:  # at the perturbed point: refused, then the step is undone
                with pytest.raises(OptimizerError, match="awaits its second_step"):
                    other.step(p, g1)
                raise KeyboardInterrupt
            return 0.0, g0

        with pytest.raises(KeyboardInterrupt):
            sam.sam_step(params, grad_fn)
    else:
        sam.first_step(params, g0)
        with pytest.raises(OptimizerError):
            other.step(params, g1)
        if ending == "restore":
            sam.restore(params)
        else:
            sam.load_state_dict(fresh_state)
    assert not sam.pending
    other.step(params, g1)


def test_a_failed_second_step_keeps_the_arrays_claimed() -> None:
    params, g0, g1 = problem()
    sam = SamOptimizer(AdamOptimizer(CFG))
    other = SgdOptimizer(CFG)
    sam.first_step(params, g0)
    bad = dict(g1, w=np.full_like(g1["w"], np.nan))
    with pytest.raises(NonFiniteGradientError):
        sam.second_step(params, bad)
    with pytest.raises(OptimizerError, match="awaits its second_step"):
        other.step(params, g1)
    with pytest.raises(OptimizerError):  # names that differ from the pending step's
        sam.second_step({"w": params["w"]}, g1)
    with pytest.raises(OptimizerError, match="awaits its second_step"):
        other.step(params, g1)
    sam.second_step(params, g1)
    other.step(params, g1)


class PythonSgd:
    """A base optimizer written in Python, which steps the arrays through samopt."""

    def __init__(self) -> None:
        self.inner = SgdOptimizer(CFG)

    def step(self, params: Any, grads: Any) -> None:
        self.inner.step(params, grads)

    def zero_grad(self) -> None:
        pass

    def get_lr(self) -> float:
        return self.inner.get_lr()

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


def test_python_base_and_gsam_hold_the_window_too() -> None:
    for make in (lambda: SamOptimizer(PythonSgd()), lambda: GsamOptimizer(SgdOptimizer(CFG))):
        params, g0, g1 = problem()
        reference = copies(params)
        sam, expected = make(), make()
        other = SgdOptimizer(CFG)
        sam.first_step(params, g0)
        expected.first_step(reference, g0)
        with pytest.raises(OptimizerError, match="awaits its second_step"):
            other.step(params, g1)
        sam.second_step(params, g1)  # the Python base may step the arrays itself
        expected.second_step(reference, g1)
        assert bits(params) == bits(reference)
        other.step(params, g1)


def test_a_write_from_another_thread_is_refused_while_pending() -> None:
    params, g0, g1 = problem()
    sam = SamOptimizer(SgdOptimizer(CFG))
    sam.first_step(params, g0)
    perturbed = bits(params)
    raised: list[BaseException] = []

    def other_thread() -> None:
        try:
            SgdOptimizer(CFG).step(params, g1)
        except TrainError as exc:
            raised.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(raised) == 1 and "awaits its second_step" in str(raised[0])
    assert bits(params) == perturbed
    sam.second_step(params, g1)
