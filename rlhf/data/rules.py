"""Rules for rows that cannot train: a `Rule` per reason (an empty side, chosen == rejected, too many
tokens), `apply_rules` to drop what they name, rule after rule, and the `DropReport` that counts
the dropped rows by reason with the first row labels, for the log and the stage manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rlhf.data.arrow import map_batched

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class DropReport:
    """What a preparation step dropped, by reason, for the log and the stage manifest."""

    kept: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    first_position: dict[str, int] = field(default_factory=dict)  # reasons are reported in row order

    def drop(self, reason: str, label: str, position: int = 0) -> None:
        """Count row `label` (at `position` in its split) under `reason`; call in row order per reason."""
        if reason not in self.dropped:
            self.first_position[reason] = position
            self.dropped = dict(sorted({**self.dropped, reason: []}.items(), key=lambda kv: self.first_position[kv[0]]))
        self.dropped[reason].append(label)

    def summary(self) -> dict[str, Any]:
        return {"kept": self.kept, "dropped": {k: len(v) for k, v in self.dropped.items()}}

    def describe(self, what: str) -> str:
        parts = [f"{what}: {self.kept} rows kept"]
        for reason, labels in self.dropped.items():
            first = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
            parts.append(f"{len(labels)} dropped ({reason}; first: {first})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Rule:
    """A reason to drop a row: `drops(*columns)` takes a batch of the named columns and says, per
    row, whether to drop it."""

    reason: str
    columns: tuple[str, ...]
    drops: Callable[..., list[bool]]


def _empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def empty_side(chosen: list[Any], rejected: list[Any]) -> list[bool]:
    """Pairs with an empty chosen or rejected response (text, or messages with no content)."""
    return [_empty(c) or _empty(r) for c, r in zip(chosen, rejected)]


def same_sides(chosen: list[Any], rejected: list[Any]) -> list[bool]:
    """Pairs whose chosen response equals the rejected one: nothing to prefer."""
    return [c == r for c, r in zip(chosen, rejected)]


def longer_than(limit: int) -> Callable[[list[int]], list[bool]]:
    """Rows whose token count (the `n_tokens` column) exceeds `limit`."""
    return lambda n_tokens: [n > limit for n in n_tokens]


RM_RULES_WITHOUT_MODEL = (
    Rule("chosen or rejected is empty", ("chosen", "rejected"), empty_side),
    Rule("chosen == rejected", ("chosen", "rejected"), same_sides),
)


def apply_rules(ds: Dataset, labels: list[str], rules: Sequence[Rule], report: DropReport | None = None,
                positions: list[int] | None = None) -> tuple[Dataset, list[str], list[int], DropReport]:
    """Drop the rows each rule names, rule after rule (a row is counted under the first rule that
    drops it); returns the rows kept, their labels, their positions in the rows first given
    (`positions`, default 0, 1, ...) and the report (`report` is added to)."""
    report = report or DropReport()
    positions = list(range(len(ds))) if positions is None else positions
    for rule in rules:
        if not len(ds):
            break
        flags = map_batched(ds, lambda *cols: {"drop": rule.drops(*cols)}, f"Rule: {rule.reason}",
                     input_columns=list(rule.columns), remove_columns=ds.column_names)["drop"]
        kept = [i for i, f in enumerate(flags) if not f]
        if len(kept) < len(ds):
            for i, f in enumerate(flags):
                if f:
                    report.drop(rule.reason, labels[i], positions[i])
            ds, labels, positions = ds.select(kept), [labels[i] for i in kept], [positions[i] for i in kept]
    report.kept = len(ds)
    return ds, labels, positions, report
