"""SAM vs. its base optimizer on label-noisy digits: ``python -m samopt.demo``.

A small NumPy MLP (64-128-10, ReLU, softmax cross-entropy, hand-written backprop, float64)
is trained on scikit-learn's bundled 8x8 ``digits`` data set (no download) in which a
fraction of the *training* labels (40% by default) has been replaced by labels drawn
uniformly at random from the ten classes; the test labels stay clean. Four optimizers are
trained from the same initial weights on the same mini-batches, for several seeds: SGD,
SAM(SGD), Adam and SAM(Adam). The demo prints a table of clean-test accuracy (final epoch
and best epoch, mean +- sample std over seeds) and writes a PNG of test accuracy per epoch.

The data, model and training functions are meant to be imported by other examples::

    from samopt.demo import load_noisy_digits, init_mlp, loss_and_grads, accuracy

Importing this module needs only NumPy and samopt; scikit-learn is imported when the data
is loaded, matplotlib when a plot is drawn, tqdm when a progress bar is shown and
threadpoolctl (if installed) to keep BLAS single-threaded during training
(``pip install samopt[demo]`` installs all four).

Defaults (tuned on seeds 10-16, disjoint from the reported seeds 0-2): constant learning
rates 0.01 for SGD (momentum 0.9) and 0.001 for Adam, batch 32, 100 epochs, and SAM radius
rho = 1.0 for both. rho is an absolute radius in parameter space, and what matters is its
size relative to the weights: this MLP's weight vector has norm ~17 at initialization, so
the rho = 0.05 of the SAM paper is a 0.3% nudge here and changes nothing measurable (0.1-0.2
barely more); rho = 0.5-1.4 is where SAM visibly stops the network from memorizing the
noisy labels, and rho = 2 breaks training (both SGD and Adam end near chance).

Randomness: everything that depends on a seed (train/test split, label noise, initial
weights, mini-batch order) is drawn from independent streams of
``numpy.random.SeedSequence([seed, stream])``, so a seed fixes the whole run and every
optimizer sees the same data, initial weights and batch order for a given seed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import samopt
from samopt import (
    AdamOptimizer,
    Optimizer,
    OptimizerConfig,
    SamOptimizer,
    SgdOptimizer,
    WarmupCosineLrScheduler,
)

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_RHO",
    "DEFAULT_WARMUP_EPOCHS",
    "DEFAULT_WEIGHT_DECAY",
    "FAMILIES",
    "NoisyDigits",
    "OptimizerSpec",
    "RunResult",
    "accuracy",
    "default_specs",
    "format_table",
    "init_mlp",
    "iterate_minibatches",
    "load_digits_split",
    "load_noisy_digits",
    "loss_and_grads",
    "main",
    "make_optimizer",
    "make_schedule",
    "plot_curves",
    "predict",
    "run_experiment",
    "single_threaded_blas",
    "summarize",
    "train_one",
    "train_step",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Params = dict[str, FloatArray]

NUM_CLASSES = 10
DEFAULT_SIZES: tuple[int, ...] = (64, 128, 10)
DEFAULT_TEST_FRACTION = 0.3

#: Optimizer families; each is trained plain and wrapped in SAM.
FAMILIES: tuple[str, ...] = ("sgd", "adam")
#: Default learning rate per family (SGD has momentum 0.9).
DEFAULT_LR: dict[str, float] = {"sgd": 0.01, "adam": 0.001}
#: Default SAM radius per family.
DEFAULT_RHO: dict[str, float] = {"sgd": 1.0, "adam": 1.0}
#: The standard recipe: L2 weight decay on the weights (not the biases), and a linear
#: warmup over the first epochs to the learning rate, then cosine annealing to 0.
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_WARMUP_EPOCHS = 5
#: The biases' names (``b1``, ``b2``, ...): their parameter group has no weight decay.
BIASES = re.compile(r"b\d+")
DEFAULT_EPOCHS = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_NOISE = 0.4
DEFAULT_SEEDS = 3
DEFAULT_OUT = "samopt-demo.png"

#: The SAM family's variants the demo can run (``--optimizers``), each over either base,
#: with its papers' defaults and the demo's rho; "base" is the base optimizer alone.
VARIANTS: dict[str, tuple[str, Callable[[Any, float], Any]]] = {
    "sam": ("SAM", lambda base, rho: SamOptimizer(base, rho=rho)),
    "asam": ("ASAM", lambda base, rho: SamOptimizer(base, rho=rho, adaptive=True, eta=0.01)),
    "gsam": ("GSAM", lambda base, rho: samopt.GsamOptimizer(base, rho)),
    "gcsam": ("GCSAM", lambda base, rho: SamOptimizer(base, rho, gradient_centralization=True)),
    "looksam": ("LookSAM", lambda base, rho: samopt.LookSamOptimizer(base, rho)),
    "esam": ("ESAM", lambda base, rho: samopt.EsamOptimizer(base, rho)),
    "randomized": ("RandSAM", lambda base, rho: samopt.RandomizedSam(SamOptimizer(base, rho))),
    "wsam": ("WSAM", lambda base, rho: samopt.WsamOptimizer(base, rho)),
    "fisher": ("FisherSAM", lambda base, rho: samopt.FisherSamOptimizer(base, rho)),
    "friendly": ("FSAM", lambda base, rho: samopt.FriendlySamOptimizer(base, rho)),
}
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("base", "sam")

# Independent random streams derived from one seed.
_STREAM_SPLIT, _STREAM_NOISE, _STREAM_INIT, _STREAM_BATCHES = range(4)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisyDigits:
    """A standardized train/test split of ``digits`` with noisy training labels."""

    X_train: FloatArray
    y_train: IntArray
    """Training labels after the noise (what the model is trained on)."""
    y_train_clean: IntArray
    """The true training labels (for diagnostics only)."""
    X_test: FloatArray
    y_test: IntArray
    """Clean test labels."""

    @property
    def corrupted_fraction(self) -> float:
        """Fraction of training labels that differ from the true label."""
        return float(np.mean(self.y_train != self.y_train_clean))


def _load_digits_arrays() -> tuple[FloatArray, IntArray]:
    # scikit-learn ships no type information; import it dynamically so that this module
    # type-checks (mypy --strict) and imports without it.
    datasets = importlib.import_module("sklearn.datasets")
    bunch = datasets.load_digits()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    return X, y


def load_digits_split(
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> NoisyDigits:
    """Load ``digits``, split it, standardize it and corrupt the training labels.

    * The split is stratified: ``test_fraction`` of each class goes to the test set
      (fixed by ``seed``).
    * Features are standardized with the training set's mean and standard deviation
      (features that are constant on the training set are only centred).
    * ``round(noise * n_train)`` training examples, chosen at random, get a label drawn
      uniformly from the 10 classes (so about ``0.9 * noise`` of the labels end up wrong).
      Test labels are never touched.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    X, y = _load_digits_arrays()

    split_rng = _rng(seed, _STREAM_SPLIT)
    test_parts: list[IntArray] = []
    train_parts: list[IntArray] = []
    for c in range(NUM_CLASSES):
        idx = split_rng.permutation(np.flatnonzero(y == c)).astype(np.int64)
        n_test = round(test_fraction * idx.size)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train_idx = split_rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)

    X_train, X_test = X[train_idx], X[test_idx]
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0.0] = 1.0
    X_train = (X_train - mean) / std
    X_test = (X_test - mean) / std

    y_train_clean = y[train_idx]
    y_train = y_train_clean.copy()
    noise_rng = _rng(seed, _STREAM_NOISE)
    n_noisy = round(noise * y_train.size)
    noisy_idx = noise_rng.choice(y_train.size, size=n_noisy, replace=False)
    y_train[noisy_idx] = noise_rng.integers(0, NUM_CLASSES, size=n_noisy)

    return NoisyDigits(
        X_train=np.ascontiguousarray(X_train),
        y_train=y_train,
        y_train_clean=y_train_clean,
        X_test=np.ascontiguousarray(X_test),
        y_test=y[test_idx],
    )


def load_noisy_digits(
    noise: float = DEFAULT_NOISE, seed: int = 0
) -> tuple[FloatArray, IntArray, FloatArray, IntArray]:
    """Return ``(X_train, y_train_noisy, X_test, y_test)``; see :func:`load_digits_split`."""
    d = load_digits_split(noise, seed)
    return d.X_train, d.y_train, d.X_test, d.y_test


# --------------------------------------------------------------------------------------
# Model: MLP with ReLU hidden layers and a softmax cross-entropy head
# --------------------------------------------------------------------------------------


def init_mlp(sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 0) -> Params:
    """He-initialized float64 MLP parameters ``{"W1", "b1", "W2", "b2", ...}``.

    ``W{i}`` has shape ``(sizes[i-1], sizes[i])`` and ``b{i}`` shape ``(sizes[i],)``;
    biases start at zero.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer widths, got {sizes}")
    rng = _rng(seed, _STREAM_INIT)
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        scale = math.sqrt(2.0 / fan_in)
        params[f"W{i}"] = rng.standard_normal((int(fan_in), int(fan_out))) * scale
        params[f"b{i}"] = np.zeros(int(fan_out), dtype=np.float64)
    return params


def _num_layers(params: Mapping[str, FloatArray]) -> int:
    n = 0
    while f"W{n + 1}" in params:
        n += 1
    if n == 0:
        raise ValueError("params has no 'W1'")
    return n


def _logits(params: Mapping[str, FloatArray], X: FloatArray) -> FloatArray:
    n = _num_layers(params)
    a = X
    for i in range(1, n + 1):
        z = a @ params[f"W{i}"] + params[f"b{i}"]
        a = np.maximum(z, 0.0) if i < n else z
    return a


def loss_and_grads(
    params: Mapping[str, FloatArray], X: FloatArray, y: IntArray
) -> tuple[float, Params]:
    """Mean softmax cross-entropy of the MLP on ``(X, y)`` and its gradients.

    Returns ``(loss, grads)`` with one gradient per parameter name, same shape and dtype.
    """
    n_layers = _num_layers(params)
    batch = X.shape[0]
    if batch == 0:
        raise ValueError("empty batch")
    # Forward, keeping each layer's input and pre-activation.
    inputs: list[FloatArray] = []
    pre: list[FloatArray] = []
    a = X
    for i in range(1, n_layers + 1):
        inputs.append(a)
        z = a @ params[f"W{i}"] + params[f"b{i}"]
        pre.append(z)
        a = np.maximum(z, 0.0) if i < n_layers else z
    logits = a
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - np.log(sum_exp)
    rows = np.arange(batch)
    loss = float(-log_probs[rows, y].mean())

    # Backward.
    delta = exp / sum_exp
    delta[rows, y] -= 1.0
    delta /= batch
    grads: Params = {}
    for i in range(n_layers, 0, -1):
        grads[f"W{i}"] = inputs[i - 1].T @ delta
        grads[f"b{i}"] = delta.sum(axis=0)
        if i > 1:
            delta = (delta @ params[f"W{i}"].T) * (pre[i - 2] > 0.0)
    return loss, grads


def predict(params: Mapping[str, FloatArray], X: FloatArray) -> IntArray:
    """Predicted class per row of ``X``."""
    labels: IntArray = np.argmax(_logits(params, X), axis=1).astype(np.int64)
    return labels


def accuracy(params: Mapping[str, FloatArray], X: FloatArray, y: IntArray) -> float:
    """Fraction of rows of ``X`` whose predicted class equals ``y``."""
    return float(np.mean(predict(params, X) == y))


# --------------------------------------------------------------------------------------
# Optimizers and training
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the comparison: a family, optionally wrapped in SAM, trained with
    the standard recipe."""

    family: str
    """``"sgd"`` (momentum 0.9) or ``"adam"``."""
    lr: float
    """The peak learning rate (reached at the end of the warmup)."""
    rho: float | None = None
    """SAM radius, or ``None`` for the plain base optimizer."""
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    """L2 weight decay of the weights; the biases have none."""
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS
    variant: str = "sam"
    """Which of ``VARIANTS`` wraps the base when there is a rho."""

    @property
    def name(self) -> str:
        base = {"sgd": "SGD", "adam": "Adam"}[self.family]
        return base if self.rho is None else f"{VARIANTS[self.variant][0]}({base})"


def default_specs(
    lr: Mapping[str, float] | None = None,
    rho: Mapping[str, float] | None = None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
) -> list[OptimizerSpec]:
    """For each family, each of ``optimizers`` ("base" or a key of ``VARIANTS``; by
    default SGD, SAM(SGD), Adam, SAM(Adam)) with the given (or default) lr and rho."""
    lrs = {**DEFAULT_LR, **(lr or {})}
    rhos = {**DEFAULT_RHO, **(rho or {})}
    specs: list[OptimizerSpec] = []
    for family in FAMILIES:
        for name in optimizers:
            sam_rho = None if name == "base" else rhos[family]
            variant = "sam" if name == "base" else name
            specs.append(
                OptimizerSpec(family, lrs[family], sam_rho, weight_decay, warmup_epochs, variant)
            )
    return specs


def make_optimizer(spec: OptimizerSpec) -> Optimizer:
    """Build the samopt optimizer described by ``spec`` (a SamOptimizer when it has a rho):
    the biases in a parameter group without weight decay."""
    no_decay = [{"params": BIASES, "weight_decay": 0.0}]
    config = OptimizerConfig(learning_rate=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    if spec.family == "sgd":
        base: SgdOptimizer | AdamOptimizer = SgdOptimizer(config, param_groups=no_decay)
    elif spec.family == "adam":
        base = AdamOptimizer(config, param_groups=no_decay)
    else:
        raise ValueError(f"unknown optimizer family {spec.family!r}")
    if spec.rho is None:
        return base
    optimizer: Optimizer = VARIANTS[spec.variant][1](base, spec.rho)
    return optimizer


def make_schedule(spec: OptimizerSpec, total_steps: int, steps_per_epoch: int) -> Any:
    """Linear warmup over ``spec.warmup_epochs`` epochs to ``spec.lr``, then cosine
    annealing to 0 at ``total_steps`` (a step is a mini-batch)."""
    warmup = min(spec.warmup_epochs * steps_per_epoch, total_steps - 1)
    return WarmupCosineLrScheduler(spec.lr, 0.0, warmup, total_steps)


def train_step(opt: Optimizer, params: Params, X: FloatArray, y: IntArray) -> float:
    """One optimizer step on the batch ``(X, y)``; returns the loss before the step.

    With SAM this is the two-phase step: gradient at ``w``, ``first_step`` to the
    perturbed point ``w + rho * g / ||g||``, gradient there, ``second_step`` (which puts
    ``w`` back and applies the base optimizer with the perturbed-point gradient).
    Any other optimizer makes one ``step`` with the gradient at ``w``.
    """
    if type(opt) is not SamOptimizer and hasattr(opt, "sam_step"):
        # The SAM family's variants: their own sequence of gradients (LookSAM's and
        # randomized SAM's steps take one or two).
        loss: float = opt.sam_step(params, lambda p: loss_and_grads(p, X, y))
        return loss
    loss, grads = loss_and_grads(params, X, y)
    if isinstance(opt, SamOptimizer):
        opt.first_step(params, grads)
        _, grads = loss_and_grads(params, X, y)
        opt.second_step(params, grads)
    else:
        opt.step(params, grads)
    return loss


def iterate_minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[IntArray]:
    """Indices of one epoch's shuffled mini-batches (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(n).astype(np.int64)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@dataclass
class RunResult:
    """Per-epoch curves of one (optimizer, seed) run."""

    optimizer: str
    seed: int
    test_acc: list[float]
    """Accuracy on the clean test labels after each epoch."""
    train_acc_noisy: list[float]
    """Accuracy on the (noisy) training labels the model is fitted to, after each epoch."""
    train_acc_clean: list[float]
    """Accuracy on the true training labels, after each epoch."""
    train_loss: list[float]
    """Mean mini-batch loss (at the unperturbed weights) during each epoch."""

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "test_acc": self.test_acc,
            "train_acc_noisy": self.train_acc_noisy,
            "train_acc_clean": self.train_acc_clean,
            "train_loss": self.train_loss,
        }


def train_one(
    spec: OptimizerSpec,
    data: NoisyDigits,
    *,
    seed: int,
    epochs: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sizes: Sequence[int] = DEFAULT_SIZES,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train one MLP with ``spec`` for ``epochs`` epochs; ``on_epoch(epoch, test_acc)``."""
    params = init_mlp(sizes, seed)
    opt = make_optimizer(spec)
    steps_per_epoch = -(-data.X_train.shape[0] // batch_size)
    schedule = make_schedule(spec, max(2, epochs * steps_per_epoch), steps_per_epoch)
    batch_rng = _rng(seed, _STREAM_BATCHES)
    result = RunResult(spec.name, seed, [], [], [], [])
    for epoch in range(epochs):
        losses: list[float] = []
        for idx in iterate_minibatches(data.X_train.shape[0], batch_size, batch_rng):
            schedule.step(opt)
            losses.append(train_step(opt, params, data.X_train[idx], data.y_train[idx]))
        train_pred = predict(params, data.X_train)
        result.train_loss.append(float(np.mean(losses)))
        result.train_acc_noisy.append(float(np.mean(train_pred == data.y_train)))
        result.train_acc_clean.append(float(np.mean(train_pred == data.y_train_clean)))
        result.test_acc.append(accuracy(params, data.X_test, data.y_test))
        if on_epoch is not None:
            on_epoch(epoch, result.test_acc[-1])
    return result


class _Progress:
    """A tqdm bar (imported lazily: tqdm ships no type information) or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            tqdm = importlib.import_module("tqdm").tqdm
            self._bar = tqdm(total=total, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def update(self, test_acc: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(test_acc=f"{test_acc:.3f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread (through threadpoolctl, when it is installed).

    The MLP's matrix products are tiny, so a multithreaded BLAS only adds synchronization:
    on 2 cores with OpenBLAS the default run is about 4x slower without this limit.
    """
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def run_experiment(
    specs: Sequence[OptimizerSpec],
    seeds: Sequence[int],
    *,
    epochs: int,
    noise: float = DEFAULT_NOISE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> tuple[dict[str, list[RunResult]], dict[int, float]]:
    """Train every spec on every seed (with single-threaded BLAS).

    Returns ``(runs, corrupted)``: the runs per optimizer name (in seed order) and the
    fraction of wrong training labels per seed.
    """
    runs: dict[str, list[RunResult]] = {s.name: [] for s in specs}
    corrupted: dict[int, float] = {}
    bar = _Progress(len(specs) * len(seeds) * epochs, progress)
    try:
        with single_threaded_blas():
            for seed in seeds:
                data = load_digits_split(noise, seed)
                corrupted[seed] = data.corrupted_fraction
                for spec in specs:
                    bar.describe(f"seed {seed} {spec.name}")
                    runs[spec.name].append(
                        train_one(
                            spec,
                            data,
                            seed=seed,
                            epochs=epochs,
                            batch_size=batch_size,
                            on_epoch=lambda _epoch, acc: bar.update(acc),
                        )
                    )
    finally:
        bar.close()
    return runs, corrupted


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def summarize(runs: Sequence[RunResult]) -> dict[str, float]:
    """Mean and std over seeds of the final / best-epoch figures of one optimizer."""
    final_test = [r.test_acc[-1] for r in runs]
    best_test = [max(r.test_acc) for r in runs]
    best_epoch = [float(int(np.argmax(r.test_acc)) + 1) for r in runs]
    final_noisy = [r.train_acc_noisy[-1] for r in runs]
    out: dict[str, float] = {}
    for key, values in (
        ("final_test_acc", final_test),
        ("best_test_acc", best_test),
        ("best_epoch", best_epoch),
        ("final_train_acc_noisy", final_noisy),
    ):
        out[f"{key}_mean"], out[f"{key}_std"] = _mean_std(values)
    return out


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:5.1f} ± {100 * std:4.1f}"


def format_table(
    specs: Sequence[OptimizerSpec], summaries: Mapping[str, Mapping[str, float]]
) -> str:
    """The results table: one row per optimizer, accuracies in percent."""
    header = (
        f"{'optimizer':<10} {'lr':>6} {'rho':>5}  {'final test acc':>14}  "
        f"{'best test acc':>13} {'@ epoch':>7}  {'final fit of noisy train labels':>31}"
    )
    lines = [header, "-" * len(header)]
    for spec in specs:
        s = summaries[spec.name]
        rho = "-" if spec.rho is None else f"{spec.rho:g}"
        lines.append(
            f"{spec.name:<10} {spec.lr:>6g} {rho:>5}  "
            f"{_pm(s['final_test_acc_mean'], s['final_test_acc_std']):>14}  "
            f"{_pm(s['best_test_acc_mean'], s['best_test_acc_std']):>13} "
            f"{s['best_epoch_mean']:>7.0f}  "
            f"{_pm(s['final_train_acc_noisy_mean'], s['final_train_acc_noisy_std']):>31}"
        )
    return "\n".join(lines)


_COLORS = {"SGD": "#9ecae1", "SAM(SGD)": "#08519c", "Adam": "#fdae6b", "SAM(Adam)": "#a63603"}


def plot_curves(
    runs: Mapping[str, Sequence[RunResult]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Write a PNG of clean-test accuracy per epoch: mean line and ±1 std band per optimizer.

    Uses matplotlib's object-oriented API with the Agg canvas, so it never touches
    pyplot's global state or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, results in runs.items():
        curves = np.asarray([r.test_acc for r in results], dtype=np.float64) * 100.0
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        std = curves.std(axis=0, ddof=1) if curves.shape[0] > 1 else np.zeros_like(mean)
        color = _COLORS.get(name)
        style = "--" if name in ("SGD", "Adam") else "-"
        ax.plot(epochs, mean, style, color=color, label=f"{name} (n={curves.shape[0]})")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_seeds(tokens: Sequence[str]) -> list[int]:
    """``["3"]`` -> seeds 0, 1, 2; ``["0,5,9"]`` / ``["0", "5", "9"]`` / ``["7,"]`` -> a list."""
    parts = [p for t in tokens for p in t.split(",") if p.strip()]
    is_list = len(tokens) > 1 or any("," in t for t in tokens)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        message = f"--seeds expects integers, got {' '.join(tokens)!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values:
        raise argparse.ArgumentTypeError("--seeds needs a count or a list of seeds")
    if is_list:
        if any(v < 0 for v in values):
            raise argparse.ArgumentTypeError("seeds must be >= 0")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError("seeds must be distinct")
        return values
    if values[0] < 1:
        raise argparse.ArgumentTypeError("the seed count must be >= 1")
    return list(range(values[0]))


def _parse_per_family(flag: str, tokens: Sequence[str]) -> dict[str, float]:
    """``["0.1"]`` -> every family; ``["sgd=0.05", "adam=1e-3"]`` -> per family."""
    out: dict[str, float] = {}
    for token in tokens:
        family, sep, value = token.rpartition("=")
        families = [family.strip().lower()] if sep else list(FAMILIES)
        for f in families:
            if f not in FAMILIES:
                raise argparse.ArgumentTypeError(
                    f"{flag}: unknown family {f!r} (expected one of {', '.join(FAMILIES)})"
                )
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {value!r} is not a number") from None
        if not math.isfinite(number) or number <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: must be a positive number, got {value}")
        for f in families:
            out[f] = number
    return out


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _noise_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (see ``python -m samopt.demo --help``)."""
    lrs = ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LR.items())
    rhos = ", ".join(f"{k}={v:g}" for k, v in DEFAULT_RHO.items())
    parser = argparse.ArgumentParser(
        prog="python -m samopt.demo",
        description=(
            "Train a 64-128-10 NumPy MLP on scikit-learn's digits with noisy training "
            "labels using SGD, SAM(SGD), Adam and SAM(Adam); print clean-test accuracy "
            "(mean ± std over seeds) and plot it per epoch."
        ),
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        help=f"epochs per run (default {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--noise",
        type=_noise_fraction,
        default=DEFAULT_NOISE,
        help="fraction of training labels replaced by uniformly random labels "
        f"(default {DEFAULT_NOISE:g})",
    )
    parser.add_argument(
        "--rho",
        nargs="+",
        metavar="[FAMILY=]RHO",
        default=None,
        help=f"SAM radius, for both families or per family, e.g. sgd=0.5 (default {rhos})",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=["base", *VARIANTS],
        default=list(DEFAULT_OPTIMIZERS),
        metavar="NAME",
        help="what to train over each family: base (the optimizer alone) and any of "
        f"{', '.join(VARIANTS)} (default: base sam)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        metavar="N|S,S,...",
        default=[str(DEFAULT_SEEDS)],
        help="a count N (seeds 0..N-1) or a list of seeds: 0,4,7 or 0 4 7, one seed: 7, "
        f"(default {DEFAULT_SEEDS})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"mini-batch size (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        metavar="[FAMILY=]LR",
        default=None,
        help="peak learning rate, for both families or per family, e.g. adam=0.002 "
        f"(default {lrs}; SGD has momentum 0.9)",
    )
    parser.add_argument(
        "--weight-decay",
        type=_non_negative,
        default=DEFAULT_WEIGHT_DECAY,
        help="L2 weight decay of the weights, not the biases (default "
        f"{DEFAULT_WEIGHT_DECAY:g})",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=_non_negative_int,
        default=DEFAULT_WARMUP_EPOCHS,
        help="epochs of linear warmup to the learning rate before the cosine decay to 0 "
        f"(default {DEFAULT_WARMUP_EPOCHS})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"where to write the PNG plot (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write all curves and figures to this file"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seeds = _parse_seeds(args.seeds)
        lr = _parse_per_family("--lr", args.lr or [])
        rho = _parse_per_family("--rho", args.rho or [])
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    epochs: int = args.epochs
    noise: float = args.noise
    batch_size: int = args.batch_size
    specs = default_specs(lr, rho, args.weight_decay, args.warmup_epochs, args.optimizers)

    start = time.perf_counter()
    runs, corrupted = run_experiment(
        specs,
        seeds,
        epochs=epochs,
        noise=noise,
        batch_size=batch_size,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    summaries = {spec.name: summarize(runs[spec.name]) for spec in specs}
    table = format_table(specs, summaries)

    wrong = float(np.mean(list(corrupted.values())))
    print(
        f"digits, MLP {'-'.join(map(str, DEFAULT_SIZES))}, {100 * noise:g}% of training labels "
        f"resampled ({100 * wrong:.1f}% wrong), {epochs} epochs, batch {batch_size}, "
        f"seeds {seeds}"
    )
    print("accuracy in %, mean ± sample std over seeds; 'best' is the best epoch on the test set")
    print(table)
    print(f"wall time {elapsed:.1f} s")

    rhos = {spec.family: spec.rho for spec in specs if spec.rho is not None}
    if len(set(rhos.values())) == 1:
        rho_text = f"rho {next(iter(rhos.values())):g}"
    else:
        rho_text = "rho " + ", ".join(f"{f} {r:g}" for f, r in rhos.items())
    title = (
        f"digits, {100 * noise:g}% noisy training labels, SAM {rho_text}: "
        f"mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )
    png = plot_curves(runs, args.out, title=title)
    print(f"wrote {png}")
    if args.json is not None:
        report = {
            "config": {
                "epochs": epochs,
                "noise": noise,
                "batch_size": batch_size,
                "seeds": seeds,
                "sizes": list(DEFAULT_SIZES),
                "dtype": "float64",
                "test_fraction": DEFAULT_TEST_FRACTION,
                "weight_decay": args.weight_decay,
                "warmup_epochs": args.warmup_epochs,
                "schedule": "linear warmup, then cosine to 0 (per mini-batch)",
            },
            "corrupted_fraction": {str(k): v for k, v in corrupted.items()},
            "optimizers": [
                {
                    "name": spec.name,
                    "family": spec.family,
                    "lr": spec.lr,
                    "rho": spec.rho,
                    "summary": summaries[spec.name],
                    "runs": [r.to_json() for r in runs[spec.name]],
                }
                for spec in specs
            ],
            "table": table,
            "wall_time_s": elapsed,
            "png": str(png),
        }
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
