# Hand-written stub of the Rust extension (checked by `python -m mypy.stubtest samopt._core`).
# Every phase validates the whole call before writing and raises samopt's OptimizerError
# (NonFiniteGradientError for NaN/inf gradients, OutOfMemoryError when a buffer cannot be
# allocated) naming the offending key; each commits its state changes into the engines
# before it returns.
from collections.abc import Callable
from typing import Any, final

from numpy.typing import NDArray

__all__ = [
    "Engine",
    "FlatArena",
    "LayerEngine",
    "LookaheadEngine",
    "Names",
    "ProdigyEngine",
    "SamEngine",
    "StagedLookahead",
    "StagedSamState",
    "StagedTable",
    "accumulate",
    "bsam_update",
    "centralize",
    "combine",
    "cosine",
    "divide",
    "first_step",
    "fisher",
    "gradient_norm",
    "lookahead_step",
    "mask",
    "noise",
    "owned_keys",
    "parse_table",
    "partition_state",
    "restore",
    "sam_step",
    "scale",
    "schedule_free_shift",
    "second_step",
    "step",
    "update_hessian",
    "zero",
]

_Arrays = dict[str, Any]
_State = dict[str, NDArray[Any]]

@final
class FlatArena:
    """One zero-filled float32/float64 buffer and a C-contiguous view per name, each a
    range of it in name order (see ``samopt._flat``)."""

    def __new__(cls, names: list[str], shapes: list[list[int]], double: bool) -> FlatArena: ...
    @property
    def buffer(self) -> NDArray[Any]: ...
    @property
    def keys(self) -> list[str]: ...
    @property
    def views(self) -> list[NDArray[Any]]: ...
    def intact(self, mapping: dict[str, Any]) -> bool: ...
    def same_layout(self, other: FlatArena) -> bool: ...
    def like(self, double: bool) -> FlatArena: ...
    def owner(self, element: int) -> str | None: ...
    def split_state(self, state: _State, flat_key: str) -> _State: ...
    def gather_state(
        self, state: _State, prefixes: list[str], flat_key: str
    ) -> tuple[_State, int] | None: ...

@final
class Engine:
    """A base optimizer's native state: its spec, hyperparameters, step count and
    per-parameter slots."""

    lrs: list[float]
    weight_sums: list[float]
    averaged: bool
    @property
    def steps(self) -> int: ...
    @property
    def slots(self) -> list[str]: ...
    def __new__(
        cls,
        kind: str,
        groups: list[dict[str, Any]],
        *,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        assign: Callable[[str], int] | None = None,
    ) -> Engine: ...
    def state_dict(self, into: _State | None = None) -> _State: ...
    def state_dict_gathered(self, into: _State, arena: FlatArena, flat_key: str) -> bool: ...
    def load(self, steps: int, entries: StagedTable) -> None: ...

@final
class SamEngine:
    """SAM's native state: saved values (and GSAM's g0), the pending set, the call count."""

    def __new__(
        cls,
        keeps_grad0: bool,
        groups: list[tuple[float, bool, float, bool]],
        assign: Callable[[str], int] | None = None,
    ) -> SamEngine: ...
    def set_groups(self, groups: list[tuple[float, bool, float, bool]]) -> None: ...
    @property
    def pending(self) -> bool: ...
    @property
    def calls(self) -> int: ...
    def pending_names(self) -> list[str]: ...
    def state_dict(self, into: _State | None = None) -> _State: ...
    def state_dict_gathered(self, into: _State, arena: FlatArena, flat_key: str) -> bool: ...
    def stage(
        self,
        calls: int,
        pending: StagedTable,
        grad0_norm: float,
    ) -> StagedSamState: ...
    def install(self, staged: StagedSamState) -> None: ...

@final
class StagedTable:
    """A state dict's per-parameter arrays by name, one per slot, checked and copied, not
    yet in force."""

    def __len__(self) -> int: ...
    def check_layouts(self, prefixes: list[str]) -> None: ...
    def check_fits(self, base: StagedTable, prefix: str, base_prefix: str) -> None: ...

def partition_state(
    state: dict[Any, Any], exact: list[str], prefixes: list[str]
) -> tuple[dict[str, Any], dict[Any, Any]]: ...
def owned_keys(state: dict[Any, Any], exact: list[str], prefixes: list[str]) -> list[str]: ...
def parse_table(
    state: dict[Any, Any],
    prefixes: list[str],
    non_negative: list[str],
    scalars: list[str],
    skip_prefixes: list[str] = ...,
    strict: bool = True,
    same_layouts: bool = True,
) -> StagedTable: ...
@final
class StagedSamState:
    """A SAM state read from a state dict, checked and copied, not yet in force."""

def step(
    engine: Engine | LayerEngine | ProdigyEngine, params: _Arrays, grads: _Arrays
) -> None: ...
def first_step(
    sam: SamEngine, params: _Arrays, grads: _Arrays, rho: float, eps: float
) -> float: ...
def second_step(
    sam: SamEngine,
    base: Any,
    params: _Arrays,
    grads: _Arrays,
    alpha: float | None,
    count: bool = False,
) -> None: ...
def restore(sam: SamEngine, params: _Arrays) -> None: ...
def schedule_free_shift(engine: Engine, params: _Arrays, to_average: bool) -> None: ...
def sam_step(
    sam: SamEngine,
    base: Any,
    params: _Arrays,
    grad_fn: Callable[[_Arrays], tuple[Any, Any]],
    rho: float,
    eps: float,
    alpha: float | None,
    interval: int,
) -> Any: ...
def gradient_norm(grads: _Arrays) -> float: ...

@final
class Names:
    """The sorted order of a dict's keys, reused while the same keys come again."""

    def __new__(cls) -> Names: ...

def accumulate(names: Names, sums: _Arrays, grads: _Arrays, weight: float) -> None: ...
def scale(names: Names, out: _Arrays, values: _Arrays, factor: float) -> None: ...
def zero(names: Names, arrays: _Arrays) -> None: ...
def centralize(names: Names, out: _Arrays, grads: _Arrays) -> None: ...
def mask(
    names: Names, out: _Arrays, grads: _Arrays, seed: int, draw: int, keep: float
) -> None: ...
def cosine(a: _Arrays, b: _Arrays) -> tuple[float, float, float]: ...
def fisher(names: Names, out: _Arrays, grads: _Arrays, eta: float) -> None: ...
def noise(
    names: Names, out: _Arrays, precision: _Arrays, seed: int, draw: int, num_data: float
) -> None: ...
def divide(
    names: tuple[Names, Names], out: _Arrays, grads: _Arrays, precision: _Arrays
) -> None: ...
def combine(
    names: tuple[Names, Names], out: _Arrays, x: _Arrays, a: float, y: _Arrays, b: float
) -> None: ...
def bsam_update(
    names: tuple[Names, Names, Names],
    params: _Arrays,
    ascended: _Arrays,
    momentum: _Arrays,
    sampled: _Arrays,
    precision: _Arrays,
    hypers: list[tuple[float, float, float, float, float]],
    groups: dict[str, int],
) -> None: ...

@final
class LookaheadEngine:
    """Lookahead's native state: the slow weights and the step counter."""

    def __new__(cls) -> LookaheadEngine: ...
    @property
    def steps(self) -> int: ...
    def state_dict(self) -> _State: ...
    def stage(self, steps: int, entries: dict[str, tuple[NDArray[Any]]]) -> StagedLookahead: ...
    def install(self, staged: StagedLookahead) -> None: ...

@final
class StagedLookahead:
    """A Lookahead state read from a state dict, checked and copied, not yet in force."""

def lookahead_step(
    engine: LookaheadEngine,
    params: _Arrays,
    inner: Callable[[], Any],
    alpha: float,
    k: int,
    advance: bool,
    pending: bool,
) -> Any: ...

@final
class LayerEngine:
    """A layer-wise optimizer's native state (LAMB, LARS): its kind, hyperparameters, step
    count and per-parameter slots."""

    def __new__(
        cls,
        kind: str,
        groups: list[dict[str, Any]],
        *,
        trust_coef: float = 0.0,
        sophia_rho: float = 0.0,
        hessian_update_freq: int = 1,
        adamp_delta: float = 0.0,
        adamp_wd_ratio: float = 1.0,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        assign: Callable[[str], int] | None = None,
    ) -> LayerEngine: ...
    lrs: list[float]
    @property
    def steps(self) -> int: ...
    @property
    def slots(self) -> list[str]: ...
    def state_dict(self, into: _State | None = None) -> _State: ...
    @property
    def since_hessian(self) -> int: ...
    def load(self, steps: int, entries: StagedTable, since_hessian: int = 0) -> None: ...

def update_hessian(engine: LayerEngine, params: _Arrays, estimates: _Arrays) -> None: ...

@final
class ProdigyEngine:
    """Prodigy's native state: its hyperparameters, step count, estimate of d and
    per-parameter slots."""

    def __new__(
        cls,
        groups: list[tuple[float, float]],
        *,
        beta1: float,
        beta2: float,
        beta3: float,
        epsilon: float,
        d0: float,
        d_coef: float,
        d_growth_rate: float,
        bias_correction: bool,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        assign: Callable[[str], int] | None = None,
    ) -> ProdigyEngine: ...
    lrs: list[float]
    @property
    def steps(self) -> int: ...
    @property
    def slots(self) -> list[str]: ...
    @property
    def estimate(self) -> tuple[float, float, float]: ...
    def state_dict(self, into: _State | None = None) -> _State: ...
    def load(
        self, steps: int, estimate: tuple[float, float, float], entries: StagedTable
    ) -> None: ...
