"""
What stands between the agent port and a hostile network: the set of valid
tokens (several at once, for rotation), per-source throttling of failed
handshakes, and limits.  Pure: time comes from the caller.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import re
import shlex
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nova.errors import NovaError
from nova.wire.frames import Auth
from nova.wire.handshake import verify_auth


def token_id(token: bytes) -> str:
    """A stable, non-secret name for a token (its hash's first 12 hex digits)."""
    return hashlib.sha256(b"nova-token-id\x00" + token).hexdigest()[:12]


# A token must be long enough that guessing it is hopeless even for someone
# who spreads guesses over many addresses: the throttle slows guessing from
# one address, it cannot make a short secret safe.  The seed's token is a
# UUID (36 characters); 16 random characters are about 95 bits.
MIN_TOKEN_LENGTH = 16

_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")


class ScopeError(NovaError, ValueError):
    """A token file line whose scope words cannot be understood."""


@dataclass(frozen=True)
class TokenScope:
    """
    What the holder of a token may register: a name pattern (a shell glob,
    case-sensitive) and the tags it may claim, each with the values allowed
    (C{"*"}: any value).  C{None} means no restriction, as for tokens given
    without scope words.
    """

    name: str | None = None
    tags: tuple[tuple[str, frozenset[str]], ...] | None = None

    @property
    def unrestricted(self) -> bool:
        return self.name is None and self.tags is None

    def problem(self, name: str, tags: Iterable[tuple[str, str]]) -> str | None:
        """Why this scope does not admit an agent C{name} with C{tags}, or None."""
        if self.name is not None and not fnmatch.fnmatchcase(name, self.name):
            return f"this token may not register the name {name!r} (its scope allows name={self.name})"
        if self.tags is not None:
            allowed = dict(self.tags)
            for key, value in tags:
                values = allowed.get(key)
                if values is None:
                    return f"this token may not claim the tag {key!r} (its scope allows {self.describe_tags()})"
                if "*" not in values and value not in values:
                    return f"this token may not claim {key}={value} (its scope allows {self.describe_tags()})"
        return None

    def describe_tags(self) -> str:
        if not self.tags:
            return "no tags"
        return "tags=" + ";".join(f"{k}={v}" for k, values in self.tags for v in sorted(values))

    def describe(self) -> str:
        words = []
        if self.name is not None:
            words.append(f"name={self.name}")
        if self.tags is not None:
            words.append(self.describe_tags())
        return " ".join(words) or "any name and tags"


def parse_scope(words: Iterable[str]) -> tuple[str | None, TokenScope]:
    """
    The C{id=}, C{name=} and C{tags=} words that may follow a token in the
    token file.  Returns the label (or None) and the scope.
    """
    label: str | None = None
    name: str | None = None
    tags: dict[str, set[str]] | None = None
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ScopeError(f"{word!r} is not id=LABEL, name=GLOB or tags=KEY=VALUE;...")
        if key == "id":
            if label is not None or not _LABEL.fullmatch(value):
                raise ScopeError("id= is given twice or is not 1-63 characters of A-Z a-z 0-9 . _ -")
            label = value
        elif key == "name":
            if name is not None or not value:
                raise ScopeError("name= is given twice or is empty")
            name = value
        elif key == "tags":
            if tags is not None:
                raise ScopeError("tags= is given twice")
            tags = {}
            for pair in filter(None, value.split(";")):
                k, sep2, v = pair.partition("=")
                if not sep2 or not k or not v:
                    raise ScopeError(f"tags=: {pair!r} is not KEY=VALUE (VALUE may be *)")
                tags.setdefault(k, set()).add(v)
        else:
            raise ScopeError(f"unknown scope word {key}= (known: id=, name=, tags=)")
    frozen_tags = None if tags is None else tuple(sorted((k, frozenset(v)) for k, v in tags.items()))
    return label, TokenScope(name, frozen_tags)


@dataclass(frozen=True)
class AgentToken:
    """
    One token agents may prove: the secret, a stable hash-derived key, the
    label the API and audit show (C{id=}, else the key) and its scope.
    """

    secret: bytes = field(repr=False)
    label: str = ""
    scope: TokenScope = field(default_factory=TokenScope)

    @property
    def key(self) -> str:
        return token_id(self.secret)

    @property
    def id(self) -> str:
        return self.label or self.key


class TokenSet:
    """The tokens agents may prove; any one of them will do."""

    def __init__(self, tokens: Iterable[bytes | AgentToken]) -> None:
        self._tokens: list[AgentToken] = []
        self.replace(tokens)

    def replace(self, tokens: Iterable[bytes | AgentToken]) -> None:
        new: dict[bytes, AgentToken] = {}
        for t in tokens:
            token = t if isinstance(t, AgentToken) else AgentToken(t)
            new.setdefault(token.secret, token)
        if not new:
            raise ValueError("at least one agent token is needed")
        self._tokens = list(new.values())

    @property
    def ids(self) -> set[str]:
        """The hash-derived keys of the tokens (what a tunnel remembers)."""
        return {t.key for t in self._tokens}

    def get(self, key: str) -> AgentToken | None:
        """The token whose hash-derived key is C{key}."""
        for t in self._tokens:
            if t.key == key:
                return t
        return None

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, nonce: bytes, binding: bytes, auth: Auth) -> AgentToken | None:
        """The token the AUTH frame proves, or None."""
        found = None
        for token in self._tokens:
            # Check every token, so timing does not tell which one matched.
            if verify_auth(token.secret, nonce, binding, auth) and found is None:
                found = token
        return found


def parse_tokens(value: str) -> list[bytes]:
    return [t.strip().encode("utf-8") for t in value.split(",") if t.strip()]


def parse_token_file(text: str) -> list[AgentToken]:
    """
    The text of a token file (the caller reads it): one token per line, optionally followed by scope words:
    C{TOKEN [id=LABEL] [name=GLOB] [tags=KEY=VALUE;KEY=VALUE]}.  Blank lines
    and lines starting with # are ignored.  A line that cannot be read
    raises L{ScopeError} naming its line number (never the token).
    """
    tokens: list[AgentToken] = []
    labels: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        secret, _, rest = line.strip().partition(" ")
        try:
            label, scope = parse_scope(shlex.split(rest))
        except (ScopeError, ValueError) as e:
            raise ScopeError(f"line {number}: {e}") from None
        if label is not None:
            if label in labels:
                raise ScopeError(f"line {number}: id={label} is also used on line {labels[label]}")
            labels[label] = number
        tokens.append(AgentToken(secret.encode("utf-8"), label or "", scope))
    return tokens


def source_key(host: str) -> str:
    """
    The unit the throttle counts failures by: an IPv4 address, or the /64
    an IPv6 address belongs to (one host usually holds a whole /64, so
    counting single IPv6 addresses would give it 2**64 budgets).  An
    IPv4-mapped IPv6 address counts as its IPv4 address.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a UNIX socket, a test transport: count it as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@dataclass(frozen=True)
class Limits:
    max_pending_handshakes: int = 1000
    # Unfinished handshakes from one source (an IPv4 address, an IPv6 /64):
    # one host stalling TLS handshakes must not take every pending slot.
    # Behind a load balancer that hides client addresses every agent shares
    # a few sources, so this is well above what a reconnect storm keeps in
    # flight at once (a handshake takes milliseconds).
    max_pending_per_source: int = 128
    max_tunnels: int = 10_000
    max_streams_per_tunnel: int = 4096
    failures_before_delay: int = 5
    failures_before_block: int = 20
    failure_window: float = 600.0
    block_seconds: float = 300.0
    # The delay is spent before HELLO, so it must leave an agent its own
    # handshake timeout (NOVAC's is 10 s by default) to finish: a longer
    # delay would lock out every agent sharing the address, not slow a
    # guesser (guesses in parallel are bounded by the block, not the delay).
    max_delay: float = 4.0


class Throttle:
    """
    Failed handshakes per source (see L{source_key}): after C{failures_before_delay}
    within the window, each new handshake from that source waits, twice as
    long each time (up to C{max_delay}); after C{failures_before_block}, the
    source is refused outright for C{block_seconds}: its connections are
    dropped at once and any AUTH it still sends is refused without checking
    its MAC, so guesses sent in parallel gain nothing.  At most C{max_sources}
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

    def failed(self, source: str, now: float) -> bool:
        """Count a failure; True if it is the one that blocks the source."""
        if not self.enabled:
            return False
        times = self._recent(source, now)
        times.append(now)
        self._failures[source] = times
        self._failures.move_to_end(source)
        while len(self._failures) > self.max_sources:
            old, _ = self._failures.popitem(last=False)
            self._blocked_until.pop(old, None)
        if len(times) >= self.limits.failures_before_block and source not in self._blocked_until:
            self._blocked_until[source] = now + self.limits.block_seconds
            return True
        return False

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
