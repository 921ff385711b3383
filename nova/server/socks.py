"""
The SOCKS5 entry (RFC 1928 CONNECT, RFC 1929 username/password).

The username is a selector (C{env=prod}, C{name:db-agent}, or empty for any
agent); the password is NOVAS's SOCKS password, when one is set.  Domain
names travel to the agent unresolved and are resolved inside the private
network.  Every outcome is a proper SOCKS reply; anything malformed is
refused and closed.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from enum import IntEnum
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.admin.audit import Audit
from nova.config import ConfigError
from nova.errors import open_failure
from nova.wire.hostname import host_problem
from nova.wire.text import untrusted

from .endpoint import DEFAULT_OPEN_TIMEOUT, TunnelEndpoint
from .listener import EntryConnection, StreamWatch, address
from .registry import Registry
from .routes import Selector, parse_selector
from .security import Limits, Throttle, source_key

VERSION = 5
AUTH_VERSION = 1
NO_AUTH, USER_PASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT = 0x01
IPV4, DOMAIN, IPV6 = 0x01, 0x03, 0x04
MAX_BUFFER = 1024


class Reply(IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


def reply_for(failure: Failure) -> Reply:
    """The SOCKS reply code for a failed tunnel connect (see L{nova.errors.OPEN_FAILURES})."""
    return Reply(open_failure(failure).socks_reply)


def reply(code: Reply) -> bytes:
    """A reply with an all-zero bound address (clients ignore it)."""
    return bytes([VERSION, code, 0, IPV4, 0, 0, 0, 0, 0, 0])


class Malformed(Exception):
    pass


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
    """One SOCKS5 client connection: negotiate, then relay."""

    log = Logger()

    def __init__(self, factory: SocksFactory) -> None:
        super().__init__()
        self.factory = factory
        self._buffer = bytearray()
        self._state = "greeting"
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
        if self._state == "auth-wait":
            self._close("the password check waited past the negotiation timeout (repeated wrong passwords)")
            return
        if self._state in ("greeting", "auth", "request"):
            self._refuse(f"no complete request within {self.factory.negotiation_timeout:g}s")

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._auth_wait is not None and self._auth_wait.active():
            self._auth_wait.cancel()
        self._auth_wait = None

    def dataReceived(self, data: bytes) -> None:
        if self._state == "relay":
            super().dataReceived(data)
            return
        if self._state == "closed":
            return
        self._buffer += data
        self._process()

    def _process(self) -> None:
        try:
            while self._state in ("greeting", "auth", "request") and self._step():
                pass
            if len(self._buffer) > MAX_BUFFER:
                raise Malformed("request too long")
        except Malformed as e:
            self._refuse(str(e))

    # Each step consumes one complete message, or returns False to wait.

    def _step(self) -> bool:
        b = self._buffer
        if self._state == "greeting":
            if len(b) < 2:
                return False
            if b[0] != VERSION:
                raise Malformed(f"not SOCKS5 (version byte {b[0]})")
            if len(b) < 2 + b[1]:
                return False
            methods = set(b[2 : 2 + b[1]])
            del b[: 2 + b[1]]
            if USER_PASS in methods:
                self._send(bytes([VERSION, USER_PASS]))
                self._state = "auth"
            elif NO_AUTH in methods and self.factory.password is None:
                self._send(bytes([VERSION, NO_AUTH]))
                self._state = "request"
            else:
                self._send(bytes([VERSION, NO_ACCEPTABLE]))
                self._close("no acceptable authentication method (a password is required)")
            return True
        if self._state == "auth":
            if len(b) < 2:
                return False
            if b[0] != AUTH_VERSION:
                raise Malformed(f"bad username/password version {b[0]}")
            ulen = b[1]
            if len(b) < 2 + ulen + 1:
                return False
            plen = b[2 + ulen]
            if len(b) < 3 + ulen + plen:
                return False
            username = bytes(b[2 : 2 + ulen])
            password = bytes(b[3 + ulen : 3 + ulen + plen])
            del b[: 3 + ulen + plen]
            self._authenticate(username, password)
            return True
        if self._state == "request":
            if len(b) < 5:
                return False
            if b[0] != VERSION or b[2] != 0:
                raise Malformed("malformed request header")
            command, atyp = b[1], b[3]
            if atyp == IPV4:
                size = 4 + 4 + 2
            elif atyp == IPV6:
                size = 4 + 16 + 2
            elif atyp == DOMAIN:
                size = 4 + 1 + b[4] + 2
            else:
                self._send(reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED))
                self._close(f"address type {atyp} not supported")
                return False
            if len(b) < size:
                return False
            raw = bytes(b[4 : size - 2])
            (port,) = struct.unpack(">H", b[size - 2 : size])
            del b[:size]
            if command != CONNECT:
                self._send(reply(Reply.COMMAND_NOT_SUPPORTED))
                self._close(f"command {command} not supported (only CONNECT)")
                return False
            if atyp == IPV4:
                host = str(ipaddress.IPv4Address(raw))
            elif atyp == IPV6:
                host = str(ipaddress.IPv6Address(raw))
            else:
                try:
                    host = raw[1:].decode("idna")
                except UnicodeError:
                    shown = untrusted(raw[1:].decode("utf-8", "backslashreplace"))
                    raise Malformed(f"domain name {shown} is not valid") from None
                if not host:
                    raise Malformed("empty domain name")
            if port == 0:
                raise Malformed("port 0")
            problem = host_problem(host)
            if problem is not None:
                # No agent could resolve it (or it would resolve to another
                # name than the one logged): answered now, nothing opened.
                self._send(reply(Reply.HOST_UNREACHABLE))
                self._close(f"refusing {untrusted(host)}:{port}: {problem} -> {Reply.HOST_UNREACHABLE.name}")
                return False
            self._connect(host, port)
            return False
        return False

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
        self._state = "auth-wait"
        self._auth_wait = self.factory.clock.callLater(delay, self._check_later, username, password)

    def _check_later(self, username: bytes, password: bytes) -> None:
        self._check(username, password)
        self._process()  # a request sent along with the password waited in the buffer

    def _check(self, username: bytes, password: bytes) -> None:
        gate = self.factory.gate
        assert gate is not None
        self._auth_wait = None
        if self._state == "closed":
            return
        source = self._source()
        if self._refused_blocked(gate, source):  # blocked while this attempt waited: not checked either
            return
        self._state = "auth"
        if not gate.check(source, password):
            self._send(bytes([AUTH_VERSION, 1]))
            self._close("wrong SOCKS password" + gate.failure_note(source))
            return
        self._accept(username)

    def _refused_blocked(self, gate: PasswordGate, source: str) -> bool:
        """Refuse, without checking its password, a source the throttle has blocked."""
        if not gate.blocked(source):
            return False
        self._send(bytes([AUTH_VERSION, 1]))
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
            self._send(bytes([AUTH_VERSION, 1]))
            self._close("the username is not a valid selector")
            return
        self._send(bytes([AUTH_VERSION, 0]))
        self._state = "request"

    def _connect(self, host: str, port: int) -> None:
        assert self.transport is not None
        self._stop_deadline()
        self._state = "connecting"
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
        self._state = "relay"
        early, self._buffer = bytes(self._buffer), bytearray()
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

    def _refuse(self, why: str) -> None:
        if self._state == "request":
            self._send(reply(Reply.GENERAL_FAILURE))
        self._close(f"malformed SOCKS5: {why}")

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _close_quietly(self, why: str | None) -> None:
        """Close, logging C{why} only if there is one (a blocked source's attempts are not all logged)."""
        if why is not None:
            self._close(why)
            return
        self._stop_deadline()
        self._state = "closed"
        if self.transport is not None:
            self.transport.loseConnection()

    def _close(self, why: str) -> None:
        self._stop_deadline()
        self._state = "closed"
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
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        audit: Audit | None = None,
        negotiation_timeout: float = 10.0,
        limits: Limits | None = None,
    ) -> None:
        self.gate = PasswordGate(password, Throttle(limits or Limits()), clock) if password is not None else None
        self.audit = audit or Audit()
        self.negotiation_timeout = negotiation_timeout
        self.registry = registry
        self.clock = clock
        self.password = password
        self.open_timeout = open_timeout

    def buildProtocol(self, addr: Any) -> SocksClient:
        return SocksClient(self)
