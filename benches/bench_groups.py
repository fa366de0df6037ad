#!/usr/bin/env python
"""What parameter groups cost: a SAM(AdamW) step with three parameter groups against the
same step without groups, measured in the same process, interleaved rep by rep.

    python benches/bench_groups.py            # ~30 s
    python benches/bench_groups.py --quick    # a few seconds (CI's smoke)

The grouped optimizer has the standard recipe's groups: the biases without weight decay
and with twice the learning rate, the embeddings with their own betas, and for SAM the
biases left out of the perturbation and the embeddings with their own rho. Nothing is
asserted on the figures.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Any

import numpy as np
import samopt


def build(grouped: bool) -> samopt.SamOptimizer:
    cfg = samopt.OptimizerConfig(learning_rate=1e-3, weight_decay=0.01)
    if not grouped:
        return samopt.SamOptimizer(samopt.AdamWOptimizer(cfg), 0.05)
    biases = re.compile(r".*bias")
    base = samopt.AdamWOptimizer(cfg, param_groups=[
        {"params": biases, "weight_decay": 0.0, "lr": 2e-3},
        {"params": lambda name: name.startswith("emb"), "beta1": 0.8, "beta2": 0.99},
        {"params": ["w0"], "epsilon": 1e-6},
    ])
    return samopt.SamOptimizer(base, 0.05, param_groups=[
        {"params": biases, "perturb": False},
        {"params": lambda name: name.startswith("emb"), "rho": 0.1},
        {"params": ["w0"], "rho": 0.02},
    ])


def arrays(n_arrays: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    kinds = ["bias", "emb", "w"]
    return {f"{kinds[i % 3]}{i}": rng.standard_normal(size) for i in range(n_arrays)}


def measure(n_arrays: int, size: int, reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    setups = {}
    for grouped in (False, True):
        params = arrays(n_arrays, size, rng)
        grads = {k: rng.standard_normal(size) for k in params}
        setups[grouped] = (build(grouped), params, grads)
    inner = max(1, int(2e6 // max(n_arrays * size, 1)))
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(reps + 1):  # the first rep warms up
        for grouped, (opt, params, grads) in setups.items():
            start = time.perf_counter()
            for _ in range(inner):
                opt.first_step(params, grads)
                opt.second_step(params, grads)
            if rep:
                times[grouped].append((time.perf_counter() - start) / inner)
    plain, grouped_t = statistics.median(times[False]), statistics.median(times[True])
    return {"arrays": n_arrays, "size": size, "plain_s": plain, "grouped_s": grouped_t,
            "ratio": grouped_t / plain}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few reps")
    args = parser.parse_args()
    sizes = [(3, 10, 5), (200, 1000, 5)] if args.quick else \
        [(3, 10, 15), (200, 100, 15), (200, 1000, 15), (20, 500_000, 9)]
    print("SAM(AdamW) step (first + second), 3 parameter groups against none, medians:")
    print(f"{'arrays x elements':>20} {'no groups':>12} {'3 groups':>12} {'ratio':>7}")
    for n, size, reps in sizes:
        row = measure(n, size, reps)
        unit, scale = ("ms", 1e3) if row["plain_s"] > 1e-3 else ("us", 1e6)
        print(f"{f'{n} x {size:,}':>20} {row['plain_s'] * scale:>9.1f} {unit} "
              f"{row['grouped_s'] * scale:>9.1f} {unit} {row['ratio']:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
