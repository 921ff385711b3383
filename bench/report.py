"""
The results table: each figure for NOVA beside ssh -R and the Go peer
(TLS 1.3 + hashicorp/yamux), NOVA's ratio to each, the bars NOVA must meet
and whether it does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

PEERS = ("ssh", "go")
PEER_LABELS = {"ssh": "ssh", "go": "Go"}


class BarKind(enum.Enum):
    RATIO_AT_LEAST = "ratio_at_least"  # NOVA / peer >= limit
    RATIO_AT_MOST = "ratio_at_most"  # NOVA / peer <= limit
    AT_MOST = "at_most"  # NOVA <= limit (absolute, in the row's unit)
    NONE = "none"  # shown for context only


@dataclass(frozen=True)
class Bar:
    kind: BarKind
    limit: float = 0.0
    unit: str = ""
    peer: str = "ssh"  # what a ratio bar is measured against: "ssh" or "go"

    def __str__(self) -> str:
        if self.kind is BarKind.RATIO_AT_LEAST:
            return f">= {self.limit:g}x {PEER_LABELS[self.peer]}"
        if self.kind is BarKind.RATIO_AT_MOST:
            return f"<= {self.limit:g}x {PEER_LABELS[self.peer]}"
        if self.kind is BarKind.AT_MOST:
            return f"<= {self.limit:g} {self.unit}".rstrip()
        return "-"

    def passes(self, nova: float, ratio: float | None) -> bool | None:
        """C{ratio} is NOVA / this bar's peer (None when the peer was not measured)."""
        if self.kind is BarKind.RATIO_AT_LEAST:
            return None if ratio is None else ratio >= self.limit
        if self.kind is BarKind.RATIO_AT_MOST:
            return None if ratio is None else ratio <= self.limit
        if self.kind is BarKind.AT_MOST:
            return nova <= self.limit
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"bar": str(self), "kind": self.kind.value, "limit": self.limit, "peer": self.peer}


NO_BAR = Bar(BarKind.NONE)


@dataclass
class Row:
    key: str
    label: str
    unit: str
    bars: tuple[Bar, ...] = ()
    peers: tuple[str, ...] = PEERS  # measured beside NOVA; () for NOVA-only figures
    nova: float | None = None
    ssh: float | None = None
    go: float | None = None
    error: str | None = None  # the measurement broke (NOVA's or a peer's side)
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it was not measured

    @property
    def has_ssh(self) -> bool:
        return "ssh" in self.peers

    def value(self, peer: str) -> float | None:
        if peer not in self.peers:
            return None
        value: float | None = getattr(self, peer)
        return value

    def ratio_to(self, peer: str) -> float | None:
        other = self.value(peer)
        if self.nova is None or other is None or other == 0:
            return None
        return self.nova / other

    @property
    def ratio(self) -> float | None:
        """NOVA / ssh -R."""
        return self.ratio_to("ssh")

    @property
    def real_bars(self) -> list[Bar]:
        return [bar for bar in self.bars if bar.kind is not BarKind.NONE]

    def results(self) -> list[bool | None]:
        """Per bar of L{real_bars}: met, missed, or None (not measured)."""
        if self.error is not None or self.nova is None:
            return [None for _ in self.real_bars]
        nova = self.nova
        return [bar.passes(nova, self.ratio_to(bar.peer)) for bar in self.real_bars]

    @property
    def passed(self) -> bool | None:
        """False if any bar is missed, True if every bar is met, None otherwise."""
        results = self.results()
        if not results:
            return None
        if any(r is False for r in results):
            return False
        if all(r is True for r in results):
            return True
        return None

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        if not self.real_bars:
            return "-"
        passed = self.passed
        return "n/a" if passed is None else ("pass" if passed else "FAIL")

    @property
    def bar_text(self) -> str:
        return ", ".join(str(bar) for bar in self.real_bars) or "-"

    def as_dict(self) -> dict[str, Any]:
        first = next(iter(self.real_bars), NO_BAR)
        results = self.results()
        return {
            "label": self.label,
            "unit": self.unit,
            "nova": self.nova,
            "ssh": self.value("ssh"),
            "go": self.value("go"),
            "ratio": self.ratio,
            "ratio_go": self.ratio_to("go"),
            "bar": self.bar_text,
            "bar_kind": first.kind.value,
            "bar_limit": first.limit if first.kind is not BarKind.NONE else None,
            "bars": [{**bar.as_dict(), "passed": passed} for bar, passed in zip(self.real_bars, results, strict=True)],
            "result": self.result,
            "error": self.error,
            "skipped": dict(self.skipped),
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


def _cell(row: Row, peer: str | None) -> str:
    if peer is not None and peer not in row.peers:
        return "-"
    value = row.nova if peer is None else row.value(peer)
    if value is None:
        if peer is not None and peer in row.skipped:
            return "skipped"
        if row.error is not None:
            return "ERROR"
    return _number(value)


def table(rows: list[Row]) -> str:
    """A plain-text table (also valid Markdown)."""
    header = ["figure", "unit", "NOVA", "ssh -R", "Go", "NOVA/ssh", "NOVA/Go", "bar", "result"]
    lines = []
    for row in rows:
        ratios = [row.ratio_to(peer) for peer in PEERS]
        lines.append(
            [
                row.label,
                row.unit,
                _cell(row, None),
                *(_cell(row, peer) for peer in PEERS),
                *(f"{r:.2f}x" if r is not None else "-" for r in ratios),
                row.bar_text,
                row.result,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6}

    def fmt(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])
