"""samopt's SAM family against kozistr/pytorch_optimizer's, step by step on the same
gradients (only where torch and pytorch_optimizer are installed; not run in CI).

Both optimizers start from the same weights of a small quadratic-plus-sine loss whose
gradient is computed in NumPy (float64) from each optimizer's own current weights, so
the two trajectories are compared as they would be used. After every step the largest
relative difference of the weights is recorded; the script prints, per shared variant,
the largest over the run. Expected differences (see README, "The SAM family") come from
where kozistr's code departs from the papers: LookSAM's per-array norms, F-SAM's EMA order
and its first step, GCSAM's norm before centralising, bSAM's noise and restores.

    python benches/compare_peers.py [--steps 50]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import samopt

try:
    import pytorch_optimizer as po  # type: ignore[import-not-found]
    import torch  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    torch = None
    po = None

SHAPES = {"w": (8, 5), "b": (5,)}
LR, RHO = 0.02, 0.05


def problem(seed: int = 0) -> tuple[dict[str, np.ndarray], Callable[..., Any]]:
    rng = np.random.default_rng(seed)
    consts = {k: (rng.uniform(0.5, 2.0, s), rng.standard_normal(s)) for k, s in SHAPES.items()}
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}

    def grads_at(values: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        return {k: a * values[k] + b + 0.9 * np.sin(3 * values[k] + 0.1 * step)
                for k, (a, b) in consts.items()}

    return params, grads_at


def torch_run(make: Callable[[list[Any]], Any], params: dict[str, np.ndarray],
              grads_at: Callable[..., Any], steps: int, two_phase: bool) -> list[dict[str, Any]]:
    tensors = {k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True)
               for k, v in params.items()}
    opt = make(list(tensors.values()))
    history = []

    def set_grads(step: int) -> None:
        values = {k: t.detach().numpy() for k, t in tensors.items()}
        for k, g in grads_at(values, step).items():
            tensors[k].grad = torch.tensor(g, dtype=torch.float64)

    for step in range(steps):
        set_grads(step)
        if two_phase:
            opt.first_step(zero_grad=True)
            set_grads(step)
            opt.second_step(zero_grad=True)
        else:
            opt.step(lambda step=step: set_grads(step))
        history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return history


def samopt_run(opt: Any, params: dict[str, np.ndarray], grads_at: Callable[..., Any],
               steps: int) -> list[dict[str, Any]]:
    values = {k: v.copy() for k, v in params.items()}
    history = []
    for step in range(steps):
        opt.sam_step(values, lambda p, step=step: (0.0, grads_at(p, step)))
        history.append({k: v.copy() for k, v in values.items()})
    return history


def largest_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for k in x:
            scale = max(float(np.max(np.abs(y[k]))), 1e-300)
            worst = max(worst, float(np.max(np.abs(x[k] - y[k]))) / scale)
    return worst


def sgd(momentum: float = 0.0) -> samopt.SgdOptimizer:
    return samopt.SgdOptimizer(samopt.OptimizerConfig(learning_rate=LR, momentum=momentum))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if torch is None or po is None:
        print("torch and pytorch_optimizer are not installed: nothing to compare")
        return
    params, grads_at = problem()
    # momentum 0: torch's SGD and the crate's form are then the same update.
    base = torch.optim.SGD
    cases: list[tuple[str, Any, Callable[[list[Any]], Any], bool]] = [
        ("SAM", samopt.SamOptimizer(sgd(), RHO),
         lambda p: po.SAM(p, base, rho=RHO, lr=LR), True),
        ("GCSAM", samopt.SamOptimizer(sgd(), RHO, gradient_centralization=True),
         lambda p: po.SAM(p, base, rho=RHO, use_gc=True, lr=LR), True),
        ("LookSAM", samopt.LookSamOptimizer(sgd(), RHO, k=5, alpha=0.7),
         lambda p: po.LookSAM(p, base, rho=RHO, k=5, alpha=0.7, lr=LR), True),
        ("WSAM (coupled)", samopt.WsamOptimizer(sgd(), RHO, gamma=0.9, decouple=False),
         lambda p: po.WSAM(None, p, base, rho=RHO, gamma=0.9, decouple=False, lr=LR), True),
        ("F-SAM", samopt.FriendlySamOptimizer(sgd(), RHO, sigma=1.0, lmbda=0.6),
         lambda p: po.FriendlySAM(p, base, rho=RHO, sigma=1.0, lmbda=0.6, lr=LR), True),
    ]
    print(f"{'variant':<16} largest relative difference of the weights over {args.steps} steps")
    for name, ours, make, two_phase in cases:
        try:
            theirs = torch_run(make, params, grads_at, args.steps, two_phase)
        except Exception as error:  # a peer's API that moved: report, go on
            print(f"{name:<16} pytorch_optimizer failed: {error!r}")
            continue
        mine = samopt_run(ours, params, grads_at, args.steps)
        print(f"{name:<16} {largest_difference(mine, theirs):.3e}")


if __name__ == "__main__":
    main()
