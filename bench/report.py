"""
The results table: each figure for NOVA beside ssh -R, their ratio, the bar
NOVA must meet and whether it does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class BarKind(enum.Enum):
    RATIO_AT_LEAST = "ratio_at_least"  # NOVA / ssh >= limit
    RATIO_AT_MOST = "ratio_at_most"  # NOVA / ssh <= limit
    AT_MOST = "at_most"  # NOVA <= limit (absolute, in the row's unit)
    NONE = "none"  # shown for context only


@dataclass(frozen=True)
class Bar:
    kind: BarKind
    limit: float = 0.0
    unit: str = ""

    def __str__(self) -> str:
        if self.kind is BarKind.RATIO_AT_LEAST:
            return f">= {self.limit:g}x ssh"
        if self.kind is BarKind.RATIO_AT_MOST:
            return f"<= {self.limit:g}x ssh"
        if self.kind is BarKind.AT_MOST:
            return f"<= {self.limit:g} {self.unit}".rstrip()
        return "-"

    def passes(self, nova: float, ratio: float | None) -> bool | None:
        if self.kind is BarKind.RATIO_AT_LEAST:
            return None if ratio is None else ratio >= self.limit
        if self.kind is BarKind.RATIO_AT_MOST:
            return None if ratio is None else ratio <= self.limit
        if self.kind is BarKind.AT_MOST:
            return nova <= self.limit
        return None


NO_BAR = Bar(BarKind.NONE)


@dataclass
class Row:
    key: str
    label: str
    unit: str
    bar: Bar
    has_ssh: bool = True  # False: NOVA only (no ssh counterpart)
    nova: float | None = None
    ssh: float | None = None
    error: str | None = None  # the measurement broke (NOVA's or ssh's side)

    @property
    def ratio(self) -> float | None:
        if self.nova is None or self.ssh is None or self.ssh == 0:
            return None
        return self.nova / self.ssh

    @property
    def passed(self) -> bool | None:
        if self.error is not None or self.nova is None:
            return None
        return self.bar.passes(self.nova, self.ratio)

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.bar.kind is BarKind.NONE:
            return "-"
        passed = self.passed
        return "n/a" if passed is None else ("pass" if passed else "FAIL")

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "nova": self.nova,
            "ssh": self.ssh if self.has_ssh else None,
            "ratio": self.ratio,
            "bar": str(self.bar),
            "bar_kind": self.bar.kind.value,
            "bar_limit": self.bar.limit if self.bar.kind is not BarKind.NONE else None,
            "result": self.result,
            "error": self.error,
        }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(rows: list[Row]) -> str:
    """A plain-text table (also valid Markdown)."""
    header = ["figure", "unit", "NOVA", "ssh -R", "NOVA/ssh", "bar", "result"]
    lines = []
    for row in rows:
        nova = "ERROR" if row.error is not None and row.nova is None else _number(row.nova)
        if not row.has_ssh:
            ssh = "-"
        else:
            ssh = "ERROR" if row.error is not None and row.ssh is None else _number(row.ssh)
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        lines.append([row.label, row.unit, nova, ssh, ratio, str(row.bar), row.result])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4}

    def fmt(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])
