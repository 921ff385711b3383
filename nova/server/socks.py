"""
The SOCKS5 entry (RFC 1928 CONNECT, RFC 1929 username/password): the
Twisted adapter over the sans-I/O parser L{nova.wire.socks5}.

The username is a selector (C{env=prod}, C{name:db-agent}, or empty for any
agent); the password is NOVAS's SOCKS password, when one is set.  Domain
names travel to the agent unresolved and are resolved inside the private
network.  Every outcome is a proper SOCKS reply; anything malformed is
refused and closed.
"""

from __future__ import annotations

import hmac
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.admin.audit import Audit
from nova.config import ConfigError
from nova.errors import open_failure
from nova.rules.admission import Limits, Throttle, source_key
from nova.rules.routes import Selector, parse_selector
from nova.wire.socks5 import NEGOTIATING, Connect, Credentials, Event, Negotiation, Send, State, reply
from nova.wire.socks5 import Reply as Reply  # the reply codes, for reply_for and its callers
from nova.wire.text import untrusted

from .endpoint import TunnelEndpoint
from .listener import EntryConnection, StreamWatch, address
from .registry import Registry


def reply_for(failure: Failure) -> Reply:
    """The SOCKS reply code for a failed tunnel connect (see L{nova.errors.OPEN_FAILURES})."""
    return Reply(open_failure(failure).socks_reply)


class PasswordGate:
    """
    The SOCKS password, checked with the agent token's throttle rules: per
    source address, after a few failures each attempt waits longer, and
    after C{failures_before_block} the source is refused for a while
    without its passwords being checked at all.

    Every call into L{Throttle} is in this class: C{blocked}, C{delay},
    C{failed}, C{succeeded}.
    """

    # A blocked source's refusals are logged once, then once every this many.
    LOG_EVERY = 1000

    def __init__(self, password: bytes, throttle: Throttle, clock: IReactorTime) -> None:
        self._password = password
        self.throttle = throttle
        self.clock = clock
        self.refused_unchecked = 0
        self._refused_since_block: dict[str, int] = {}

    def blocked(self, source: str) -> bool:
        return self.throttle.blocked(source, self.clock.seconds())

    def delay(self, source: str) -> float:
        return self.throttle.delay(source, self.clock.seconds())

    def check(self, source: str, password: bytes) -> bool:
        """Is C{password} right?  Counts the failure or clears the record."""
        if hmac.compare_digest(password, self._password):
            self.throttle.succeeded(source)
            self._refused_since_block.pop(source, None)
            return True
        self.throttle.failed(source, self.clock.seconds())
        if self.blocked(source):
            self._refused_since_block.pop(source, None)  # a new block: its first refusal is logged
        return False

    def failure_note(self, source: str) -> str:
        if self.blocked(source):
            limits = self.throttle.limits
            return f"; {limits.failures_before_block} failures: blocked for {limits.block_seconds:g}s"
        return ""

    def refused_blocked(self, source: str) -> str | None:
        """Count a refusal of a blocked source; the line to log, if this one is logged."""
        self.refused_unchecked += 1
        n = self._refused_since_block.get(source, 0) + 1
        self._refused_since_block[source] = n
        if len(self._refused_since_block) > self.throttle.max_sources:
            self._refused_since_block.pop(next(iter(self._refused_since_block)))
        if n == 1 or n % self.LOG_EVERY == 0:
            return f"blocked after repeated wrong SOCKS passwords; refused without checking ({n} so far)"
        return None


class SocksClient(EntryConnection):
    """
    One SOCKS5 client connection: the Twisted adapter over
    L{nova.wire.socks5.Negotiation}.  It carries out the parser's events,
    checks the password (with the throttle's delays), enforces the
    negotiation timeout, opens the tunnel stream, then relays.
    """

    log = Logger()

    def __init__(self, factory: SocksFactory) -> None:
        super().__init__()
        self.factory = factory
        self._negotiation = Negotiation(password_required=factory.password is not None)
        self._selector = Selector()
        self._target = ""
        self._auth_wait: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # A client that never finishes negotiating is closed, not kept.
        self._deadline: IDelayedCall | None = self.factory.clock.callLater(
            self.factory.negotiation_timeout, self._too_slow
        )

    def _too_slow(self) -> None:
        self._deadline = None
        if self._auth_wait is not None:
            self._close("the password check waited past the negotiation timeout (repeated wrong passwords)")
            return
        if self._negotiation.state in NEGOTIATING:
            self._do(self._negotiation.refuse(f"no complete request within {self.factory.negotiation_timeout:g}s"))

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._auth_wait is not None and self._auth_wait.active():
            self._auth_wait.cancel()
        self._auth_wait = None

    def unspliced_data(self, data: bytes) -> None:
        # Until the stream is spliced: the SOCKS negotiation, then (early
        # data) what the user sends while the stream opens.
        if self._negotiation.state is State.DONE:
            super().unspliced_data(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        for event in self._negotiation.receive(data):
            self._do(event)

    def _do(self, event: Event) -> None:
        """Carry out one of the parser's events."""
        if isinstance(event, Send):
            self._send(event.data)
        elif isinstance(event, Credentials):
            self._authenticate(event.username, event.password)
        elif isinstance(event, Connect):
            self._connect(event.host, event.port)
        else:  # Refuse
            self._send(event.data)
            self._close(event.why)

    def _authenticate(self, username: bytes, password: bytes) -> None:
        gate = self.factory.gate
        if gate is None:
            self._accept(username)
            return
        source = self._source()
        if self._refused_blocked(gate, source):
            return
        delay = gate.delay(source)
        if not delay:
            self._check(username, password)
            return
        # Like the agent handshake: repeated failures slow this source down.
        self._auth_wait = self.factory.clock.callLater(delay, self._check, username, password)

    def _check(self, username: bytes, password: bytes) -> None:
        gate = self.factory.gate
        assert gate is not None
        self._auth_wait = None
        if self._negotiation.state is not State.AUTH_PENDING:
            return
        source = self._source()
        if self._refused_blocked(gate, source):  # blocked while this attempt waited: not checked either
            return
        if not gate.check(source, password):
            self._send(self._negotiation.reject())
            self._close("wrong SOCKS password" + gate.failure_note(source))
            return
        self._accept(username)

    def _refused_blocked(self, gate: PasswordGate, source: str) -> bool:
        """Refuse, without checking its password, a source the throttle has blocked."""
        if not gate.blocked(source):
            return False
        self._send(self._negotiation.reject())
        self._close_quietly(gate.refused_blocked(source))
        return True

    def _source(self) -> str:
        """The throttle's key for the client: its IPv4 address, or the /64 of its IPv6 one."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return source_key(str(getattr(peer, "host", "?")))

    def _accept(self, username: bytes) -> None:
        try:
            self._selector = parse_selector(username.decode("utf-8"))
        except (UnicodeDecodeError, ConfigError):
            self._send(self._negotiation.reject())
            self._close("the username is not a valid selector")
            return
        self._send(self._negotiation.accept())
        self._feed(b"")  # a request sent along with the password waits in the parser

    def _connect(self, host: str, port: int) -> None:
        assert self.transport is not None
        self._stop_deadline()
        self._target = untrusted(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        endpoint = TunnelEndpoint(
            self.factory.registry, self._selector, host, port, self.factory.clock, self.factory.open_timeout
        )
        watch = StreamWatch(
            self.factory.audit,
            self.factory.clock,
            f"socks {self._selector}",
            address(self.transport.getPeer()),
            self._target,
        )
        self.open_stream(endpoint, watch)

    def stream_ready(self, agent: str) -> None:
        assert self.watch is not None
        self.log.info(
            "socks: {client} connected to {target} through {agent} (selector {selector})",
            client=self.watch.requester,
            target=self._target,
            agent=agent,
            selector=str(self._selector),
        )
        self._send(reply(Reply.SUCCEEDED))
        early = self._negotiation.finish()
        if early:
            # Bytes the client sent before our reply go first, once spliced.
            self.factory.clock.callLater(0, self._forward_early, early)

    def _forward_early(self, early: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(early)

    def stream_failed(self, failure: Failure) -> None:
        code = reply_for(failure)
        self._send(reply(code))
        self._close(f"cannot reach {self._target} ({self._selector}): {failure.getErrorMessage()} -> {code.name}")

    def _send(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    def _close_quietly(self, why: str | None) -> None:
        """Close, logging C{why} only if there is one (a blocked source's attempts are not all logged)."""
        if why is not None:
            self._close(why)
            return
        self._stop_deadline()
        self._negotiation.close()
        if self.transport is not None:
            self.transport.loseConnection()

    def _close(self, why: str) -> None:
        self._stop_deadline()
        self._negotiation.close()
        self.log.warn(
            "socks: {client}: {why}; closing",
            client=address(self.transport.getPeer()) if self.transport is not None else "?",
            why=why,
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:  # noqa: B008
        self._stop_deadline()
        super().connectionLost(reason)


class SocksFactory(Factory):
    noisy = False

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        password: bytes | None,
        open_timeout: float,
        audit: Audit | None,
        negotiation_timeout: float,
        limits: Limits,
    ) -> None:
        self.gate = PasswordGate(password, Throttle(limits), clock) if password is not None else None
        self.audit = audit or Audit()
        self.negotiation_timeout = negotiation_timeout
        self.registry = registry
        self.clock = clock
        self.password = password
        self.open_timeout = open_timeout

    def buildProtocol(self, addr: Any) -> SocksClient:
        return SocksClient(self)
