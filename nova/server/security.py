"""
What stands between the agent port and a hostile network: the set of valid
tokens (several at once, for rotation), per-source throttling of failed
handshakes, and limits.  Pure: time comes from the caller.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nova.wire.frames import Auth
from nova.wire.handshake import verify_auth


def token_id(token: bytes) -> str:
    """A stable, non-secret name for a token (its hash's first 12 hex digits)."""
    return hashlib.sha256(b"nova-token-id\x00" + token).hexdigest()[:12]


class TokenSet:
    """The tokens agents may prove; any one of them will do."""

    def __init__(self, tokens: Iterable[bytes]) -> None:
        self._tokens: list[tuple[str, bytes]] = []
        self.replace(tokens)

    def replace(self, tokens: Iterable[bytes]) -> None:
        new = [(token_id(t), t) for t in dict.fromkeys(tokens)]
        if not new:
            raise ValueError("at least one agent token is needed")
        self._tokens = new

    @property
    def ids(self) -> set[str]:
        return {i for i, _ in self._tokens}

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, nonce: bytes, binding: bytes, auth: Auth) -> str | None:
        """The id of the token the AUTH frame proves, or None."""
        found = None
        for ident, token in self._tokens:
            # Check every token, so timing does not tell which one matched.
            if verify_auth(token, nonce, binding, auth) and found is None:
                found = ident
        return found


def parse_tokens(value: str) -> list[bytes]:
    return [t.strip().encode("utf-8") for t in value.split(",") if t.strip()]


def read_token_file(path: Path) -> list[bytes]:
    """One token per line; blank lines and lines starting with # are ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip().encode("utf-8") for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class Limits:
    max_pending_handshakes: int = 1000
    max_tunnels: int = 10_000
    max_streams_per_tunnel: int = 4096
    failures_before_delay: int = 5
    failures_before_block: int = 20
    failure_window: float = 600.0
    block_seconds: float = 300.0
    max_delay: float = 30.0


class Throttle:
    """
    Failed handshakes per source address: after C{failures_before_delay}
    within the window, each new handshake from that source waits, twice as
    long each time (up to C{max_delay}); after C{failures_before_block}, the
    source is refused outright for C{block_seconds}.  At most C{max_sources}
    addresses are remembered (least recently failed forgotten first), so a
    flood from many addresses cannot grow memory without bound.
    """

    def __init__(self, limits: Limits, max_sources: int = 100_000) -> None:
        self.limits = limits
        self.max_sources = max_sources
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def _recent(self, source: str, now: float) -> deque[float]:
        times = self._failures.get(source)
        if times is None:
            return deque()
        while times and now - times[0] > self.limits.failure_window:
            times.popleft()
        return times

    @property
    def enabled(self) -> bool:
        return self.limits.failures_before_block > 0

    def failed(self, source: str, now: float) -> None:
        if not self.enabled:
            return
        times = self._recent(source, now)
        times.append(now)
        self._failures[source] = times
        self._failures.move_to_end(source)
        while len(self._failures) > self.max_sources:
            old, _ = self._failures.popitem(last=False)
            self._blocked_until.pop(old, None)
        if len(times) >= self.limits.failures_before_block:
            self._blocked_until[source] = now + self.limits.block_seconds

    def succeeded(self, source: str) -> None:
        self._failures.pop(source, None)
        self._blocked_until.pop(source, None)

    def blocked(self, source: str, now: float) -> bool:
        until = self._blocked_until.get(source)
        if until is None:
            return False
        if now >= until:
            del self._blocked_until[source]
            self._failures.pop(source, None)
            return False
        return True

    def delay(self, source: str, now: float) -> float:
        """How long this source's next handshake should wait."""
        if not self.enabled:
            return 0.0
        n = len(self._recent(source, now))
        excess = n - self.limits.failures_before_delay
        if excess < 0:
            return 0.0
        return float(min(self.limits.max_delay, 2.0**excess))

    def __len__(self) -> int:
        return len(self._failures)
