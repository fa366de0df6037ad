"""The README's quickstart: linear regression trained with SAM(SGD) from a NumPy loop.

Also the typed usage example that CI checks with ``mypy --strict``.
"""

from __future__ import annotations

import numpy as np
import samopt
from numpy.typing import NDArray

Arrays = dict[str, NDArray[np.float64]]


def loss_and_grads(
    params: Arrays, x: NDArray[np.float64], y: NDArray[np.float64]
) -> tuple[float, Arrays]:
    residual = x @ params["w"] + params["b"] - y
    loss = float(np.mean(residual**2))
    grads = {
        "w": 2.0 * x.T @ residual / len(y),
        "b": np.asarray(2.0 * residual.mean()),
    }
    return loss, grads


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8))
    y = x @ rng.normal(size=8) + 0.5 + 0.1 * rng.normal(size=256)
    params: Arrays = {"w": np.zeros(8), "b": np.zeros(())}

    config = samopt.OptimizerConfig(learning_rate=0.05, momentum=0.9)
    sam = samopt.SamOptimizer(samopt.SgdOptimizer(config), rho=0.05)
    for step in range(200):
        loss, grads = loss_and_grads(params, x, y)
        sam.first_step(params, grads)  # climb to the worst point within rho
        _, grads = loss_and_grads(params, x, y)  # gradient there
        sam.second_step(params, grads)  # back exactly, then the SGD step
        if step % 50 == 0:
            print(f"step {step:3d}  loss {loss:.4f}")

    # The same, in one call per step:
    for _ in range(50):
        loss = sam.sam_step(params, lambda p: loss_and_grads(p, x, y))
    _, grads = loss_and_grads(params, x, y)
    print(f"final loss {loss:.4f}, gradient norm {samopt.compute_gradient_norm(grads):.2e}")


if __name__ == "__main__":
    main()
