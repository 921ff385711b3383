"""
Refusals of connections that never registered, counted per source so that a
flood cannot fill the log or the audit store.

Anyone can connect to the agent port and close at once, or send a wrong
token, thousands of times a second.  Each such refusal is worth knowing
about, but not thousands of times: the first refusal from a source in an
interval is reported in full (with the claimed name and reason, so a
misconfigured agent is easy to diagnose), and the rest are counted and
reported as one summary when the interval ends.  L{RefusalLog} is the pure
bookkeeping (time comes from the caller); L{Refusals} turns it into log
lines, audit records and metrics on a reactor's clock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nova.wire.text import untrusted

if TYPE_CHECKING:
    from nova.admin.audit import Audit

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


class Refusals:
    """
    What NOVAS does with a refused connection: count it always (metrics),
    log and audit the first from its source in an interval, and summarise
    the rest once the interval ends (and at shutdown, so nothing is lost).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, audit: Audit, interval: float = DEFAULT_INTERVAL) -> None:
        self.clock = clock
        self.audit = audit
        self.book = RefusalLog(interval)
        self._summary_call: IDelayedCall | None = None

    @property
    def interval(self) -> float:
        return self.book.interval

    def refused(self, address: str, source: str, code: str, why: str, claimed: str = "", token: str = "") -> None:
        """A connection from C{address} (throttle key C{source}) that did not register was refused."""
        self.audit.refusal_counted(code)
        # A client that proved a token is counted apart from the anonymous
        # ones from its address: its refusal (a scope, a name in use) is a
        # configuration problem an operator needs to see, not noise.
        key = f"{source} (token {token})" if token else source
        if self.book.refused(key, code, self.clock.seconds()):
            self.log.warn(
                "refused {peer}{claimed_note}: {code}: {reason}",
                peer=address,
                claimed_note=f" (claiming to be {untrusted(claimed, 64)!r})" if claimed else "",
                code=code,
                reason=why,
                token_id=token,
            )
            self.audit.auth_failed(address, claimed, code, why, token_id=token)
        elif self._summary_call is None:
            self._summary_call = self.clock.callLater(self.interval, self.summarise)

    def summarise(self, everything: bool = False) -> None:
        """Log and audit one line per source for the refusals counted, not reported."""
        self._summary_call = None
        now = self.clock.seconds()
        for summary in self.book.due(now + (self.interval if everything else 0.0)):
            self.log.warn(
                "refused {count} more connection(s) from {source} that did not register"
                " in the last {seconds:.0f}s: {codes}",
                count=summary.total,
                source=summary.source,
                seconds=now - summary.since,
                codes=summary.codes(),
            )
            code = summary.counts.most_common(1)[0][0]
            self.audit.auth_failed(summary.source, "", code, summary.codes(), count=summary.total)
        if self.book.pending() and not everything:
            self._summary_call = self.clock.callLater(self.interval, self.summarise)

    def stop(self) -> None:
        """Report what is still counted and stop the summary timer."""
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self.summarise(everything=True)
