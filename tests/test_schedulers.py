"""Schedulers (issue 14, section 3): every scheduler's whole sequence against a float64
reference written here from its formula, in the crate's step semantics (step n sets
value(n); get_lr() is value(n), value(0) before the first step) with samopt's fixes;
savez checkpoints resuming bit-exactly at several points of each cycle; param="rho" on
SAM and GSAM; every bad argument and corrupt state refused without changing anything.

The references below do not call samopt: where PyTorch has the schedule they follow its
formulation (CyclicLR's |it/s − 2·cycle + 1|, CosineAnnealingWarmRestarts' epochs), and
the crate's own arithmetic is written out where a test shows what samopt changes."""

from __future__ import annotations

import copy
import math
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import samopt
from hypothesis import given, settings
from hypothesis import strategies as st
from samopt import (
    AdamOptimizer,
    CosineAnnealingLrScheduler,
    CyclicLrMode,
    CyclicLrScheduler,
    ExponentialLrScheduler,
    GsamOptimizer,
    MultiStepLrScheduler,
    NoamScheduler,
    OneCycleLrScheduler,
    OptimizerConfig,
    OptimizerError,
    PlateauMode,
    PolynomialDecayLrScheduler,
    ReduceLROnPlateauScheduler,
    SamOptimizer,
    SgdOptimizer,
    SgdrScheduler,
    StepLrScheduler,
    TrainError,
    WarmupCosineLrScheduler,
    WarmupScheduler,
)

# --- references, from the formulas ------------------------------------------------------
# Each gives value(n): the value step n sets (n >= 1), and get_lr() before any step (n = 0).


def ref_step(initial: float, step_size: int, gamma: float, n: int) -> float:
    return initial * gamma ** (n // step_size)


def ref_exponential(initial: float, gamma: float, n: int) -> float:
    return initial * gamma**n


def ref_cosine(initial: float, eta_min: float, t_max: int, n: int) -> float:
    t = min(n, t_max)
    return eta_min + 0.5 * (initial - eta_min) * (1.0 + math.cos(math.pi * t / t_max))


def ref_warmup(target: float, warmup: int, n: int) -> float:
    return target * min(n, warmup) / warmup


def ref_warmup_cosine(target: float, eta_min: float, warmup: int, total: int, n: int) -> float:
    if warmup > 0 and n <= warmup:
        return target * n / warmup
    t = min(n, total) - warmup
    return eta_min + 0.5 * (target - eta_min) * (1.0 + math.cos(math.pi * t / (total - warmup)))


def ref_one_cycle(
    initial: float, peak: float, final: float, total: int, pct: float, n: int
) -> float:
    p = min(n, total) / total
    if p < pct:
        return initial + (peak - initial) * p / pct
    q = (p - pct) / (1.0 - pct)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * q))


def ref_multistep(initial: float, milestones: Sequence[int], gamma: float, n: int) -> float:
    return initial * gamma ** sum(1 for m in milestones if m <= n)


def ref_polynomial(initial: float, final: float, power: float, decay: int, n: int) -> float:
    return (initial - final) * (1.0 - min(n, decay) / decay) ** power + final


def ref_cyclic(
    base: float, peak: float, step_size: int, mode: CyclicLrMode, gamma: float, n: int
) -> float:
    """PyTorch CyclicLR's value for iteration it = n − 1 (the crate's step n)."""
    if n == 0:
        return base
    it = n - 1
    cycle = math.floor(1 + it / (2 * step_size))
    x = abs(it / step_size - 2 * cycle + 1)
    height = (peak - base) * max(0.0, 1.0 - x)
    if mode is CyclicLrMode.TRIANGULAR:
        scale = 1.0
    elif mode is CyclicLrMode.TRIANGULAR2:
        scale = 1.0 / 2.0 ** (cycle - 1)
    else:
        scale = gamma**it
    return base + height * scale


def ref_noam(model_dim: int, warmup: int, factor: float, n: int) -> float:
    """Vaswani et al. (2017), eq. (3), at step n."""
    if n == 0:
        return 0.0
    if warmup == 0:
        return factor * model_dim**-0.5 * n**-0.5
    return factor * model_dim**-0.5 * min(n**-0.5, n * warmup**-1.5)


def sgdr_periods(t_0: int, t_mult: float, count: int) -> list[int]:
    periods = [t_0]
    while len(periods) < count:
        periods.append(int(periods[-1] * t_mult))
    return periods


def ref_sgdr(eta_max: float, eta_min: float, t_0: int, t_mult: float, n: int) -> float:
    """CosineAnnealingWarmRestarts' value at epoch n − 1 (the crate's step n)."""
    if n == 0:
        return eta_max
    epoch, start = n - 1, 0
    for period in sgdr_periods(t_0, t_mult, n + 1):
        if epoch < start + period:
            t_cur = epoch - start
            return eta_min + (eta_max - eta_min) * (1.0 + math.cos(math.pi * t_cur / period)) / 2
        start += period
    raise AssertionError("unreachable")


class RefPlateau:
    """PyTorch ReduceLROnPlateau's algorithm (rel threshold, no eps), with the threshold
    relative to |best|."""

    def __init__(self, lr: float, mode: str, factor: float, patience: int, threshold: float,
                 min_lr: float, cooldown: int) -> None:
        self.lr, self.mode, self.factor, self.patience = lr, mode, factor, patience
        self.threshold, self.min_lr, self.cooldown = threshold, min_lr, cooldown
        self.best: float | None = None
        self.bad = self.cooling = 0

    def step(self, metric: float) -> float:
        best = self.best
        if best is None:
            better = True
        elif self.mode == "min":
            better = metric < best - self.threshold * abs(best)
        else:
            better = metric > best + self.threshold * abs(best)
        if better:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.cooling > 0:
            self.cooling -= 1
            self.bad = 0
        if self.bad > self.patience:
            new = max(self.lr * self.factor, self.min_lr)
            if new < self.lr:
                self.lr = new
            self.cooling, self.bad = self.cooldown, 0
        return self.lr


# --- the cases: a scheduler, its reference, the steps that cover its cycle(s) ------------


@dataclass
class Case:
    name: str
    build: Callable[..., Any]
    ref: Callable[[int], float]
    steps: int
    scale: float
    """The largest rate: the tolerance is relative to it."""


def cases() -> list[Case]:
    tri, tri2, exp = CyclicLrMode.TRIANGULAR, CyclicLrMode.TRIANGULAR2, CyclicLrMode.EXP_RANGE
    return [
        Case("step", lambda **k: StepLrScheduler(0.1, 7, 0.5, **k),
             lambda n: ref_step(0.1, 7, 0.5, n), 50, 0.1),
        Case("exponential", lambda **k: ExponentialLrScheduler(0.1, 0.93, **k),
             lambda n: ref_exponential(0.1, 0.93, n), 60, 0.1),
        Case("cosine", lambda **k: CosineAnnealingLrScheduler(0.1, 0.001, 25, **k),
             lambda n: ref_cosine(0.1, 0.001, 25, n), 40, 0.1),
        Case("warmup", lambda **k: WarmupScheduler(0.1, 8, **k),
             lambda n: ref_warmup(0.1, 8, n), 20, 0.1),
        Case("warmup_cosine", lambda **k: WarmupCosineLrScheduler(0.1, 0.001, 5, 30, **k),
             lambda n: ref_warmup_cosine(0.1, 0.001, 5, 30, n), 45, 0.1),
        Case("one_cycle", lambda **k: OneCycleLrScheduler(0.004, 0.1, 0.0004, 40, 0.3, **k),
             lambda n: ref_one_cycle(0.004, 0.1, 0.0004, 40, 0.3, n), 50, 0.1),
        Case("multistep", lambda **k: MultiStepLrScheduler(0.1, [3, 10, 11, 25], 0.3, **k),
             lambda n: ref_multistep(0.1, [3, 10, 11, 25], 0.3, n), 35, 0.1),
        Case("polynomial", lambda **k: PolynomialDecayLrScheduler(0.1, 0.002, 2.5, 30, **k),
             lambda n: ref_polynomial(0.1, 0.002, 2.5, 30, n), 40, 0.1),
        Case("cyclic_triangular", lambda **k: CyclicLrScheduler(0.01, 0.1, 4, tri, **k),
             lambda n: ref_cyclic(0.01, 0.1, 4, tri, 0.99994, n), 3 * 8 + 3, 0.1),
        Case("cyclic_triangular2", lambda **k: CyclicLrScheduler(0.01, 0.1, 5, tri2, **k),
             lambda n: ref_cyclic(0.01, 0.1, 5, tri2, 0.99994, n), 4 * 10 + 3, 0.1),
        Case("cyclic_exp_range", lambda **k: CyclicLrScheduler(0.01, 0.1, 3, exp, 0.9, **k),
             lambda n: ref_cyclic(0.01, 0.1, 3, exp, 0.9, n), 4 * 6 + 3, 0.1),
        Case("noam", lambda **k: NoamScheduler(64, 10, 2.0, **k),
             lambda n: ref_noam(64, 10, 2.0, n), 40, 2.0 / 8),
        Case("sgdr", lambda **k: SgdrScheduler(0.1, 0.001, 4, 2.0, **k),
             lambda n: ref_sgdr(0.1, 0.001, 4, 2.0, n), 4 + 8 + 16 + 5, 0.1),
        Case("sgdr_fractional", lambda **k: SgdrScheduler(0.1, 0.0, 3, 1.5, **k),
             lambda n: ref_sgdr(0.1, 0.0, 3, 1.5, n), 3 + 4 + 6 + 9 + 2, 0.1),
    ]


CASES = {case.name: case for case in cases()}

PLATEAU_METRICS = [5.0, 4.0, 4.0, 3.99, 4.2, 4.1, 4.0, 2.0, 2.5, 2.4, 2.3, 2.6, 2.7,
                   2.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 0.9, 1.0, 1.0]


def build_plateau(**kwargs: Any) -> ReduceLROnPlateauScheduler:
    return ReduceLROnPlateauScheduler(0.1, PlateauMode.MIN, 0.5, 1, 0.01, 0.01, 2, **kwargs)


def sgd(lr: float = 0.5) -> SgdOptimizer:
    return SgdOptimizer(OptimizerConfig(learning_rate=lr))


def close(got: float, want: float, scale: float) -> bool:
    return abs(got - want) <= 1e-12 * scale


def run(sched: Any, optimizer: Any, steps: int) -> list[float]:
    """The values the scheduler sets, checking after each step that the optimizer holds
    bitwise the value get_lr() reports."""
    seen = []
    for _ in range(steps):
        sched.step(optimizer)
        value = sched.get_lr()
        assert optimizer.get_lr() == value
        seen.append(value)
    return seen


def snapshot(sched: Any) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in sched.state_dict().items()}


# --- sequences against the references ------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequence_matches_reference(name: str) -> None:
    case = CASES[name]
    optimizer = sgd(0.777)
    sched = case.build()
    assert close(sched.get_lr(), case.ref(0), case.scale)
    assert optimizer.get_lr() == 0.777  # nothing is set before the first step
    seen = run(sched, optimizer, case.steps)
    for n, value in enumerate(seen, start=1):
        assert close(value, case.ref(n), case.scale), (n, value, case.ref(n))


@pytest.mark.parametrize("param", ["lr", "rho"])
def test_every_scheduler_satisfies_the_protocol(param: str) -> None:
    for case in cases():
        assert isinstance(case.build(param=param), samopt.LrScheduler)
    assert isinstance(build_plateau(), samopt.LrScheduler)


def test_exact_anchor_values() -> None:
    """Values the formulas give exactly: the ends of warmups and decays, the peaks."""
    opt = sgd()
    wc = WarmupCosineLrScheduler(0.3, 0.01, 7, 20)
    assert wc.get_lr() == 0.0  # value(0) of a warmup
    seq = run(wc, opt, 25)
    assert seq[0] == 0.3 * (1 / 7) and seq[6] == 0.3 and seq[19] == 0.01
    assert seq[19:] == [0.01] * 6  # clamped past total_steps
    assert WarmupCosineLrScheduler(0.3, 0.01, 0, 20).get_lr() == 0.3  # value(0) without warmup
    cos = run(CosineAnnealingLrScheduler(0.2, 0.05, 9), opt, 15)
    assert cos[8:] == [0.05] * 7
    poly = run(PolynomialDecayLrScheduler(0.2, 0.05, 3.0, 9), opt, 12)
    assert poly[8:] == [0.05] * 4
    one = run(OneCycleLrScheduler(0.01, 0.2, 0.001, 10, 0.5), opt, 12)
    assert close(one[4], 0.2, 0.2) and one[9:] == [0.001] * 3  # the peak at pct_start
    assert max(one) == one[4]
    cyc = run(CyclicLrScheduler(0.01, 0.2, 3, CyclicLrMode.TRIANGULAR), opt, 13)
    assert cyc[0] == cyc[6] == cyc[12] == 0.01  # steps 1, 7, 13 start a cycle
    assert close(cyc[3], 0.2, 0.2) and cyc[3] == cyc[9] == max(cyc)  # peaks at 4 and 10
    noam = NoamScheduler(512, 4000, 1.0)
    assert noam.get_lr() == 0.0
    noam.step(opt)
    assert close(noam.get_lr(), 512**-0.5 * 4000**-1.5, 1e-7)  # the paper's step 1
    ms = run(MultiStepLrScheduler(1.0, [2, 4], 0.5), opt, 5)
    assert ms == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_noam_peaks_at_warmup_steps() -> None:
    noam = NoamScheduler(128, 25, 1.0)
    seq = run(noam, sgd(), 60)
    assert int(np.argmax(seq)) + 1 == 25
    # the crate's n-th step used the paper's step n + 1, so its peak came at step 24
    crate = [ref_noam(128, 25, 1.0, n + 1) for n in range(1, 61)]
    assert int(np.argmax(crate)) + 1 == 24


def test_sgdr_restarts_and_get_lr_is_what_the_optimizer_holds() -> None:
    sched = SgdrScheduler(1.0, 0.0, 3, 2.0)
    opt = sgd()
    assert sched.get_lr() == 1.0
    seq = run(sched, opt, 3 + 6 + 1)  # run() checks opt.get_lr() == sched.get_lr()
    assert seq[0] == 1.0 and seq[3] == 1.0 and seq[9] == 1.0  # restarts at steps 1, 4, 10
    assert all(v < 1.0 for v in seq[1:3] + seq[4:9])
    # the crate's get_lr() after step 3 was the next value (max_lr) while the optimizer
    # held f(2/3); samopt's is the held value
    sched = SgdrScheduler(1.0, 0.0, 3, 2.0)
    run(sched, opt, 3)
    assert sched.get_lr() == opt.get_lr() != 1.0


def test_cyclic_exp_range_uses_gamma_to_the_iteration() -> None:
    gamma, s = 0.8, 4
    seq = run(CyclicLrScheduler.new_exp_range(0.0, 1.0, s, gamma), sgd(), 2 * 2 * s + 1)
    assert close(seq[s], gamma**s, 1.0)  # first peak: iteration s (the crate: gamma^(s+1))
    assert close(seq[3 * s], gamma ** (3 * s), 1.0)
    assert CyclicLrScheduler(0.0, 1.0, 2, CyclicLrMode.TRIANGULAR).gamma == 0.99994


def test_step_and_multistep_set_the_lr_on_every_step() -> None:
    """The crate set the lr only on decay steps: until the first decay the optimizer kept
    its own lr (here 0.5) instead of initial_lr."""
    for sched in (StepLrScheduler(0.1, 5, 0.5), MultiStepLrScheduler(0.1, [5], 0.5)):
        opt = sgd(0.5)
        sched.step(opt)
        assert opt.get_lr() == 0.1


def test_multistep_closed_form_after_resume_into_other_milestones() -> None:
    """Milestones are in the state (the crate's state lacks them) and apply all at once."""
    sched = MultiStepLrScheduler(1.0, [2, 3, 4], 0.5)
    run(sched, sgd(), 3)
    other = MultiStepLrScheduler(1.0, [50], 0.9)
    other.load_state_dict(sched.state_dict())
    assert other.milestones == (2, 3, 4) and other.gamma == 0.5
    assert run(other, sgd(), 2) == [0.125, 0.125]


# --- hypothesis over the constructor arguments ----------------------------------------

rates = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_subnormal=False)
small_counts = st.integers(min_value=1, max_value=40)


def check_against(sched: Any, ref: Callable[[int], float], steps: int, scale: float) -> None:
    opt = sgd()
    scale = max(scale, 1e-300)
    assert close(sched.get_lr(), ref(0), scale)
    for n, value in enumerate(run(sched, opt, steps), start=1):
        assert close(value, ref(n), scale), (n, value, ref(n))


@settings(max_examples=60)
@given(rates, small_counts, st.floats(0.0, 2.0), st.integers(0, 120))
def test_step_property(initial: float, size: int, gamma: float, extra: int) -> None:
    check_against(StepLrScheduler(initial, size, gamma),
                  lambda n: ref_step(initial, size, gamma, n), extra,
                  initial * max(1.0, gamma) ** (extra // size))


@settings(max_examples=60)
@given(rates, st.floats(0.0, 1.0), st.integers(0, 150))
def test_exponential_property(initial: float, gamma: float, steps: int) -> None:
    check_against(ExponentialLrScheduler(initial, gamma),
                  lambda n: ref_exponential(initial, gamma, n), steps, initial)


@settings(max_examples=60)
@given(rates, rates, small_counts)
def test_cosine_property(initial: float, eta_min: float, t_max: int) -> None:
    check_against(CosineAnnealingLrScheduler(initial, eta_min, t_max),
                  lambda n: ref_cosine(initial, eta_min, t_max, n), t_max + 10,
                  max(initial, eta_min))


@settings(max_examples=60)
@given(rates, rates, st.integers(0, 30), small_counts)
def test_warmup_cosine_property(target: float, eta_min: float, warmup: int, span: int) -> None:
    total = warmup + span
    check_against(WarmupCosineLrScheduler(target, eta_min, warmup, total),
                  lambda n: ref_warmup_cosine(target, eta_min, warmup, total, n), total + 10,
                  max(target, eta_min))


@settings(max_examples=40)
@given(rates, small_counts)
def test_warmup_property(target: float, warmup: int) -> None:
    check_against(WarmupScheduler(target, warmup), lambda n: ref_warmup(target, warmup, n),
                  warmup + 5, target)


@settings(max_examples=60)
@given(rates, rates, rates, st.integers(1, 80), st.floats(0.01, 0.99))
def test_one_cycle_property(initial: float, peak: float, final: float, total: int,
                            pct: float) -> None:
    check_against(OneCycleLrScheduler(initial, peak, final, total, pct),
                  lambda n: ref_one_cycle(initial, peak, final, total, pct, n), total + 5,
                  max(initial, peak, final))


@settings(max_examples=60)
@given(rates, st.lists(st.integers(1, 60), unique=True, max_size=6).map(sorted),
       st.floats(0.0, 1.0))
def test_multistep_property(initial: float, milestones: list[int], gamma: float) -> None:
    check_against(MultiStepLrScheduler(initial, milestones, gamma),
                  lambda n: ref_multistep(initial, milestones, gamma, n), 70, initial)


@settings(max_examples=60)
@given(rates, rates, st.floats(0.1, 5.0), small_counts)
def test_polynomial_property(initial: float, final: float, power: float, decay: int) -> None:
    check_against(PolynomialDecayLrScheduler(initial, final, power, decay),
                  lambda n: ref_polynomial(initial, final, power, decay, n), decay + 5,
                  max(initial, final))


@settings(max_examples=80)
@given(rates, rates, st.integers(1, 12), st.sampled_from(list(CyclicLrMode)),
       st.floats(0.5, 1.0), st.integers(2, 4))
def test_cyclic_property(base: float, peak: float, size: int, mode: CyclicLrMode,
                         gamma: float, cycles: int) -> None:
    check_against(CyclicLrScheduler(base, peak, size, mode, gamma),
                  lambda n: ref_cyclic(base, peak, size, mode, gamma, n),
                  cycles * 2 * size + 1, max(base, peak))


@settings(max_examples=60)
@given(st.integers(1, 2048), st.integers(0, 60), st.floats(0.01, 10.0))
def test_noam_property(model_dim: int, warmup: int, factor: float) -> None:
    check_against(NoamScheduler(model_dim, warmup, factor),
                  lambda n: ref_noam(model_dim, warmup, factor, n), 2 * warmup + 10,
                  factor * model_dim**-0.5)


@settings(max_examples=60)
@given(rates, rates, st.integers(1, 12),
       st.one_of(st.sampled_from([1.0, 1.5, 2.0, 3.0]), st.floats(1.0, 3.0)),
       st.integers(3, 4))
def test_sgdr_property(eta_max: float, eta_min: float, t_0: int, t_mult: float,
                       periods: int) -> None:
    steps = sum(sgdr_periods(t_0, t_mult, periods)) + 2
    check_against(SgdrScheduler(eta_max, eta_min, t_0, t_mult),
                  lambda n: ref_sgdr(eta_max, eta_min, t_0, t_mult, n), min(steps, 400),
                  max(eta_max, eta_min))


@settings(max_examples=100)
@given(st.sampled_from(["min", "max"]), st.floats(0.0, 0.99), st.integers(0, 4),
       st.floats(0.0, 0.2), st.floats(0.0, 0.05), st.integers(0, 3),
       st.lists(st.sampled_from([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.02, 2.0]), max_size=40))
def test_plateau_property(mode: str, factor: float, patience: int, threshold: float,
                          min_lr: float, cooldown: int, metrics: list[float]) -> None:
    sched = ReduceLROnPlateauScheduler(0.1, PlateauMode(mode), factor, patience, threshold,
                                       min_lr, cooldown)
    ref = RefPlateau(0.1, mode, factor, patience, threshold, min_lr, cooldown)
    opt = sgd()
    assert sched.get_lr() == 0.1
    for metric in metrics:
        sched.step_with_metric(opt, metric)
        assert sched.get_lr() == ref.step(metric) == opt.get_lr()


# --- ReduceLROnPlateau: PyTorch's counting, and what samopt changes --------------------


def plateau_run(sched: ReduceLROnPlateauScheduler, metrics: Sequence[float]) -> list[float]:
    opt = sgd()
    out = []
    for m in metrics:
        sched.step_with_metric(opt, m)
        assert opt.get_lr() == sched.get_lr()
        out.append(sched.get_lr())
    return out


def test_plateau_patience_as_pytorch() -> None:
    """patience=2: the first 2 bad epochs are ignored, the 3rd reduces (PyTorch's doc);
    the crate reduced on the 2nd, and its patience 0 and 1 were the same."""
    sched = ReduceLROnPlateauScheduler(1.0, PlateauMode.MIN, 0.5, 2, 0.0, 0.0, 0)
    assert plateau_run(sched, [1.0, 1.0, 1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0, 0.5, 0.5]
    zero = ReduceLROnPlateauScheduler(1.0, PlateauMode.MIN, 0.5, 0, 0.0, 0.0, 0)
    one = ReduceLROnPlateauScheduler(1.0, PlateauMode.MIN, 0.5, 1, 0.0, 0.0, 0)
    assert plateau_run(zero, [1.0, 1.0, 1.0]) == [1.0, 0.5, 0.25]
    assert plateau_run(one, [1.0, 1.0, 1.0]) == [1.0, 1.0, 0.5]


def test_plateau_cooldown_still_tracks_the_best() -> None:
    """An improvement during cooldown becomes the best (the crate ignored the metric)."""
    sched = ReduceLROnPlateauScheduler(1.0, PlateauMode.MIN, 0.5, 0, 0.0, 0.0, 2)
    # reduce at the 2nd; cooldown 2 takes 0.5 as the best; then 0.6 is bad -> reduce
    assert plateau_run(sched, [1.0, 1.0, 0.5, 0.7, 0.6]) == [1.0, 0.5, 0.5, 0.5, 0.25]
    assert float(sched.state_dict()["best_metric"]) == 0.5


def test_plateau_negative_metrics() -> None:
    """A worse negative metric is no improvement (best·(1−threshold) would call −9.5 an
    improvement on −10 in MIN mode)."""
    sched = ReduceLROnPlateauScheduler(1.0, PlateauMode.MIN, 0.5, 0, 0.1, 0.0, 0)
    assert plateau_run(sched, [-10.0, -9.5, -12.0, -12.5]) == [1.0, 0.5, 0.5, 0.25]
    up = ReduceLROnPlateauScheduler(1.0, PlateauMode.MAX, 0.5, 0, 0.1, 0.0, 0)
    assert plateau_run(up, [-10.0, -10.5, -8.0, -7.5]) == [1.0, 0.5, 0.5, 0.25]


def test_plateau_floor_and_restarted_count() -> None:
    sched = ReduceLROnPlateauScheduler(1.0, PlateauMode.MAX, 0.1, 0, 0.0, 0.05, 0)
    assert plateau_run(sched, [1.0, 0.0, 0.0, 0.0]) == [1.0, 0.1, 0.05, 0.05]
    assert int(sched.state_dict()["num_bad_epochs"]) == 0


def test_plateau_step_without_metric_and_bad_metrics() -> None:
    sched = build_plateau()
    opt = sgd(0.3)
    with pytest.raises(TrainError, match="step_with_metric"):
        sched.step(opt)
    sched.step_with_metric(opt, np.float32(2.0))
    sched.step_with_metric(opt, np.array(1.5))
    before = snapshot(sched)
    for bad in (math.nan, math.inf, -math.inf, "1.0", None, np.zeros(2)):
        with pytest.raises(OptimizerError) as info:
            sched.step_with_metric(opt, bad)  # type: ignore[arg-type]
        assert info.value.key == "metric"
        assert snapshot(sched) == before
    assert opt.get_lr() == 0.1


# --- driving optimizers: lr through set_lr, rho on SAM and GSAM -----------------------


@pytest.mark.parametrize("kind", ["sgd", "adam", "sam_sgd", "sam_adam", "gsam"])
def test_drives_the_optimizers_lr(kind: str) -> None:
    cfg = OptimizerConfig(learning_rate=0.9)
    opt: Any = {
        "sgd": lambda: SgdOptimizer(cfg),
        "adam": lambda: AdamOptimizer(cfg),
        "sam_sgd": lambda: SamOptimizer(SgdOptimizer(cfg), rho=0.05),
        "sam_adam": lambda: SamOptimizer(AdamOptimizer(cfg), rho=0.05),
        "gsam": lambda: GsamOptimizer(AdamOptimizer(cfg), 0.05),
    }[kind]()
    for case in cases():
        sched = case.build()
        run(sched, opt, case.steps)  # opt.get_lr() == sched.get_lr() after every step
    plateau = build_plateau()
    plateau_run(plateau, PLATEAU_METRICS)
    if hasattr(opt, "rho"):
        assert opt.rho == 0.05  # lr schedules leave rho alone


def test_training_loop_uses_value_k_for_batch_k() -> None:
    """for batch: sched.step(opt); sam.sam_step(...): batch k trains at value(k). One
    parameter, loss ½p², SGD without momentum: p ← p − lr·g(p + ρ·sign p)."""
    params = {"w": np.array(3.0)}

    def grad_fn(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        return 0.5 * float(p["w"]) ** 2, {"w": p["w"].copy()}

    sam = SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.0, momentum=0.0)), 0.1)
    sched = WarmupCosineLrScheduler(0.2, 0.01, 3, 10)
    w = 3.0
    for k in range(1, 13):
        sched.step(sam)
        sam.sam_step(params, grad_fn)
        lr = ref_warmup_cosine(0.2, 0.01, 3, 10, k)
        w = w - lr * (w + 0.1 * math.copysign(1.0, w))
        assert abs(float(params["w"]) - w) <= 1e-12 * abs(w) + 1e-15, k


def test_rho_schedule_on_sam() -> None:
    sam = SamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.3)), rho=0.5)
    sched = CosineAnnealingLrScheduler(0.2, 0.02, 10, param="rho")
    assert sched.param == "rho"
    for n in range(1, 15):
        sched.step(sam)
        assert sam.rho == sched.get_lr()
        assert close(sam.rho, ref_cosine(0.2, 0.02, 10, n), 0.2)
        assert sam.get_lr() == 0.3  # the lr is untouched
    assert float(sam.state_dict()["rho"]) == sched.get_lr()


def test_rho_schedule_reaching_zero_is_refused_by_sam_and_changes_nothing() -> None:
    sam = SamOptimizer(SgdOptimizer(), rho=0.5)
    sched = CosineAnnealingLrScheduler(0.2, 0.0, 3, param="rho")
    run_rho = [(sched.step(sam), sam.rho)[1] for _ in range(2)]
    assert run_rho[-1] == sched.get_lr()
    before, rho = snapshot(sched), sam.rho
    with pytest.raises(OptimizerError) as info:
        sched.step(sam)  # value(3) = 0: SAM's rho must be > 0
    assert info.value.key == "rho"
    assert snapshot(sched) == before and sam.rho == rho


def test_rho_schedule_on_gsam() -> None:
    """GSAM's rho setter sets rho_max. Without rho_min, rho is rho_max; with rho_min,
    GSAM's rho still follows its lr between rho_min and the scheduled rho_max, and a
    scheduled value below rho_min is refused."""
    gsam = GsamOptimizer(SgdOptimizer(OptimizerConfig(learning_rate=0.1)), rho_max=0.3)
    sched = StepLrScheduler(0.2, 2, 0.5, param="rho")
    for _ in range(5):
        sched.step(gsam)
        assert gsam.rho == gsam.rho_max == sched.get_lr()

    base = SgdOptimizer(OptimizerConfig(learning_rate=0.1))
    gsam = GsamOptimizer(base, rho_max=0.3, rho_min=0.02, lr_min=0.0)
    sched = StepLrScheduler(0.2, 2, 0.5, param="rho")
    base.set_lr(0.05)  # half way between lr_min 0 and lr_max 0.1
    for _ in range(5):
        sched.step(gsam)
        rho_max = sched.get_lr()
        assert gsam.rho_max == rho_max
        assert close(gsam.rho, 0.02 + (rho_max - 0.02) * 0.5, 1.0)
    assert sched.get_lr() == 0.05
    sched.step(gsam)  # value(6) = 0.025, still >= rho_min
    sched.step(gsam)
    before = snapshot(sched)
    with pytest.raises(OptimizerError) as info:
        sched.step(gsam)  # value(8) = 0.0125 < rho_min 0.02
    assert info.value.key == "rho"
    assert gsam.rho_max == sched.get_lr() == 0.025
    assert snapshot(sched) == before


def test_param_rho_needs_a_settable_rho() -> None:
    class ReadOnlyRho:
        rho = property(lambda self: 0.1)

        def set_lr(self, lr: float) -> None: ...

    for opt in (sgd(), ReadOnlyRho(), object()):
        sched = ExponentialLrScheduler(0.1, 0.5, param="rho")
        with pytest.raises(TrainError, match="rho") as info:
            sched.step(opt)  # type: ignore[arg-type]
        assert info.value.key == "rho"
        assert sched.state_dict()["current_epoch"] == 0
    with pytest.raises(TrainError, match="class"):
        ExponentialLrScheduler(0.1, 0.5, param="rho").step(SamOptimizer)  # type: ignore[arg-type]
    assert isinstance(SamOptimizer.__dict__["rho"], property)  # the class was not touched
    with pytest.raises(TrainError, match="set_lr"):
        ExponentialLrScheduler(0.1, 0.5).step(object())  # type: ignore[arg-type]


def test_an_optimizer_refusing_the_value_changes_nothing() -> None:
    class Refusing:
        def set_lr(self, lr: float) -> None:
            raise OptimizerError("no", "lr")

    sched = WarmupCosineLrScheduler(0.1, 0.0, 2, 5)
    sched.step(sgd())
    before = snapshot(sched)
    with pytest.raises(OptimizerError):
        sched.step(Refusing())  # type: ignore[arg-type]
    assert snapshot(sched) == before


def test_overflowing_value_is_refused_and_changes_nothing() -> None:
    sched = ExponentialLrScheduler(1.0, 1e100)
    opt = sgd()
    run(sched, opt, 3)
    before = snapshot(sched)
    with pytest.raises(OptimizerError, match="not finite") as info:
        sched.step(opt)
    assert info.value.key == "lr"
    assert snapshot(sched) == before and opt.get_lr() == sched.get_lr() > 1e299
    zero = ExponentialLrScheduler(0.0, 1e100)
    assert run(zero, opt, 5) == [0.0] * 5


# --- checkpoints -----------------------------------------------------------------------


def split_points(steps: int) -> list[int]:
    return sorted({0, 1, 2, steps // 3, steps // 2, steps - 1, steps, steps + 3})


@pytest.mark.parametrize("param", ["lr", "rho"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_savez_resume_is_bit_exact(name: str, param: str, tmp_path: Path) -> None:
    case = CASES[name]
    total = case.steps + 6

    def target() -> Any:
        return sam_target() if param == "rho" else sgd()

    whole = record(case.build(param=param), target(), total, param)
    for k in split_points(case.steps):
        first = case.build(param=param)
        opt = target()
        head = record(first, opt, k, param)
        path = tmp_path / f"{name}_{k}.npz"
        np.savez(path, **first.state_dict())
        fresh = case.build(param=param)
        with np.load(path, allow_pickle=False) as loaded:
            fresh.load_state_dict(loaded)
        assert snapshot(fresh) == snapshot(first)
        assert fresh.get_lr().hex() == first.get_lr().hex()
        tail = record(fresh, opt, total - k, param)
        assert [v.hex() for v in head + tail] == [v.hex() for v in whole], k


def sam_target() -> SamOptimizer:
    return SamOptimizer(sgd(), rho=0.5)


def record(sched: Any, opt: Any, steps: int, param: str) -> list[float]:
    out = []
    for _ in range(steps):
        sched.step(opt)
        out.append(opt.rho if param == "rho" else opt.get_lr())
        assert out[-1] == sched.get_lr()
    return out


def test_plateau_savez_resume_is_bit_exact(tmp_path: Path) -> None:
    whole = plateau_run(build_plateau(), PLATEAU_METRICS)
    for k in range(len(PLATEAU_METRICS) + 1):
        first = build_plateau()
        head = plateau_run(first, PLATEAU_METRICS[:k])
        np.savez(tmp_path / "p.npz", **first.state_dict())
        fresh = build_plateau()
        with np.load(tmp_path / "p.npz", allow_pickle=False) as loaded:
            fresh.load_state_dict(loaded)
        assert snapshot(fresh) == snapshot(first)
        tail = plateau_run(fresh, PLATEAU_METRICS[k:])
        assert [v.hex() for v in head + tail] == [v.hex() for v in whole], k
    assert sorted(build_plateau().state_dict()) == sorted([
        "param", "initial_lr", "mode", "factor", "patience", "threshold", "min_lr",
        "cooldown", "current_lr", "best_metric", "num_bad_epochs", "cooldown_counter"])


def test_state_dict_holds_every_hyperparameter_and_counter() -> None:
    keys = {
        "step": {"initial_lr", "step_size", "gamma", "current_epoch"},
        "multistep": {"initial_lr", "milestones", "gamma", "current_epoch"},
        "cyclic_exp_range": {"base_lr", "max_lr", "step_size", "mode", "gamma", "current_step"},
        "sgdr": {"max_lr", "min_lr", "t_0", "t_mult", "current_step", "current_period",
                 "total_steps"},
        "noam": {"model_dim", "warmup_steps", "scale_factor", "current_step"},
    }
    for name, expected in keys.items():
        state = CASES[name].build().state_dict()
        assert set(state) == expected | {"param"}
        for value in state.values():
            assert isinstance(value, np.ndarray) and value.dtype != object
    ms = CASES["multistep"].build().state_dict()["milestones"]
    assert ms.dtype == np.int64 and ms.tolist() == [3, 10, 11, 25]
    assert str(CASES["cyclic_exp_range"].build().state_dict()["mode"]) == "exp_range"


def test_load_restores_hyperparameters_from_the_state() -> None:
    saved = CyclicLrScheduler(0.0, 1.0, 3, CyclicLrMode.EXP_RANGE, 0.7)
    run(saved, sgd(), 5)
    other = CyclicLrScheduler(0.5, 0.6, 9, CyclicLrMode.TRIANGULAR)
    other.load_state_dict(saved.state_dict())
    assert (other.base_lr, other.max_lr, other.step_size, other.mode, other.gamma) == (
        0.0, 1.0, 3, CyclicLrMode.EXP_RANGE, 0.7)
    assert run(other, sgd(), 7) == run(saved, sgd(), 7)


def test_state_dict_returns_copies_and_pickle_copy_resume() -> None:
    for case in cases():
        sched = case.build()
        run(sched, sgd(), 5)
        before = snapshot(sched)
        for value in sched.state_dict().values():
            if value.dtype.kind in "fi" and value.size:
                value[...] = 7
        assert snapshot(sched) == before
        for twin in (pickle.loads(pickle.dumps(sched)), copy.deepcopy(sched)):
            assert run(twin, sgd(), 9) == run(copy.deepcopy(sched), sgd(), 9)


def test_hyperparameters_are_read_only() -> None:
    sched = StepLrScheduler(0.1, 3, 0.5)
    with pytest.raises(AttributeError):
        sched.gamma = 0.9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        sched._c = {}  # type: ignore[misc]
    assert sched.gamma == 0.5 and repr(sched).startswith("StepLrScheduler(initial_lr=0.1")


def test_one_scheduler_stepped_from_two_threads() -> None:
    sched = ExponentialLrScheduler(1.0, 0.999)
    opts = [sgd(), sgd()]

    def work(opt: SgdOptimizer) -> None:
        for _ in range(2000):
            sched.step(opt)

    threads = [threading.Thread(target=work, args=(o,)) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(sched.state_dict()["current_epoch"]) == 4000
    assert sched.get_lr() == ref_exponential(1.0, 0.999, 4000)


# --- bad arguments ----------------------------------------------------------------------

BAD_RATES = [-0.1, math.nan, math.inf, "0.1", None, True]
BAD_COUNTS_1 = [0, -1, 1.5, 2.0, True, "3", None, 2**63]
BAD_COUNTS_0 = [-1, 1.5, True, "3", None]

VALID: dict[str, tuple[type, dict[str, Any]]] = {
    "step": (StepLrScheduler, {"initial_lr": 0.1, "step_size": 3, "gamma": 0.5}),
    "exponential": (ExponentialLrScheduler, {"initial_lr": 0.1, "gamma": 0.9}),
    "cosine": (CosineAnnealingLrScheduler, {"initial_lr": 0.1, "min_lr": 0.0, "t_max": 5}),
    "warmup": (WarmupScheduler, {"target_lr": 0.1, "warmup_steps": 5}),
    "warmup_cosine": (WarmupCosineLrScheduler,
                      {"target_lr": 0.1, "min_lr": 0.0, "warmup_steps": 2, "total_steps": 9}),
    "one_cycle": (OneCycleLrScheduler, {"initial_lr": 0.01, "max_lr": 0.1, "min_lr": 0.001,
                                        "total_steps": 10, "pct_start": 0.3}),
    "multistep": (MultiStepLrScheduler, {"initial_lr": 0.1, "milestones": [2, 5], "gamma": 0.1}),
    "polynomial": (PolynomialDecayLrScheduler,
                   {"initial_lr": 0.1, "final_lr": 0.0, "power": 2.0, "decay_steps": 9}),
    "cyclic": (CyclicLrScheduler, {"base_lr": 0.01, "max_lr": 0.1, "step_size": 4,
                                   "mode": CyclicLrMode.EXP_RANGE, "gamma": 0.99}),
    "noam": (NoamScheduler, {"model_dim": 512, "warmup_steps": 40, "scale_factor": 1.0}),
    "sgdr": (SgdrScheduler, {"max_lr": 0.1, "min_lr": 0.0, "t_0": 5, "t_mult": 2.0}),
    "plateau": (ReduceLROnPlateauScheduler, {
        "initial_lr": 0.1, "mode": PlateauMode.MIN, "factor": 0.5, "patience": 2,
        "threshold": 1e-4, "min_lr": 0.0, "cooldown": 1}),
}

EXTRA_BAD: dict[str, list[tuple[str, Any]]] = {
    "step": [("gamma", -1.0)],
    "warmup_cosine": [("total_steps", 2), ("total_steps", 1)],  # <= warmup_steps
    "one_cycle": [("pct_start", 0.0), ("pct_start", 1.0), ("pct_start", 1.5)],
    "multistep": [("milestones", [5, 2]), ("milestones", [2, 2]), ("milestones", [0, 3]),
                  ("milestones", [1.5]), ("milestones", [True]), ("milestones", "25"),
                  ("milestones", 5), ("milestones", [2, None])],
    "polynomial": [("power", 0.0), ("power", -1.0)],
    "cyclic": [("gamma", 0.0), ("gamma", 1.5), ("mode", "triangular"), ("mode", None),
               ("mode", PlateauMode.MIN)],
    "noam": [("scale_factor", 0.0)],
    "sgdr": [("t_mult", 0.5), ("t_mult", math.nan)],
    "plateau": [("factor", 1.0), ("factor", 2.0), ("mode", "min"),
                ("mode", CyclicLrMode.TRIANGULAR)],
}

COUNT_ZERO_OK = {"warmup_steps", "patience", "cooldown"}  # may be 0 (not for WarmupScheduler)


def bad_arguments() -> list[tuple[str, str, Any]]:
    out = []
    for name, (_, valid) in VALID.items():
        for arg, good in valid.items():
            if isinstance(good, bool) or isinstance(good, (list, CyclicLrMode, PlateauMode)):
                continue
            if isinstance(good, int):
                zero_ok = arg in COUNT_ZERO_OK and not (name == "warmup")
                bads = BAD_COUNTS_0 if zero_ok else BAD_COUNTS_1
            else:
                bads = BAD_RATES
            out += [(name, arg, bad) for bad in bads]
        out += [(name, arg, bad) for arg, bad in EXTRA_BAD.get(name, [])]
        out.append((name, "param", "momentum"))
    return out


@pytest.mark.parametrize(("name", "arg", "bad"), bad_arguments())
def test_bad_argument_is_refused_naming_it(name: str, arg: str, bad: Any) -> None:
    cls, valid = VALID[name]
    cls(**valid)  # the valid arguments build
    with pytest.raises(OptimizerError) as info:
        cls(**{**valid, arg: bad})
    assert isinstance(info.value, TrainError)
    assert info.value.key == arg, str(info.value)


def test_edge_arguments_that_are_valid() -> None:
    opt = sgd()
    assert run(NoamScheduler(16, 0, 1.0), opt, 2) == [16**-0.5, 16**-0.5 * 2**-0.5]
    assert run(WarmupCosineLrScheduler(0.1, 0.0, 0, 1), opt, 2) == [0.0, 0.0]
    assert run(MultiStepLrScheduler(0.1, [], 0.5), opt, 3) == [0.1] * 3
    assert run(MultiStepLrScheduler(0.1, np.array([1, 2]), 0.5), opt, 2) == [0.05, 0.025]
    assert run(StepLrScheduler(0.1, 1, 0.0), opt, 2) == [0.0, 0.0]
    assert run(SgdrScheduler(0.1, 0.0, 1, 1.0), opt, 3) == [0.1] * 3
    assert StepLrScheduler(np.float32(0.5), np.int64(2), 1).initial_lr == 0.5


# --- corrupt states ---------------------------------------------------------------------


def stepped(name: str, steps: int = 7) -> Any:
    cls, valid = VALID[name]
    sched = cls(**valid)
    opt = sgd()
    for i in range(steps):
        if name == "plateau":
            sched.step_with_metric(opt, [1.0, 1.0, 0.5, 0.6, 0.6, 0.7, 0.2][i % 7])
        else:
            sched.step(opt)
    return sched


def corruptions(name: str) -> list[tuple[str, str, Any]]:
    """(what, key the error names, how to change the state)."""
    state = stepped(name).state_dict()
    out: list[tuple[str, str, Any]] = [("unknown key", "bogus", ("set", "bogus", np.array(1.0)))]
    for key, value in state.items():
        out.append(("missing", key, ("del", key, None)))
        out.append(("wrong shape", key, ("set", key, np.zeros((2, 2)))))
        out.append(("str", key, ("set", key, np.array("x"))))
        out.append(("object", key, ("set", key, np.array([None], dtype=object))))
        if value.dtype.kind == "i" and value.ndim == 0:
            out.append(("float for int", key, ("set", key, np.array(float(value)))))
            out.append(("negative", key, ("set", key, np.array(-1))))
        if value.dtype.kind == "f" and key != "best_metric":
            out.append(("nan", key, ("set", key, np.array(math.nan))))
            out.append(("negative", key, ("set", key, np.array(-0.5))))
            out.append(("inf", key, ("set", key, np.array(math.inf))))
    out.append(("param", "param", ("set", "param", np.array("rho"))))
    return out


SEMANTIC: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "step": [("step_size 0", "step_size", {"step_size": np.array(0)})],
    "cosine": [("t_max 0", "t_max", {"t_max": np.array(0)})],
    "warmup_cosine": [("total <= warmup", "total_steps", {"total_steps": np.array(2)})],
    "one_cycle": [("pct 1", "pct_start", {"pct_start": np.array(1.0)})],
    "multistep": [("decreasing", "milestones", {"milestones": np.array([5, 2])}),
                  ("float", "milestones", {"milestones": np.array([2.0, 5.0])}),
                  ("2-d", "milestones", {"milestones": np.array([[2, 5]])})],
    "cyclic": [("mode", "mode", {"mode": np.array("sine")}),
               ("gamma > 1", "gamma", {"gamma": np.array(1.5)})],
    "sgdr": [("t_cur >= period", "current_step", {"current_step": np.array(20)}),
             ("period < t_0", "current_period", {"current_period": np.array(3)}),
             ("t_cur >= steps", "current_step", {"total_steps": np.array(1),
                                                 "current_step": np.array(2)}),
             ("t_mult < 1", "t_mult", {"t_mult": np.array(0.9)})],
    "exponential": [("overflowing", "current_epoch", {"gamma": np.array(1e10),
                                                      "current_epoch": np.array(40)})],
    "plateau": [("mode", "mode", {"mode": np.array("up")}),
                ("bad > patience", "num_bad_epochs", {"num_bad_epochs": np.array(5)}),
                ("cooldown > max", "cooldown_counter", {"cooldown_counter": np.array(9)}),
                ("lr > initial", "current_lr", {"current_lr": np.array(0.5)}),
                ("inf best", "best_metric", {"best_metric": np.array(math.inf)}),
                ("factor 1", "factor", {"factor": np.array(1.0)})],
}


def apply(state: dict[str, Any], how: Any) -> dict[str, Any]:
    op, key, value = how
    state = dict(state)
    if op == "del":
        del state[key]
    else:
        state[key] = value
    return state


def all_corruptions() -> list[tuple[str, str, str, Any]]:
    out = []
    for name in VALID:
        out += [(name, what, key, how) for what, key, how in corruptions(name)]
        for what, key, changes in SEMANTIC.get(name, []):
            out.append((name, what, key, ("many", None, changes)))
    return out


@pytest.mark.parametrize(("name", "what", "key", "how"), all_corruptions())
def test_corrupt_state_is_refused_and_changes_nothing(
    name: str, what: str, key: str, how: Any
) -> None:
    source = stepped(name).state_dict()
    state = {**source, **how[2]} if how[0] == "many" else apply(source, how)
    target = stepped(name, 3)
    before, lr = snapshot(target), target.get_lr()
    with pytest.raises(OptimizerError) as info:
        target.load_state_dict(state)
    assert info.value.key == key, (what, str(info.value))
    assert snapshot(target) == before and target.get_lr() == lr
    target.load_state_dict(source)  # the intact state loads
    assert snapshot(target) == snapshot(stepped(name))


def test_non_mapping_and_non_str_keys_are_refused() -> None:
    sched = stepped("step")
    before = snapshot(sched)
    for bad in ([("gamma", 1.0)], None, {1: np.array(1.0), **sched.state_dict()}):
        with pytest.raises(OptimizerError):
            sched.load_state_dict(bad)  # type: ignore[arg-type]
    assert snapshot(sched) == before
