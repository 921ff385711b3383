"""
Refusals of connections that never registered, counted per source so that a
flood cannot fill the log or the audit store.

Anyone can connect to the agent port and close at once, or send a wrong
token, thousands of times a second.  Each such refusal is worth knowing
about, but not thousands of times: the first refusal from a source in an
interval is reported in full (with the claimed name and reason, so a
misconfigured agent is easy to diagnose), and the rest are counted and
reported as one summary when the interval ends.  Pure: time comes from the
caller; the server turns reports into log lines and audit records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Sources tracked at once.  A flood from more sources than this (a botnet,
# or an IPv6 range) is counted under one bucket, so memory stays bounded.
MAX_SOURCES = 4096
OTHER_SOURCES = "(other sources)"
DEFAULT_INTERVAL = 60.0


@dataclass
class Summary:
    """Refusals from one source that were counted, not reported one by one."""

    source: str
    counts: Counter[str]
    since: float
    until: float

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def codes(self) -> str:
        return ", ".join(f"{code} x{n}" for code, n in self.counts.most_common())


@dataclass
class _Window:
    start: float
    counts: Counter[str] = field(default_factory=Counter)


class RefusalLog:
    """
    Invariants: at most C{max_sources} + 1 windows are held; every refusal
    is either reported at once (L{refused} returns True) or counted in
    exactly one summary that L{due} returns once its window has ended.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, max_sources: int = MAX_SOURCES) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._windows: dict[str, _Window] = {}
        self._ready: list[Summary] = []

    def __len__(self) -> int:
        return len(self._windows)

    def refused(self, source: str, code: str, now: float) -> bool:
        """
        Note one refusal.  True: report this one now (the first from
        C{source} in its interval); False: it was counted for a summary.
        """
        window = self._windows.get(source)
        if window is not None and now - window.start >= self.interval:
            self._close(source, window, now)
            window = None
        if window is None:
            if len(self._windows) >= self.max_sources and source != OTHER_SOURCES:
                return self.refused(OTHER_SOURCES, code, now)
            self._windows[source] = _Window(now)
            return True
        window.counts[code] += 1
        return False

    def pending(self) -> bool:
        """Whether any refusal is waiting to be summarised."""
        return bool(self._ready) or any(w.counts for w in self._windows.values())

    def due(self, now: float) -> list[Summary]:
        """Summaries of every window that has ended by C{now}; ended windows are forgotten."""
        for source, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._close(source, window, now)
        ready, self._ready = self._ready, []
        return ready

    def _close(self, source: str, window: _Window, now: float) -> None:
        del self._windows[source]
        if window.counts:
            self._ready.append(Summary(source, window.counts, window.start, now))
