"""flat_params (issue 16): many arrays as views of one buffer, each call over an intact
arena made over the buffer as one array — with the same results as the call made array
by array, every promise kept (atomic errors that name the parameter, bit-exact resume),
and the views still right when the caller replaces one of them."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    RefAdam,
    RefSAM,
    RefSGD,
    assert_params_close,
    snapshot,
)
from samopt import NonFiniteGradientError, OptimizerConfig, OptimizerError
from samopt._flat import FLAT_KEY

Shapes = dict[str, tuple[int, ...]]

SHAPES: Shapes = {
    "layer2.weight": (3, 4),
    "layer1.bias": (4,),
    "layer1.weight": (2, 2, 3),
    "scale": (),
    "empty": (0, 3),
    "layer10.weight": (5,),
}


def values(shapes: Shapes, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) * scale for name, shape in shapes.items()}


def arena(shapes: Shapes, content: dict[str, np.ndarray], dtype: Any = np.float64
          ) -> samopt.FlatParams:
    flat = samopt.flat_params(shapes, dtype)
    for name, value in content.items():
        flat[name][...] = value
    return flat


def plain(content: dict[str, np.ndarray], dtype: Any = np.float64) -> dict[str, np.ndarray]:
    return {name: np.array(value, dtype=dtype) for name, value in content.items()}


def adam(**config: Any) -> samopt.AdamOptimizer:
    return samopt.AdamOptimizer(OptimizerConfig(learning_rate=1e-2, **config))


def sam(**kwargs: Any) -> samopt.SamOptimizer:
    return samopt.SamOptimizer(adam(), rho=0.1, **kwargs)


def sam_steps(opt: samopt.SamOptimizer, params: Any, grads: Any, steps: int, seed: int
              ) -> None:
    """`steps` SAM steps whose gradients are written into `grads`' arrays in place."""
    for k in range(steps):
        g0, g1 = values(SHAPES, seed + 2 * k, 0.1), values(SHAPES, seed + 2 * k + 1, 0.1)
        for name in SHAPES:
            grads[name][...] = g0[name]
        opt.first_step(params, grads)
        for name in SHAPES:
            grads[name][...] = g1[name]
        opt.second_step(params, grads)


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def test_views_share_one_buffer_in_name_order() -> None:
    flat = samopt.flat_params(SHAPES)
    assert list(flat) == list(SHAPES)
    assert flat.flat.shape == (sum(int(np.prod(s)) for s in SHAPES.values()),)
    offset = 0
    for name in sorted(SHAPES):
        view = flat[name]
        assert view.shape == SHAPES[name] and view.flags.c_contiguous and view.flags.writeable
        assert np.shares_memory(view, flat.flat) or view.size == 0
        if view.size:
            start = (view.__array_interface__["data"][0]
                     - flat.flat.__array_interface__["data"][0]) // 8
            assert start == offset
        offset += view.size
    flat["layer1.bias"][...] = 7.0
    assert np.count_nonzero(flat.flat == 7.0) == 4
    grads = flat.zeros_like(np.float32)
    assert list(grads) == list(SHAPES) and grads.flat.dtype == np.float32
    assert not np.shares_memory(grads.flat, flat.flat)


@pytest.mark.parametrize("bad, key", [
    ({"w": (2, -1)}, "w"),
    ({"w": (2.0,)}, "w"),
    ({"w": "3"}, "w"),
    ({"\x00w": (1,)}, "\x00w"),
])
def test_bad_layouts_are_refused(bad: dict[str, Any], key: str) -> None:
    with pytest.raises(OptimizerError) as raised:
        samopt.flat_params(bad)
    assert raised.value.key == key


def test_bad_dtypes_and_mappings_are_refused() -> None:
    with pytest.raises(OptimizerError) as raised:
        samopt.flat_params({"w": (2,)}, np.int64)
    assert raised.value.key == "dtype"
    with pytest.raises(OptimizerError) as raised:
        samopt.flat_params([("w", (2,))])  # type: ignore[arg-type]
    assert raised.value.key == "shapes"
    with pytest.raises(OptimizerError) as raised:
        samopt.flat_params({1: (2,)})  # type: ignore[dict-item]
    assert raised.value.key == "1"


ELEMENTWISE: dict[str, Callable[[], samopt.NativeOptimizer]] = {
    "sgd": lambda: samopt.SgdOptimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=1e-3)),
    "adam": lambda: adam(grad_clip=0.05),
    "adamw": lambda: samopt.AdamWOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "adagrad": lambda: samopt.AdagradOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "rmsprop": lambda: samopt.RMSpropOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "nadam": lambda: samopt.NAdamOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "adamax": lambda: samopt.AdaMaxOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "radam": lambda: samopt.RAdamOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "adabelief": lambda: samopt.AdaBeliefOptimizer(OptimizerConfig(learning_rate=1e-2)),
    "lion": lambda: samopt.LionOptimizer(samopt.LionConfig(learning_rate=1e-3)),
}


@pytest.mark.parametrize("kind", sorted(ELEMENTWISE))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_an_element_wise_step_over_the_arena_is_bitwise_the_step_array_by_array(
    kind: str, dtype: Any
) -> None:
    start = values(SHAPES, 1)
    flat, separate = arena(SHAPES, start, dtype), plain(start, dtype)
    flat_grads, separate_grads = flat.zeros_like(), plain(values(SHAPES, 2), dtype)
    on_flat, on_separate = ELEMENTWISE[kind](), ELEMENTWISE[kind]()
    for k in range(5):
        g = values(SHAPES, 10 + k, 0.1)
        for name in SHAPES:
            flat_grads[name][...] = g[name]
            separate_grads[name][...] = g[name]
        on_flat.step(flat, flat_grads)
        on_separate.step(separate, separate_grads)
    assert on_flat._flat is not None  # the calls were made over the buffer
    assert same_bits(dict(flat), separate)
    assert same_bits(on_flat.state_dict(), on_separate.state_dict())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), adaptive=st.booleans(),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_sam_over_the_arena_follows_the_reference_for_100_steps(
    seed: int, adaptive: bool, dtype: Any
) -> None:
    start = values(SHAPES, seed)
    params = arena(SHAPES, start, dtype)
    grads = params.zeros_like()
    opt = samopt.SamOptimizer(adam(), rho=0.05, adaptive=adaptive, eta=0.01)
    ref_params = {k: np.asarray(v, dtype=dtype).astype(np.float64) for k, v in start.items()}
    ref = RefSAM(RefAdam(1e-2, 0.9, 0.999, 1e-8), 0.05, adaptive=adaptive, eta=0.01)
    # Gradients independent of the weights: with a loss-driven gradient, float32's rounding
    # feeds back through 100 Adam steps and the comparison would measure chaos, not samopt.
    for step in range(100):
        for phase, ref_phase, which in ((opt.first_step, ref.first_step, 0),
                                        (opt.second_step, ref.second_step, 1)):
            g = values(SHAPES, seed + 1000 + 2 * step + which, 0.1)
            for name in SHAPES:
                grads[name][...] = g[name]
            phase(params, grads)
            ref_phase(ref_params, {k: v.astype(np.float64) for k, v in dict(grads).items()})
    assert opt._flat is not None
    assert_params_close(dict(params), ref_params, "flat SAM", f64_tol=1e-10)


def test_sam_over_the_arena_matches_the_step_array_by_array_up_to_the_norms_rounding(
) -> None:
    start = values(SHAPES, 3)
    flat = arena(SHAPES, start)
    separate = plain(start)
    on_flat, on_separate = sam(), sam()
    sam_steps(on_flat, flat, flat.zeros_like(), 20, 5)
    sam_steps(on_separate, separate, plain(values(SHAPES, 0)), 20, 5)
    assert on_flat._flat is not None and on_separate._flat is None
    for name in SHAPES:
        np.testing.assert_allclose(flat[name], separate[name], rtol=1e-13, atol=1e-15)
    assert list(on_flat.state_dict()) == list(on_separate.state_dict())


def test_gsam_over_the_arena_matches_separate_arrays_and_resumes_mid_step() -> None:
    def gsam() -> samopt.GsamOptimizer:
        return samopt.GsamOptimizer(adam(), rho_max=0.1, alpha=0.3)

    start = values(SHAPES, 6)
    flat, separate = arena(SHAPES, start), plain(start)
    on_flat, on_separate = gsam(), gsam()
    sam_steps(on_flat, flat, flat.zeros_like(), 8, 11)
    sam_steps(on_separate, separate, plain(values(SHAPES, 0)), 8, 11)
    assert on_flat._flat is not None
    for name in SHAPES:
        np.testing.assert_allclose(flat[name], separate[name], rtol=1e-13, atol=1e-15)

    # Between the phases: the state dict holds GSAM's first gradient per name, and a new
    # optimizer over a copy of the arena finishes the step bit for bit as the first does.
    grads = flat.zeros_like()
    grads.flat[...] = np.linspace(-0.1, 0.1, grads.flat.size)
    on_flat.first_step(flat, grads)
    state = on_flat.state_dict()
    assert [k[len("grad0_"):] for k in state if k.startswith("grad0_")] == sorted(SHAPES)
    copy = pickle.loads(pickle.dumps(flat))
    resumed = gsam()
    resumed.load_state_dict(state)
    grads.flat[...] = np.linspace(0.2, -0.1, grads.flat.size)
    resumed.second_step(copy, grads)
    on_flat.second_step(flat, grads)
    assert resumed._flat is not None
    assert same_bits(dict(copy), dict(flat))
    assert same_bits(resumed.state_dict(), on_flat.state_dict())


def test_state_dict_of_an_arena_resumes_bit_exactly_and_has_per_name_keys() -> None:
    start = values(SHAPES, 4)
    straight = arena(SHAPES, start)
    opt = sam()
    sam_steps(opt, straight, straight.zeros_like(), 20, 7)

    params = arena(SHAPES, start)
    first = sam()
    grads = params.zeros_like()
    sam_steps(first, params, grads, 10, 7)
    state = first.state_dict()
    names = sorted(SHAPES)
    assert [k[2:] for k in state if k.startswith("m_")] == names
    assert all(state["m_" + n].shape == SHAPES[n] for n in names)
    assert not any(FLAT_KEY in k for k in state)
    checkpoint = io.BytesIO()
    np.savez(checkpoint, **state)
    checkpoint.seek(0)
    saved = dict(np.load(checkpoint))

    # Through a checkpoint file, into a fresh optimizer, stepped over a new arena.
    resumed_params = pickle.loads(pickle.dumps(params))
    assert isinstance(resumed_params, samopt.FlatParams)
    resumed = sam()
    resumed.load_state_dict(saved)
    for k in range(10, 20):
        g0, g1 = values(SHAPES, 7 + 2 * k, 0.1), values(SHAPES, 8 + 2 * k, 0.1)
        resumed_grads = resumed_params.zeros_like()
        for name in SHAPES:
            resumed_grads[name][...] = g0[name]
        resumed.first_step(resumed_params, resumed_grads)
        for name in SHAPES:
            resumed_grads[name][...] = g1[name]
        resumed.second_step(resumed_params, resumed_grads)
    assert resumed._flat is not None
    assert same_bits(dict(resumed_params), dict(straight))
    assert same_bits(resumed.state_dict(), opt.state_dict())


def test_a_pending_first_step_over_an_arena_is_in_the_state_dict() -> None:
    params = arena(SHAPES, values(SHAPES, 5))
    grads = params.zeros_like()
    opt = sam()
    sam_steps(opt, params, grads, 2, 1)
    before = {k: v.copy() for k, v in params.items()}
    grads.flat[...] = 0.01
    opt.first_step(params, grads)
    state = opt.state_dict()
    assert [k[len("saved_"):] for k in state if k.startswith("saved_")] == sorted(SHAPES)
    for name in SHAPES:
        assert state["saved_" + name].tobytes() == before[name].tobytes()
    # Resumed by an optimizer that is stepped array by array: the restore is exact.
    copy = {k: v.copy() for k, v in params.items()}
    resumed = sam()
    resumed.load_state_dict(state)
    resumed.second_step(copy, {k: np.full(s, 0.02) for k, s in SHAPES.items()})
    opt.second_step(params, {k: np.full(s, 0.02) for k, s in SHAPES.items()})
    assert same_bits(copy, dict(params))


def test_replacing_a_view_steps_every_array_right_and_moves_the_state_once() -> None:
    start = values(SHAPES, 6)
    params = arena(SHAPES, start)
    grads = params.zeros_like()
    separate = plain(start)
    separate_grads = plain(values(SHAPES, 0))
    on_flat, on_separate = adam(), adam()

    def both(steps: range) -> None:
        for k in steps:
            g = values(SHAPES, 30 + k, 0.1)
            for name in SHAPES:
                grads[name][...] = g[name]
                separate_grads[name][...] = g[name]
            on_flat.step(params, grads)
            on_separate.step(separate, separate_grads)

    both(range(3))
    assert on_flat._flat is not None
    # The caller replaces one parameter by an array of its own: that call and the next are
    # made array by array, the new array and the other views all stepped.
    replacement = params["layer1.bias"].copy()
    params["layer1.bias"] = replacement
    old_view = params._arena.views[list(SHAPES).index("layer1.bias")]
    both(range(3, 6))
    assert on_flat._flat is None
    assert params["layer1.bias"] is replacement
    assert same_bits(dict(params), separate)
    assert same_bits(on_flat.state_dict(), on_separate.state_dict())
    untouched = old_view.copy()
    # The old view is no parameter any more: its values stay where they were.
    assert old_view.tobytes() == untouched.tobytes()
    # Put back as a view of the buffer: the calls go over the buffer again.
    old_view[...] = replacement
    params["layer1.bias"] = old_view
    both(range(6, 9))
    assert on_flat._flat is not None
    assert same_bits(dict(params), separate)
    assert same_bits(on_flat.state_dict(), on_separate.state_dict())


def test_state_held_for_fortran_arrays_moves_into_an_arena_in_c_order() -> None:
    # Steps over separate arrays, the 2-d and 3-d ones Fortran-ordered, then over an arena
    # holding the same values: the state moves into the arena's C-ordered buffers, and
    # the steps go on bit for bit as over the separate arrays.
    start = values(SHAPES, 8)
    fortran = {name: np.array(value, order="F") for name, value in start.items()}
    twin = {name: value.copy(order="K") for name, value in fortran.items()}
    on_fortran, on_twin = sam(), sam()
    sam_steps(on_fortran, fortran, {k: np.zeros_like(v) for k, v in fortran.items()}, 3, 20)
    sam_steps(on_twin, twin, {k: np.zeros_like(v) for k, v in twin.items()}, 3, 20)
    assert any(a.ndim > 1 and not a.flags.c_contiguous for a in fortran.values())
    flat = arena(SHAPES, fortran)
    sam_steps(on_fortran, flat, flat.zeros_like(), 4, 40)
    sam_steps(on_twin, twin, {k: np.zeros_like(v) for k, v in twin.items()}, 4, 40)
    assert on_fortran._flat is not None
    for name in SHAPES:
        np.testing.assert_allclose(flat[name], twin[name], rtol=1e-13, atol=1e-15)
    mine, theirs = on_fortran.state_dict(), on_twin.state_dict()
    assert list(mine) == list(theirs)
    for key in mine:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-13, atol=1e-15)


def test_state_held_for_some_of_an_arenas_names_keeps_the_calls_array_by_array() -> None:
    # A state dict with m and v for every name but one: the arena's first call cannot
    # hold it in one buffer per slot, so it is made array by array (which makes the
    # missing state); the next calls gather it and go over the buffer. Right throughout.
    start = values(SHAPES, 9)
    first = adam()
    separate = plain(start)
    first.step(separate, plain(values(SHAPES, 50, 0.1)))
    state = {k: v for k, v in first.state_dict().items() if not k.endswith("layer1.bias")}
    flat, reference = arena(SHAPES, separate), adam()
    on_flat = adam()
    on_flat.load_state_dict(state)
    reference.load_state_dict(state)
    twin = plain(dict(flat))
    for k in range(3):
        g = values(SHAPES, 60 + k, 0.1)
        grads = flat.zeros_like()
        for name in SHAPES:
            grads[name][...] = g[name]
        on_flat.step(flat, grads)
        reference.step(twin, plain(g))
        assert (on_flat._flat is None) == (k == 0)
        assert same_bits(dict(flat), twin)
        assert same_bits(on_flat.state_dict(), reference.state_dict())


@pytest.mark.parametrize("change", ["reshaped", "read-only", "new key", "dropped key",
                                    "reordered", "plain dict"])
def test_an_arena_changed_in_place_is_stepped_array_by_array_or_refused(change: str) -> None:
    start = values(SHAPES, 8)
    params = arena(SHAPES, start)
    grads = params.zeros_like()
    grads.flat[...] = 0.1
    opt = adam()
    opt.step(params, grads)
    assert opt._flat is not None
    call_params: Any = params
    if change in ("reshaped", "read-only"):
        # Refused array by array, exactly as for separate arrays, with nothing changed.
        if change == "reshaped":
            params["layer2.weight"].shape = (4, 3)
            grads["layer2.weight"].shape = (4, 3)
            name, reason = "m_layer2.weight", "shape"  # its Adam moment no longer fits
        else:
            params["layer1.bias"].flags.writeable = False
            name, reason = "layer1.bias", "read-only"
        assert not params._arena.intact(params)
        before, state = snapshot(params), opt.state_dict()
        with pytest.raises(OptimizerError, match=reason) as raised:
            opt.step(params, grads)
        assert raised.value.key == name
        assert snapshot(params) == before
        assert same_bits(opt.state_dict(), state)
        return
    elif change == "new key":
        params["extra"] = np.ones(2)
        grads["extra"] = np.ones(2)
    elif change == "dropped key":
        del params["scale"], grads["scale"]
    elif change == "reordered":
        call_params = samopt.FlatParams(params._arena)
        value = call_params.pop("scale")
        call_params["scale"] = value
    else:
        # The same views in the same order, but not the arena's mapping: nothing says
        # the caller keeps them together, so they are stepped as separate arrays.
        call_params = dict(params)
    if change != "plain dict":
        assert not params._arena.intact(call_params)
    expected = {k: v.copy() for k, v in call_params.items()}
    reference = adam()
    reference_params = {k: v.copy() for k, v in expected.items()}
    reference.load_state_dict(opt.state_dict())
    reference.step(reference_params, {k: np.asarray(grads[k]).copy() for k in expected})
    opt.step(call_params, grads)
    assert opt._flat is None
    assert same_bits(dict(call_params), reference_params)


def test_a_non_finite_gradient_names_its_parameter_and_changes_nothing() -> None:
    params = arena(SHAPES, values(SHAPES, 9))
    grads = params.zeros_like()
    grads.flat[...] = 0.1
    for opt in (adam(), sam()):
        opt.step(params, grads)
        state = opt.state_dict()
        before, grads_before = snapshot(params), snapshot(grads)
        grads["layer2.weight"][1, 2] = np.nan
        grads["scale"][...] = np.inf  # later in name order than layer2.weight
        grads_before = snapshot(grads)
        phase = opt.first_step if isinstance(opt, samopt.SamOptimizer) else opt.step
        with pytest.raises(NonFiniteGradientError) as raised:
            phase(params, grads)
        assert raised.value.key == "layer2.weight"
        assert "'layer2.weight'" in str(raised.value) and FLAT_KEY not in str(raised.value)
        assert snapshot(params) == before and snapshot(grads) == grads_before
        assert same_bits(opt.state_dict(), state)
        assert pickle.loads(pickle.dumps(raised.value)).key == "layer2.weight"
        grads.flat[...] = 0.1


def test_a_non_finite_parameter_under_asam_names_its_parameter() -> None:
    params = arena(SHAPES, values(SHAPES, 10))
    grads = params.zeros_like()
    grads.flat[...] = 0.1
    params["layer1.weight"][0, 1, 2] = np.inf
    opt = sam(adaptive=True)
    before = snapshot(params)
    with pytest.raises(OptimizerError) as raised:
        opt.first_step(params, grads)
    assert raised.value.key == "layer1.weight"
    assert snapshot(params) == before and not opt.pending


def test_the_same_arena_as_params_and_grads_is_refused() -> None:
    params = arena(SHAPES, values(SHAPES, 11))
    opt = adam()
    before = snapshot(params)
    with pytest.raises(OptimizerError, match="gradient") as raised:
        opt.step(params, params)
    assert FLAT_KEY not in str(raised.value)
    assert snapshot(params) == before


def test_sam_step_over_arenas_and_with_plain_gradients() -> None:
    start = values(SHAPES, 12)
    rng = np.random.default_rng(0)
    target = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    calls: list[type] = []

    def arena_grads(grads: samopt.FlatParams) -> Callable[[Any], Any]:
        def grad_fn(at: Any) -> Any:
            calls.append(type(at))
            for name in SHAPES:
                grads[name][...] = at[name] - target[name]
            return float(sum(np.sum((at[k] - target[k]) ** 2) for k in SHAPES)), grads
        return grad_fn

    def plain_grads(at: Any) -> Any:
        calls.append(type(at))
        return 0.0, {k: np.asarray(at[k]) - target[k] for k in SHAPES}

    flat = arena(SHAPES, start)
    separate = plain(start)
    on_flat, on_separate = sam(), sam()
    for _ in range(5):
        on_flat.sam_step(flat, arena_grads(flat.zeros_like()))
        on_separate.sam_step(separate, plain_grads)
    assert on_flat._flat is not None
    assert calls.count(samopt.FlatParams) == 10  # the caller's own arena, both times
    for name in SHAPES:
        np.testing.assert_allclose(flat[name], separate[name], rtol=1e-13, atol=1e-15)

    # Plain gradients from an arena's params: made array by array, grad_fn called twice.
    calls.clear()
    on_flat.sam_step(flat, plain_grads)
    on_separate.sam_step(separate, plain_grads)
    assert len(calls) == 4 and on_flat._flat is None
    for name in SHAPES:
        np.testing.assert_allclose(flat[name], separate[name], rtol=1e-13, atol=1e-15)

    # An arena at the first point and plain gradients at the second: refused, unchanged.
    switching = iter([arena_grads(flat.zeros_like()), plain_grads])
    before, state = snapshot(flat), on_flat.state_dict()
    with pytest.raises(OptimizerError, match="same kind") as raised:
        on_flat.sam_step(flat, lambda at: next(switching)(at))
    assert raised.value.key == "grads"
    assert snapshot(flat) == before and not on_flat.pending
    assert same_bits(on_flat.state_dict(), state)


def test_optimizers_that_measure_each_array_step_an_arena_array_by_array() -> None:
    start = values(SHAPES, 13)
    for make in (lambda: samopt.LambOptimizer(OptimizerConfig(learning_rate=1e-2)),
                 lambda: samopt.LookSamOptimizer(adam(), rho=0.05),
                 lambda: samopt.SamOptimizer(adam(), gradient_centralization=True)):
        flat, separate = arena(SHAPES, start), plain(start)
        flat_grads = flat.zeros_like()
        flat_grads.flat[...] = np.linspace(-1, 1, flat.flat.size)
        separate_grads = {k: v.copy() for k, v in flat_grads.items()}
        on_flat, on_separate = make(), make()
        for _ in range(3):
            on_flat.step(flat, flat_grads)
            on_separate.step(separate, separate_grads)
        assert on_flat._flat is None
        assert same_bits(dict(flat), separate)


def test_dict_order_of_the_layout_does_not_change_the_result() -> None:
    start = values(SHAPES, 14)
    reversed_shapes = dict(reversed(list(SHAPES.items())))
    results = []
    for shapes in (SHAPES, reversed_shapes):
        params = arena(shapes, start)
        opt = sam()
        sam_steps(opt, params, params.zeros_like(), 5, 3)
        results.append(({k: params[k].copy() for k in SHAPES}, opt.state_dict()))
    assert same_bits(results[0][0], results[1][0])
    assert same_bits(results[0][1], results[1][1])


def test_an_optimizer_over_an_arena_pickles_and_resumes() -> None:
    params = arena(SHAPES, values(SHAPES, 15))
    grads = params.zeros_like()
    opt = sam()
    sam_steps(opt, params, grads, 3, 2)
    copy_opt = pickle.loads(pickle.dumps(opt))
    copy_params = pickle.loads(pickle.dumps(params))
    sam_steps(opt, params, grads, 2, 9)
    sam_steps(copy_opt, copy_params, copy_params.zeros_like(), 2, 9)
    assert same_bits(dict(copy_params), dict(params))
    assert same_bits(copy_opt.state_dict(), opt.state_dict())


def test_sgd_reference_over_an_arena() -> None:
    start = values(SHAPES, 16)
    params = arena(SHAPES, start, np.float32)
    grads = params.zeros_like(np.float64)
    opt = samopt.SgdOptimizer(OptimizerConfig(learning_rate=0.1, momentum=0.9))
    ref = RefSGD(0.1, 0.9)
    ref_params = {k: v.astype(np.float32).astype(np.float64) for k, v in start.items()}
    for k in range(100):
        g = values(SHAPES, 100 + k, 0.1)
        for name in SHAPES:
            grads[name][...] = g[name]
        opt.step(params, grads)
        ref.step(ref_params, {n: g[n].astype(np.float32).astype(np.float64) for n in SHAPES})
    assert opt._flat is not None
    assert_params_close(dict(params), ref_params, "flat SGD")
