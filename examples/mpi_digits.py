"""The noisy-digits demo, data-parallel over MPI ranks with samopt.mpi.DataParallelSam.

    mpirun -n 2 python -m mpi4py examples/mpi_digits.py     # 2 ranks
    python examples/mpi_digits.py                           # the same training on 1 rank

(as root, Open MPI also wants ``--allow-run-as-root``; see the README's "Scaling out".)
``python -m mpi4py`` runs the script so that an exception escaping it on one rank aborts
the whole job (mpi4py calls ``MPI_Abort``): under a plain ``python`` that rank would exit
and the others would wait in their next collective forever. An exception inside a step —
in the gradient function, the optimizer, even a KeyboardInterrupt — is already raised on
every rank by ``DataParallelSam.sam_step``; this covers the rest of the script.

Every rank loads the same data set and batch order (the same seeds), rank 0 initializes the
MLP and ``broadcast_parameters`` copies it to the others. Each global mini-batch of
``--batch-size`` rows is split into equal contiguous shards, one per rank; a step is
``DataParallelSam.sam_step``: gradient on the rank's shard, SAM perturbation (with the
rank's own gradient, or the averaged one with ``--sync-perturbation``), gradient at the
perturbed point, all-reduce, base step. Every epoch rank 0 prints the mean loss, the clean
test accuracy and the training time of the epoch; at the end it checks that the replicas
are bitwise identical and prints the mean time per epoch (the first epoch, which warms up
MPI's connections, is left out when there are several).

Data, model and optimizer settings come from ``samopt.demo`` (``pip install samopt[demo]``
for scikit-learn); MPI from ``pip install samopt[mpi]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI
from samopt import SamOptimizer
from samopt.demo import (
    DEFAULT_LR,
    DEFAULT_NOISE,
    DEFAULT_RHO,
    FAMILIES,
    OptimizerSpec,
    accuracy,
    init_mlp,
    load_noisy_digits,
    loss_and_grads,
    make_optimizer,
)
from samopt.mpi import (
    DataParallelSam,
    broadcast_parameters,
    collective_counts,
    reset_collective_counts,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    p.add_argument("--optimizer", choices=FAMILIES, default="sgd", help="SAM's base optimizer")
    p.add_argument("--lr", type=float, default=None, help="default: samopt.demo's per family")
    p.add_argument("--rho", type=float, default=None, help="default: samopt.demo's per family")
    p.add_argument("--noise", type=float, default=DEFAULT_NOISE)
    p.add_argument("--hidden", type=int, nargs="+", default=[128], help="hidden layer widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sync-perturbation",
        action="store_true",
        help="perturb with the gradient averaged over the ranks (default: each rank's own)",
    )
    p.add_argument("--json", default=None, help="write the per-epoch figures here (rank 0)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.batch_size % size:
        if rank == 0:
            print(f"--batch-size {args.batch_size} must be divisible by {size} ranks")
        return 2
    shard = args.batch_size // size

    X_train, y_train, X_test, y_test = load_noisy_digits(args.noise, args.seed)
    sizes = (X_train.shape[1], *args.hidden, 10)
    params = init_mlp(sizes, seed=args.seed if rank == 0 else args.seed + 1000 + rank)
    broadcast_parameters(params, comm, root=0)  # a common start, whatever each rank drew

    family = args.optimizer
    spec = OptimizerSpec(
        family,
        DEFAULT_LR[family] if args.lr is None else args.lr,
        DEFAULT_RHO[family] if args.rho is None else args.rho,
    )
    sam = make_optimizer(spec)  # SamOptimizer(SgdOptimizer or AdamOptimizer, rho)
    assert isinstance(sam, SamOptimizer)
    dp = DataParallelSam(sam, comm, sync_perturbation=args.sync_perturbation)

    batch_rng = np.random.default_rng(np.random.SeedSequence([args.seed, 3]))  # same on all
    steps = X_train.shape[0] // args.batch_size  # full batches only (equal shards)
    if rank == 0:
        threads = {k: os.environ.get(k, "-") for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS")}
        print(
            f"{spec.name} lr={spec.lr:g} rho={spec.rho:g} MLP {'-'.join(map(str, sizes))}, "
            f"{size} rank{'s' if size > 1 else ''} x {shard} rows = global batch "
            f"{args.batch_size}, {steps} steps/epoch, "
            f"sync_perturbation={args.sync_perturbation}, threads {threads}"
        )
        print(f"{'epoch':>5} {'loss':>8} {'test acc':>8} {'time/epoch':>11}")

    history: list[dict[str, float]] = []
    reset_collective_counts()
    for epoch in range(1, args.epochs + 1):
        order = batch_rng.permutation(X_train.shape[0])
        losses = []
        comm.Barrier()
        start = MPI.Wtime()
        for b in range(steps):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            mine = idx[rank * shard : (rank + 1) * shard]
            Xb, yb = X_train[mine], y_train[mine]
            losses.append(dp.sam_step(params, functools.partial(loss_and_grads, X=Xb, y=yb)))
        comm.Barrier()
        elapsed = MPI.Wtime() - start
        elapsed = comm.allreduce(elapsed, op=MPI.MAX)
        acc = accuracy(params, X_test, y_test)
        history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)), "test_acc": acc, "seconds": elapsed}
        )
        if rank == 0:
            print(
                f"{epoch:>5} {np.mean(losses):>8.4f} {acc:>8.3f} {elapsed * 1e3:>9.1f}ms",
                flush=True,
            )

    counts = collective_counts()
    consistent = dp.replicas_consistent(params)
    timed = history[1:] if len(history) > 1 else history
    per_epoch = float(np.mean([h["seconds"] for h in timed]))
    if rank == 0:
        print(
            f"mean time per epoch{' (epochs 2+)' if len(history) > 1 else ''}: "
            f"{per_epoch * 1e3:.1f} ms on {size} rank{'s' if size > 1 else ''}; "
            f"final clean test accuracy {history[-1]['test_acc']:.3f}; "
            f"all-reduces per step {counts['Allreduce'] / (steps * args.epochs):g}; "
            f"replicas bitwise identical: {consistent}"
        )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "ranks": size,
                        "args": vars(args),
                        "history": history,
                        "mean_seconds_per_epoch": per_epoch,
                        "consistent": consistent,
                    },
                    f,
                    indent=2,
                )
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main())
