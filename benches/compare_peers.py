"""samopt's SAM family against kozistr/pytorch_optimizer's, step by step on the same
gradients (only where torch and pytorch_optimizer are installed; not run in CI).

Both optimizers start from the same float64 weights of a small quadratic-plus-sine loss
whose gradient is computed in NumPy from each optimizer's own current weights, so the two
trajectories are compared as they would be used. Both step plain SGD (lr 0.02, no
momentum, no weight decay: torch's SGD and the crate's form are then the same update; the
"SGD" row checks it) and get the same rho, adaptive flag and variant hyperparameters.
After every step the largest relative difference of the weights (per array, scaled by
the array's largest magnitude) is recorded; the script prints, per variant, the largest
over the run, for samopt's eps 0 (its default) and 1e-12 (kozistr's), and with kozistr's
global norm taken in float64 instead of its float32.

Rows marked "check" remove one cause of a difference (see README, "Against
kozistr/pytorch_optimizer"), to show that it is the cause: GCSAM with the ascent's norm
taken of the centralised gradient, LookSAM on a model of one array (per-array norms and
cosines are then the global ones), F-SAM with its EMA started at 0 and then also updated
before it is used (the paper's order). bSAM is not compared: its noise comes from each
library's own generator.

    python benches/compare_peers.py [--steps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import samopt

try:
    import pytorch_optimizer as po  # type: ignore[import-not-found]
    import pytorch_optimizer.optimizer.sam as po_sam  # type: ignore[import-not-found]
    import torch  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    torch = None
    po = None

SHAPES = {"w": (8, 5), "b": (5,)}
ONE_ARRAY = {"w": (8, 5)}
LR, RHO = 0.02, 0.05
K, ALPHA = 5, 0.7  # LookSAM
GAMMA = 0.9  # WSAM
SIGMA, LMBDA = 1.0, 0.6  # F-SAM (the paper's)
OTHER_SIGMA = 0.5
KOZISTR_EPS = 1e-12  # pytorch_optimizer's perturb_eps / eps default, added to the norm


def problem(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[
        dict[str, np.ndarray], Callable[..., Any]]:
    rng = np.random.default_rng(seed)
    consts = {k: (rng.uniform(0.5, 2.0, s), rng.standard_normal(s)) for k, s in shapes.items()}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}

    def grads_at(values: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        return {k: a * values[k] + b + 0.9 * np.sin(3 * values[k] + 0.1 * step)
                for k, (a, b) in consts.items()}

    return params, grads_at


def float64_global_norm(param_groups: Any, device: Any = None, *,
                        weight_adaptive: bool = False) -> Any:
    """pytorch_optimizer's get_global_gradient_norm (the squared norm, shape (1,)) with the
    squares summed in float64 rather than converted to float32."""
    total = torch.zeros(1, dtype=torch.float64)
    for group in param_groups:
        adaptive = weight_adaptive and group.get("adaptive", False)
        for p in group["params"]:
            if p.grad is not None:
                grad = p.grad * p.abs() if adaptive else p.grad
                total += grad.square().sum()
    return total


@contextlib.contextmanager
def kozistr_norm(float64: bool) -> Iterator[None]:
    original = po_sam.get_global_gradient_norm
    if float64:
        po_sam.get_global_gradient_norm = float64_global_norm
    try:
        yield
    finally:
        po_sam.get_global_gradient_norm = original


def centralise(tensors: dict[str, Any]) -> None:
    """Centralise the gradients before kozistr's first_step, so that its ascent's norm is
    the centralised gradient's (its own centralisation is then a no-op up to rounding)."""
    for t in tensors.values():
        po_sam.centralize_gradient(t.grad, gc_conv_only=False)


def friendly_sam(params: list[Any], sigma: float, *, ema_from_zero: bool,
                 paper_order: bool) -> Any:
    """kozistr's FriendlySAM, its EMA started at 0 instead of the first gradient, and with
    ``paper_order`` also updated before it is subtracted (m ← λm + (1−λ)g ; d = g − σm),
    done here with kozistr's own subtraction switched off (sigma 0); the norm, ascent,
    restore and base step stay kozistr's."""

    class Checked(po.FriendlySAM):  # type: ignore[misc]
        def first_step(self, zero_grad: bool = False) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    if ema_from_zero and "momentum" not in state:
                        state["momentum"] = torch.zeros_like(p.grad)
                    if paper_order:
                        ema = state.setdefault("paper_ema", torch.zeros_like(p.grad))
                        ema.mul_(LMBDA).add_(p.grad, alpha=1.0 - LMBDA)
                        p.grad.sub_(ema, alpha=sigma)
            super().first_step(zero_grad)

    return Checked(params, torch.optim.SGD, rho=RHO, sigma=0.0 if paper_order else sigma,
                   lmbda=LMBDA, lr=LR)


def torch_run(make: Callable[[list[Any]], Any], params: dict[str, np.ndarray],
              grads_at: Callable[..., Any], steps: int,
              before_first: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
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
        if isinstance(opt, torch.optim.SGD):
            opt.step()
        else:
            if before_first is not None:
                before_first(tensors)
            opt.first_step(zero_grad=True)
            set_grads(step)
            opt.second_step(zero_grad=True)
        history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return history


def samopt_run(opt: Any, params: dict[str, np.ndarray], grads_at: Callable[..., Any],
               steps: int) -> list[dict[str, Any]]:
    values = {k: v.copy() for k, v in params.items()}
    history = []
    for step in range(steps):
        if isinstance(opt, samopt.SgdOptimizer):
            opt.step(values, grads_at(values, step))
        else:
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


def sgd() -> samopt.SgdOptimizer:
    return samopt.SgdOptimizer(samopt.OptimizerConfig(learning_rate=LR, momentum=0.0))


class Case:
    def __init__(self, name: str, ours: Callable[[float], Any],
                 theirs: Callable[[list[Any]], Any], *,
                 shapes: dict[str, tuple[int, ...]] = SHAPES,
                 before_first: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.name, self.ours, self.theirs = name, ours, theirs
        self.shapes, self.before_first = shapes, before_first


def cases() -> list[Case]:
    base = torch.optim.SGD

    def sam(**kw: Any) -> Callable[[float], Any]:
        return lambda eps: samopt.SamOptimizer(sgd(), RHO, eps=eps, **kw)

    def look(eps: float) -> Any:
        return samopt.LookSamOptimizer(sgd(), RHO, k=K, alpha=ALPHA, eps=eps)

    def wsam(decouple: bool) -> Callable[[float], Any]:
        return lambda eps: samopt.WsamOptimizer(sgd(), RHO, gamma=GAMMA, decouple=decouple,
                                                eps=eps)

    def fsam(sigma: float) -> Callable[[float], Any]:
        return lambda eps: samopt.FriendlySamOptimizer(sgd(), RHO, sigma=sigma, lmbda=LMBDA,
                                                       eps=eps)

    def kozistr_fsam(sigma: float, **check: bool) -> Callable[[list[Any]], Any]:
        if check:
            return lambda p: friendly_sam(p, sigma, **check)
        return lambda p: po.FriendlySAM(p, base, rho=RHO, sigma=sigma, lmbda=LMBDA, lr=LR)

    def kozistr_look(p: list[Any]) -> Any:
        return po.LookSAM(p, base, rho=RHO, k=K, alpha=ALPHA, lr=LR)

    def kozistr_wsam(decouple: bool) -> Callable[[list[Any]], Any]:
        return lambda p: po.WSAM(None, p, base, rho=RHO, gamma=GAMMA, decouple=decouple, lr=LR)

    return [
        Case("SGD (the base)", lambda eps: sgd(), lambda p: base(p, lr=LR)),
        Case("SAM", sam(), lambda p: po.SAM(p, base, rho=RHO, lr=LR)),
        Case("ASAM", sam(adaptive=True),
             lambda p: po.SAM(p, base, rho=RHO, adaptive=True, lr=LR)),
        Case("GCSAM", sam(gradient_centralization=True),
             lambda p: po.SAM(p, base, rho=RHO, use_gc=True, lr=LR)),
        Case("  check: norm of g_c", sam(gradient_centralization=True),
             lambda p: po.SAM(p, base, rho=RHO, use_gc=True, lr=LR), before_first=centralise),
        Case("LookSAM", look, kozistr_look),
        Case("  check: one array", look, kozistr_look, shapes=ONE_ARRAY),
        Case("WSAM coupled", wsam(False), kozistr_wsam(False)),
        Case("WSAM decoupled", wsam(True), kozistr_wsam(True)),
        Case("F-SAM", fsam(SIGMA), kozistr_fsam(SIGMA)),
        Case("  check: m0 = 0", fsam(SIGMA),
             kozistr_fsam(SIGMA, ema_from_zero=True, paper_order=False)),
        # sigma 1 hides the EMA's order: g − (λm + (1−λ)g) = λ(g − m), the same direction.
        Case(f"F-SAM sigma {OTHER_SIGMA}", fsam(OTHER_SIGMA), kozistr_fsam(OTHER_SIGMA)),
        Case("  check: m0 = 0", fsam(OTHER_SIGMA),
             kozistr_fsam(OTHER_SIGMA, ema_from_zero=True, paper_order=False)),
        Case("  check: + EMA order", fsam(OTHER_SIGMA),
             kozistr_fsam(OTHER_SIGMA, ema_from_zero=True, paper_order=True)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if torch is None or po is None:
        print("torch and pytorch_optimizer are not installed: nothing to compare")
        return
    version = importlib.metadata.version
    print(f"torch {torch.__version__}, pytorch_optimizer {version('pytorch_optimizer')}, "
          f"samopt {samopt.__version__}: largest relative difference of the weights over "
          f"{args.steps} steps")
    columns = [("eps 0", 0.0, False), ("eps 1e-12", KOZISTR_EPS, False),
               ("eps 0, f64 norm", 0.0, True), ("eps 1e-12, f64 norm", KOZISTR_EPS, True)]
    print(f"{'samopt eps, kozistr norm:':<22}" + "".join(f"{t:>21}" for t, _, _ in columns))
    for case in cases():
        params, grads_at = problem(case.shapes)
        row = []
        for _, eps, float64 in columns:
            try:
                with kozistr_norm(float64):
                    theirs = torch_run(case.theirs, params, grads_at, args.steps,
                                       case.before_first)
            except Exception as error:  # a peer's API that moved: report, go on
                row.append(f"failed: {error!r}")
                continue
            mine = samopt_run(case.ours(eps), params, grads_at, args.steps)
            row.append(f"{largest_difference(mine, theirs):.2e}")
        print(f"{case.name:<22}" + "".join(f"{cell:>21}" for cell in row))


if __name__ == "__main__":
    main()
