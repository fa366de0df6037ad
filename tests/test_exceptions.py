"""samopt's exceptions survive pickling (class, message and .key), e.g. across
multiprocessing or a DataLoader worker. Regression test."""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable

import numpy as np
import pytest
from samopt import (
    NonFiniteGradientError,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
    TrainError,
)


def _raised(call: Callable[[], Any]) -> BaseException:
    with pytest.raises(TrainError) as ei:
        call()
    return ei.value


def _first_step_twice() -> None:
    sam = SamOptimizer(SgdOptimizer(), 0.1)
    p = {"w": np.ones(2)}
    sam.first_step(p, {"w": np.ones(2)})
    sam.first_step(p, {"w": np.ones(2)})


CASES: dict[str, tuple[Callable[[], Any], type, Any]] = {
    "missing_grad": (lambda: SgdOptimizer().step({"layer.w": np.ones(2)}, {}),
                     OptimizerError, "layer.w"),
    "nonfinite": (lambda: SgdOptimizer().step({"b": np.ones(2)},
                                              {"b": np.array([1.0, np.nan])}),
                  NonFiniteGradientError, "b"),
    "config": (lambda: OptimizerConfig(learning_rate=-1.0), OptimizerError, "learning_rate"),
    "rho": (lambda: SamOptimizer(SgdOptimizer(), 0.0), OptimizerError, "rho"),
    "state": (lambda: SgdOptimizer().load_state_dict({"lr": np.array(0.1),
                                                      "bogus": np.zeros(1)}),
              OptimizerError, "bogus"),
    "first_step_twice": (_first_step_twice, OptimizerError, ...),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_raised_exceptions_pickle(name: str, protocol: int) -> None:
    call, cls, key = CASES[name]
    e = _raised(call)
    assert type(e) is cls or (cls is OptimizerError and isinstance(e, OptimizerError)
                              and not isinstance(e, NonFiniteGradientError))
    if key is not ...:
        assert e.key == key
    e2 = pickle.loads(pickle.dumps(e, protocol=protocol))
    assert type(e2) is type(e)
    assert str(e2) == str(e)
    assert e2.args == e.args
    assert e2.key == e.key
    assert isinstance(e2, TrainError) and isinstance(e2, ValueError)
    assert isinstance(e2, Exception)


@pytest.mark.parametrize("name", list(CASES))
def test_raised_exceptions_copy(name: str) -> None:
    call, _, _ = CASES[name]
    e = _raised(call)
    for e2 in (copy.copy(e), copy.deepcopy(e)):
        assert type(e2) is type(e) and str(e2) == str(e) and e2.key == e.key


@pytest.mark.parametrize("cls", [TrainError, OptimizerError, NonFiniteGradientError])
def test_directly_constructed_exceptions_pickle(cls: type) -> None:
    e = cls("something went wrong")
    assert str(e) == "something went wrong" or "something went wrong" in str(e)
    assert getattr(e, "key", None) is None
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        e2 = pickle.loads(pickle.dumps(e, protocol=protocol))
        assert type(e2) is cls and str(e2) == str(e) and getattr(e2, "key", None) is None


def test_hierarchy() -> None:
    assert issubclass(TrainError, Exception)
    assert issubclass(OptimizerError, TrainError) and issubclass(OptimizerError, ValueError)
    assert issubclass(NonFiniteGradientError, OptimizerError)
    assert not issubclass(TrainError, ValueError)
