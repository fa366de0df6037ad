"""Many arrays (issue 16): state dicts read and written in one native pass, names sorted by
their leading bytes, and everything that held for a few arrays holding for thousands."""

from __future__ import annotations

import numpy as np
import pytest
import samopt
from samopt import OptimizerError


def many(count: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Names with long common prefixes and non-ASCII text: sorting cannot lean on the start.
    names = [f"encoder.layers.{i % 97}.attention.é{i}" for i in range(count)]
    params = {name: rng.standard_normal(1 + i % 5) for i, name in enumerate(names)}
    grads = {name: rng.standard_normal(p.shape) * 0.01 for name, p in params.items()}
    return params, grads


def sam() -> samopt.SamOptimizer:
    return samopt.SamOptimizer(samopt.AdamOptimizer(samopt.OptimizerConfig(learning_rate=1e-2)))


def train(opt: samopt.SamOptimizer, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
          steps: int) -> None:
    for k in range(steps):
        scaled = {name: g * (1 + k) for name, g in grads.items()}
        opt.first_step(params, scaled)
        opt.second_step(params, scaled)


def test_state_dict_lists_names_in_str_order_and_resumes_bit_exactly() -> None:
    params, grads = many(3000)
    reference = {k: v.copy() for k, v in params.items()}
    straight = sam()
    train(straight, reference, grads, 4)

    opt = sam()
    train(opt, params, grads, 2)
    opt.first_step(params, grads)  # a pending step is part of the state
    state = opt.state_dict()
    per_name = [k[len("m_"):] for k in state if k.startswith("m_")]
    assert per_name == sorted(params)
    assert [k[len("saved_"):] for k in state if k.startswith("saved_")] == sorted(params)
    opt.restore(params)

    # Loaded into a fresh optimizer from a dict in another order, and from a plain mapping.
    shuffled = dict(reversed(list(state.items())))
    resumed = sam()
    resumed.load_state_dict(shuffled)
    resumed.restore(params)
    train(resumed, params, {k: g * 3 for k, g in grads.items()}, 1)
    train(resumed, params, {k: g * 4 for k, g in grads.items()}, 1)
    for name in params:
        assert params[name].tobytes() == reference[name].tobytes(), name


def test_state_arrays_of_any_aligned_layout_load_and_others_are_refused() -> None:
    params, grads = many(5)
    opt = sam()
    train(opt, params, grads, 1)
    state = opt.state_dict()
    name = sorted(params)[2]
    m = state["m_" + name]
    # Unaligned: copied first; a strided view: gathered. Both load with their values.
    raw = np.zeros(m.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].view(m.dtype)
    unaligned[:] = m
    assert not unaligned.flags.aligned
    spread = np.zeros(2 * m.size)
    spread[::2] = m
    for variant in (unaligned, spread[::2]):
        fresh = sam()
        fresh.load_state_dict({**state, "m_" + name: variant})
        assert fresh.state_dict()["m_" + name].tobytes() == m.tobytes()
    bad = {
        "byte-swapped": m.astype(m.dtype.newbyteorder()),
        "integer": m.astype(np.int64),
        "not an array": m.tolist(),
        "NaN": np.full_like(m, np.nan),
    }
    for why, value in bad.items():
        fresh = sam()
        with pytest.raises(OptimizerError) as raised:
            fresh.load_state_dict({**state, "m_" + name: value})
        assert raised.value.key == "m_" + name, why
        assert fresh.state_dict() == sam().state_dict()
    negative = sam()
    with pytest.raises(OptimizerError, match="negative") as raised:
        negative.load_state_dict({**state, "v_" + name: -np.abs(m) - 1})
    assert raised.value.key == "v_" + name


def test_the_first_failing_name_is_reported_whatever_the_dict_order() -> None:
    params, grads = many(50)
    opt = sam()
    train(opt, params, grads, 1)
    state = opt.state_dict()
    first, later = sorted(params)[3], sorted(params)[40]
    del state["v_" + first], state["v_" + later]
    for order in (state, dict(reversed(list(state.items())))):
        with pytest.raises(OptimizerError, match="partner") as raised:
            sam().load_state_dict(order)
        assert raised.value.key == "m_" + first
