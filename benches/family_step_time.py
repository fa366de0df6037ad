"""The time of one step of the demo's task (samopt.demo: MLP 64-128-10, batch 32, the
standard recipe's SGD) for SGD, SAM, LookSAM (k=5) and randomized SAM (p=0.3), and of one
gradient, interleaved repetition by repetition so the ratios share the machine's state.

    python benches/family_step_time.py [--reps 9] [--steps 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import samopt
from samopt import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    data = demo.load_digits_split(0.4, 0)
    X, y = data.X_train[:32], data.y_train[:32]

    def base() -> Any:
        return demo.make_optimizer(demo.OptimizerSpec("sgd", 0.01))

    makers: dict[str, Callable[[], Any]] = {
        "SGD": base,
        "SAM": lambda: samopt.SamOptimizer(base(), 1.0),
        "LookSAM k=5": lambda: samopt.LookSamOptimizer(base(), 0.5),
        "RandomizedSAM p=0.3": lambda: samopt.RandomizedSam(
            samopt.SamOptimizer(base(), 2.0), 0.3, seed=1
        ),
    }

    def fn(p: Any) -> Any:
        return demo.loss_and_grads(p, X, y)

    times: dict[str, list[float]] = {k: [] for k in ["one gradient", *makers]}
    with demo.single_threaded_blas():
        for _ in range(args.reps):
            params = demo.init_mlp(demo.DEFAULT_SIZES, 0)
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(params)
            times["one gradient"].append((time.perf_counter() - start) / args.steps)
            for name, make in makers.items():
                params, opt = demo.init_mlp(demo.DEFAULT_SIZES, 0), make()
                start = time.perf_counter()
                for _ in range(args.steps):
                    if name == "SGD":
                        opt.step(params, fn(params)[1])
                    else:
                        opt.sam_step(params, fn)
                times[name].append((time.perf_counter() - start) / args.steps)
    sgd = float(np.min(times["SGD"]))
    print(f"{'':<22} {'min µs':>8} {'median µs':>10} {'min × SGD':>10}")
    for name, values in times.items():
        low, mid = float(np.min(values)), float(np.median(values))
        print(f"{name:<22} {low * 1e6:>8.0f} {mid * 1e6:>10.0f} {low / sgd:>10.2f}")


if __name__ == "__main__":
    main()
