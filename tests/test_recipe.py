"""The standard SAM recipe (issue 14): weight decay that is never ignored, Nesterov
momentum, parameter groups keyed by name (regular expressions, callables, lists of names;
per-group hyperparameters, rho, adaptive, perturb=False), learning rates scaled together,
and checkpoints that keep the groups. Checked against the float64 reference of
reference.py (RefSGD, RefAdam and RefGroupedSAM with their `groups`)."""

from __future__ import annotations

import io
import re
from typing import Any, Callable

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    AdamWOptimizer,
    GsamOptimizer,
    OptimizerConfig,
    OptimizerError,
    SamOptimizer,
    SgdOptimizer,
)

STEPS = 100
NAMES = ("emb", "layer.bias", "layer.weight", "norm.scale")
SHAPES = {"emb": (5, 3), "layer.bias": (4,), "layer.weight": (4, 3), "norm.scale": ()}


def make_params(rng: np.random.Generator, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    return {k: np.asarray(rng.standard_normal(SHAPES[k]) * 0.5, dtype=dtype) for k in NAMES}


def make_grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(SHAPES[k]) for k in NAMES}


def assert_close(params: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str,
                 scales: R.ScaleTracker | None = None) -> None:
    """SPEC's tolerances, relative to the largest value each reference array has had (a
    weight passing near zero keeps the rounding error of its larger past)."""
    if scales is not None:
        scales.update(ref, "param:")
    R.assert_params_close(params, ref, what, scales=scales)


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("cls", [SgdOptimizer, AdamOptimizer])
def test_weight_decay_none_is_no_decay_for_sgd_and_adam(cls: Any) -> None:
    """With a zero gradient and the default weight_decay (None) SGD and Adam do not move."""
    params = {"w": np.linspace(-1.0, 1.0, 7)}
    before = params["w"].copy()
    opt = cls(OptimizerConfig(learning_rate=0.1))
    for _ in range(3):
        opt.step(params, {"w": np.zeros(7)})
    assert np.array_equal(params["w"], before)


def test_weight_decay_none_is_adamws_default() -> None:
    params = {"w": np.linspace(-1.0, 1.0, 7)}
    before = params["w"].copy()
    AdamWOptimizer(OptimizerConfig(learning_rate=0.1)).step(params, {"w": np.zeros(7)})
    np.testing.assert_allclose(params["w"], before - 0.1 * 0.01 * before, rtol=1e-15)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_explicit_weight_decay_with_a_zero_gradient_decays(kind: str) -> None:
    """The issue's check: OptimizerConfig(weight_decay=5e-4) was ignored by SGD and Adam."""
    start = np.random.default_rng(1).standard_normal(6)
    params = {"w": start.copy()}
    ref_params = {"w": start.copy()}
    cfg = OptimizerConfig(learning_rate=0.05, weight_decay=5e-4)
    opt: Any = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}[kind](cfg)
    ref: Any = {
        "sgd": lambda: R.RefSGD(0.05, 0.9, weight_decay=5e-4),
        "adam": lambda: R.RefAdam(0.05, 0.9, 0.999, 1e-8, 5e-4),
        "adamw": lambda: R.RefAdamW(0.05, 0.9, 0.999, 1e-8, 5e-4),
    }[kind]()
    for _ in range(20):
        opt.step(params, {"w": np.zeros(6)})
        ref.step(ref_params, {"w": np.zeros(6)})
    assert_close(params, ref_params, kind)
    assert np.all(np.abs(params["w"]) < np.abs(start))


@pytest.mark.parametrize("cls", [AdamOptimizer, AdamWOptimizer])
def test_nesterov_is_refused_where_it_would_be_ignored(cls: Any) -> None:
    with pytest.raises(OptimizerError) as info:
        cls(OptimizerConfig(nesterov=True))
    assert info.value.key == "nesterov"


def test_nesterov_must_be_a_bool() -> None:
    with pytest.raises(OptimizerError) as info:
        OptimizerConfig(nesterov=1)  # type: ignore[arg-type]
    assert info.value.key == "nesterov"


# ----------------------------------------------------------------------------- groups


def selector(kind: str, names: tuple[str, ...]) -> Any:
    """The same set of names as a list, a regular expression or a callable."""
    if kind == "list":
        return list(names)
    if kind == "regex":
        return re.compile("|".join(re.escape(n) for n in names))
    return lambda name: name in names


@st.composite
def grouped_setups(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    lr = draw(st.floats(0.001, 0.02))
    wd = draw(st.one_of(st.none(), st.floats(0.0, 0.05)))
    # Two groups over disjoint names (the others keep the optimizer's values).
    first = draw(st.sampled_from([("layer.bias", "norm.scale"), ("layer.bias",)]))
    second = draw(st.sampled_from([("emb",), ("emb", "layer.weight")]))
    base_overrides = [
        {"weight_decay": 0.0, "lr": lr * draw(st.sampled_from([0.5, 2.0]))},
        {"lr": lr * 0.25} | ({"momentum": 0.5, "nesterov": True} if kind == "sgd" else
                             {"beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6}),
    ]
    sam_overrides = [
        {"perturb": draw(st.booleans())},
        {"rho": draw(st.sampled_from([0.01, 0.3])), "adaptive": draw(st.booleans()),
         "eta": draw(st.sampled_from([0.0, 0.01]))},
    ]
    return dict(
        kind=kind, lr=lr, wd=wd, first=first, second=second,
        selectors=(draw(st.sampled_from(["list", "regex", "callable"])),
                   draw(st.sampled_from(["list", "regex", "callable"]))),
        base_overrides=base_overrides, sam_overrides=sam_overrides,
        rho=draw(st.sampled_from([0.05, 0.1])), adaptive=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float64, np.float32])),
    )


def build(setup: dict[str, Any]) -> tuple[Any, Any]:
    """(samopt SAM with groups, the reference) for a drawn setup."""
    kind, lr, wd = setup["kind"], setup["lr"], setup["wd"]
    names = (setup["first"], setup["second"])
    sel = [selector(setup["selectors"][i], names[i]) for i in range(2)]
    base_groups = [{"params": sel[i], **setup["base_overrides"][i]} for i in range(2)]
    sam_groups = [{"params": sel[i], **setup["sam_overrides"][i]} for i in range(2)]
    cfg = OptimizerConfig(learning_rate=lr, weight_decay=wd)
    cls: Any = {"sgd": SgdOptimizer, "adam": AdamOptimizer, "adamw": AdamWOptimizer}[kind]
    opt = SamOptimizer(cls(cfg, param_groups=base_groups), setup["rho"],
                       adaptive=setup["adaptive"], param_groups=sam_groups)
    key_map = {"epsilon": "eps"}
    ref_base_groups = {n: {key_map.get(k, k): v for k, v in setup["base_overrides"][i].items()}
                       for i in range(2) for n in names[i]}
    ref_sam_groups = {n: setup["sam_overrides"][i] for i in range(2) for n in names[i]}
    eff = R.effective_weight_decay(kind, wd)
    if kind == "sgd":
        ref_base: Any = R.RefSGD(lr, 0.9, weight_decay=eff, groups=ref_base_groups)
    else:
        ref_base = R.RefAdam(lr, 0.9, 0.999, 1e-8, eff, decoupled=kind == "adamw",
                             groups=ref_base_groups)
    ref = R.RefGroupedSAM(ref_base, setup["rho"], setup["adaptive"], 0.0, ref_sam_groups)
    return opt, ref


@settings(max_examples=60)
@given(setup=grouped_setups(), seed=st.integers(0, 2**32 - 1))
def test_parameter_groups_match_the_reference_over_100_steps(setup: dict[str, Any],
                                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = make_params(rng, setup["dtype"])
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    opt, ref = build(setup)
    dtypes = {k: v.dtype for k, v in params.items()}
    scales = R.ScaleTracker()
    for t in range(STEPS):
        g1, g2 = make_grads(rng), make_grads(rng)
        ref.first_step(ref_params, R.to_ref_grads(g1, dtypes))
        opt.first_step(params, g1)
        checked = t in (0, 1, 9, 49, STEPS - 1)
        scales.update(ref_params, "param:")
        if checked:  # the perturbation, where the SAM groups show
            assert_close(params, ref_params, f"first_step {t}", scales)
        ref.second_step(ref_params, R.to_ref_grads(g2, dtypes))
        opt.second_step(params, g2)
        scales.update(ref_params, "param:")
        if checked:
            assert_close(params, ref_params, f"second_step {t}", scales)


def test_a_group_left_out_of_the_perturbation_is_not_moved_nor_counted() -> None:
    params = {"w": np.array([3.0, 4.0]), "b": np.array([1.0])}
    sam = SamOptimizer(SgdOptimizer(), 0.5,
                       param_groups=[{"params": ["b"], "perturb": False}])
    sam.first_step(params, {"w": np.array([3.0, 4.0]), "b": np.array([100.0])})
    # The norm is ||g_w|| = 5 (b is not counted): w moves by 0.5*g/5, b stays.
    np.testing.assert_allclose(params["w"], [3.3, 4.4], rtol=1e-15)
    assert params["b"][0] == 1.0
    assert sam.pending


def test_set_lr_scales_every_group_with_its_own_lr_and_resumes_bit_exactly() -> None:
    base = SgdOptimizer(OptimizerConfig(learning_rate=0.1),
                        param_groups=[{"params": ["layer.bias"], "lr": 0.3}])
    assert base.get_lr() == 0.1
    base.set_lr(0.05)
    assert base.get_lr() == 0.05
    state = base.state_dict()
    assert state["param_groups.0.lr"] == pytest.approx(0.15, rel=1e-15)

    def run(opt: Any, params: dict[str, np.ndarray], seed: int, steps: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            opt.first_step(params, make_grads(rng))
            opt.second_step(params, make_grads(rng))

    def fresh() -> SamOptimizer:
        return SamOptimizer(
            AdamOptimizer(OptimizerConfig(learning_rate=0.01, weight_decay=0.01),
                          param_groups=[{"params": re.compile(r".*bias|norm\..*"),
                                         "weight_decay": 0.0, "lr": 0.02}]),
            0.05, param_groups=[{"params": lambda n: n == "emb", "rho": 0.2}])

    rng = np.random.default_rng(7)
    start = make_params(rng)
    whole, half = fresh(), fresh()
    p_whole = {k: v.copy() for k, v in start.items()}
    p_half = {k: v.copy() for k, v in start.items()}
    whole.set_lr(0.005)
    half.set_lr(0.005)
    run(whole, p_whole, 1, 10)
    run(half, p_half, 1, 10)
    buffer = io.BytesIO()
    np.savez(buffer, **half.state_dict())
    buffer.seek(0)
    resumed = fresh()
    resumed.load_state_dict(dict(np.load(buffer)))
    assert resumed.get_lr() == 0.005
    run(whole, p_whole, 2, 10)
    run(resumed, p_half, 2, 10)
    for k in p_whole:
        assert p_whole[k].tobytes() == p_half[k].tobytes(), k
    assert R.state_snapshot(whole.state_dict()) == R.state_snapshot(resumed.state_dict())


def test_rho_changes_scale_every_groups_rho() -> None:
    """A rho schedule scales a group's own rho with the optimizer's (its ratio is kept)."""
    grads = {"w": np.array([3.0, 4.0]), "e": np.array([0.0, 5.0])}

    def moved(rho: float) -> dict[str, np.ndarray]:
        params = {"w": np.zeros(2), "e": np.zeros(2)}
        sam = SamOptimizer(SgdOptimizer(), 0.1, param_groups=[{"params": ["e"], "rho": 0.3}])
        sam.rho = rho
        sam.first_step(params, grads)
        return params

    n = np.sqrt(50.0)
    got = moved(0.2)
    np.testing.assert_allclose(got["w"], 0.2 * grads["w"] / n, rtol=1e-14)
    np.testing.assert_allclose(got["e"], 0.6 * grads["e"] / n, rtol=1e-14)


# ----------------------------------------------------------------------------- errors

BAD_GROUPS: list[tuple[str, Callable[[], Any], str]] = [
    ("unknown key", lambda: SgdOptimizer(param_groups=[{"params": ["w"], "lrr": 0.1}]), "lrr"),
    ("sgd has no betas", lambda: SgdOptimizer(param_groups=[{"params": ["w"], "beta1": 0.5}]),
     "beta1"),
    ("adam has no momentum",
     lambda: AdamOptimizer(param_groups=[{"params": ["w"], "momentum": 0.5}]), "momentum"),
    ("negative lr", lambda: SgdOptimizer(param_groups=[{"params": ["w"], "lr": -1.0}]), "lr"),
    ("nan wd", lambda: AdamOptimizer(param_groups=[{"params": ["w"],
                                                    "weight_decay": float("nan")}]),
     "weight_decay"),
    ("beta out of range", lambda: AdamOptimizer(param_groups=[{"params": ["w"], "beta2": 1.0}]),
     "beta2"),
    ("nesterov not bool", lambda: SgdOptimizer(param_groups=[{"params": ["w"],
                                                              "nesterov": "yes"}]), "nesterov"),
    ("no params", lambda: SgdOptimizer(param_groups=[{"lr": 0.1}]), "params"),
    ("str selector", lambda: SgdOptimizer(param_groups=[{"params": "bias"}]), "params"),
    ("int in names", lambda: SgdOptimizer(param_groups=[{"params": ["w", 3]}]), "params"),
    ("not a list", lambda: SgdOptimizer(param_groups={"params": ["w"]}), "param_groups"),
    ("group not a dict", lambda: SgdOptimizer(param_groups=[["w"]]), "param_groups"),
    ("lr ratio to 0", lambda: SgdOptimizer(OptimizerConfig(learning_rate=0.0),
                                           param_groups=[{"params": ["w"], "lr": 0.1}]), "lr"),
    ("sam: rho 0", lambda: SamOptimizer(SgdOptimizer(),
                                        param_groups=[{"params": ["w"], "rho": 0.0}]), "rho"),
    ("sam: base key", lambda: SamOptimizer(SgdOptimizer(),
                                           param_groups=[{"params": ["w"], "lr": 0.1}]), "lr"),
    ("sam: perturb not bool", lambda: SamOptimizer(
        SgdOptimizer(), param_groups=[{"params": ["w"], "perturb": 0}]), "perturb"),
    ("gsam: adaptive", lambda: GsamOptimizer(
        SgdOptimizer(), param_groups=[{"params": ["w"], "adaptive": True}]), "adaptive"),
]


@pytest.mark.parametrize("case,build_bad,key", BAD_GROUPS, ids=[c[0] for c in BAD_GROUPS])
def test_bad_groups_are_refused_at_construction(case: str, build_bad: Callable[[], Any],
                                                key: str) -> None:
    with pytest.raises(OptimizerError) as info:
        build_bad()
    assert info.value.key == key, str(info.value)


@pytest.mark.parametrize("sam", [False, True])
def test_a_name_in_two_groups_is_refused_and_changes_nothing(sam: bool) -> None:
    groups = [{"params": re.compile(r"layer\..*")}, {"params": ["layer.bias"]}]
    opt: Any = (SamOptimizer(SgdOptimizer(), param_groups=groups) if sam
                else SgdOptimizer(param_groups=groups))
    rng = np.random.default_rng(0)
    params, grads = make_params(rng), make_grads(rng)
    p_before, g_before = R.snapshot(params), R.snapshot(grads)
    s_before = R.state_snapshot(opt.state_dict())
    call = opt.first_step if sam else opt.step
    with pytest.raises(OptimizerError) as info:
        call(params, grads)
    assert info.value.key == "layer.bias"
    assert "param_groups[0]" in str(info.value) and "param_groups[1]" in str(info.value)
    R.assert_same_snapshot(p_before, R.snapshot(params))
    R.assert_same_snapshot(g_before, R.snapshot(grads))
    assert R.state_snapshot(opt.state_dict()) == s_before
    if sam:
        assert not opt.pending


def test_a_state_dict_of_other_groups_is_refused() -> None:
    grouped = SgdOptimizer(param_groups=[{"params": ["w"], "lr": 0.5}])
    plain = SgdOptimizer()
    with pytest.raises(OptimizerError) as info:
        plain.load_state_dict(grouped.state_dict())
    assert info.value.key == "param_groups.0.lr"
    with pytest.raises(OptimizerError) as info:
        grouped.load_state_dict(plain.state_dict())
    assert info.value.key == "param_groups.0.lr"
