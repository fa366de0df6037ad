"""Parameter groups, PyTorch's habit keyed by name: ``param_groups=[{"params": selector,
**overrides}, ...]``. A selector is a collection of names, a compiled regular expression
(``re.fullmatch`` on the name) or a callable ``name -> bool``; names in no group use the
optimizer's own values. The native engine asks :meth:`ParamGroups.assign` once per name
and remembers the answer, so groups cost nothing per step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Union

from ._errors import OptimizerError

__all__ = ["ParamGroups", "Selector"]

Selector = Union[Collection[str], "re.Pattern[str]", Callable[[str], bool]]
"""Which names a parameter group holds."""

Check = Callable[[str, object], Any]
"""Validates one override: ``check(key, value) -> value``, raising OptimizerError."""


def _matcher(index: int, selector: object) -> Callable[[str], bool]:
    where = f"param_groups[{index}]"
    if isinstance(selector, str):
        raise OptimizerError(
            f"{where}: 'params' must be a collection of names, a compiled regular expression "
            f"or a callable, got the str {selector!r} (write [{selector!r}] or "
            f"re.compile({selector!r}))",
            "params",
        )
    if isinstance(selector, re.Pattern):
        pattern = selector
        return lambda name: pattern.fullmatch(name) is not None
    if callable(selector):
        return lambda name: bool(selector(name))
    if isinstance(selector, (list, tuple, set, frozenset)):
        names = frozenset(selector)
        strange = sorted(repr(n) for n in names if not isinstance(n, str))
        if strange:
            raise OptimizerError(
                f"{where}: 'params' must hold parameter names (str), got {strange[0]}", "params"
            )
        return names.__contains__
    raise OptimizerError(
        f"{where}: 'params' must be a collection of names, a compiled regular expression or "
        f"a callable, got {type(selector).__name__}",
        "params",
    )


class ParamGroups:
    """Validated parameter groups: each group's overrides and which names it holds."""

    def __init__(self, overrides: Sequence[dict[str, Any]], selectors: Sequence[object]) -> None:
        self.overrides = tuple(overrides)
        self.selectors = tuple(selectors)
        self._matchers = tuple(_matcher(i, selector) for i, selector in enumerate(selectors))

    def __reduce__(self) -> tuple[type[ParamGroups], tuple[Any, ...]]:
        # The matchers are closures: rebuilt from the selectors, which pickle as they are.
        return (ParamGroups, (self.overrides, self.selectors))

    @classmethod
    def parse(cls, param_groups: object, checks: Mapping[str, Check]) -> ParamGroups:
        """``param_groups`` checked against the overrides ``checks`` allows."""
        if param_groups is None:
            return cls((), ())
        if isinstance(param_groups, (str, bytes, Mapping)) or not isinstance(
            param_groups, Sequence
        ):
            raise OptimizerError(
                f"param_groups must be a list of dicts, got {type(param_groups).__name__}",
                "param_groups",
            )
        overrides, selectors = [], []
        for index, group in enumerate(param_groups):
            if not isinstance(group, Mapping):
                raise OptimizerError(
                    f"param_groups[{index}] must be a dict, got {type(group).__name__}",
                    "param_groups",
                )
            if "params" not in group:
                raise OptimizerError(f"param_groups[{index}] has no 'params'", "params")
            values: dict[str, Any] = {}
            for key, value in group.items():
                if key == "params":
                    continue
                if key not in checks:
                    allowed = ", ".join(sorted(checks))
                    raise OptimizerError(
                        f"param_groups[{index}]: unknown override {key!r} "
                        f"(this optimizer's groups take {allowed})",
                        str(key),
                    )
                values[key] = checks[key](key, value)
            overrides.append(values)
            selectors.append(group["params"])
        return cls(overrides, selectors)

    def __len__(self) -> int:
        return len(self.overrides)

    def assign(self, name: str) -> int:
        """The engine's group of ``name``: 0 for the optimizer's own values, ``i + 1`` for
        ``param_groups[i]``. A name two groups hold is an error."""
        found = [index for index, matches in enumerate(self._matchers) if matches(name)]
        if len(found) > 1:
            groups = " and ".join(f"param_groups[{i}]" for i in found)
            raise OptimizerError(f"parameter {name!r} is in both {groups}", name)
        return found[0] + 1 if found else 0

    def resolved(self, defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every group's values, the optimizer's own first: ``defaults`` overridden."""
        return [dict(defaults)] + [{**defaults, **values} for values in self.overrides]
