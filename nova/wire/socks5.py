"""
The SOCKS5 negotiation (RFC 1928 CONNECT, RFC 1929 username/password) as a
parser that does no I/O: bytes in, events out, like L{nova.wire.codec}.

L{Negotiation.receive} takes the client's bytes in any split and returns
what to do: L{Send} bytes to the client, check L{Credentials}, L{Connect} to
a target, or L{Refuse} (send a last reply, then close).  The password check,
the throttle, the timeouts and the tunnel are the adapter's
(L{nova.server.socks}); this module knows only the messages.

Every message is short (the longest, RFC 1929's, is 513 bytes), so what
waits unconsumed is bounded by L{MAX_BUFFER}: bytes beyond it are refused
before they are kept.  Anything malformed ends the negotiation with one
L{Refuse} naming why; after it, or after L{Connect}, nothing more is parsed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from nova.errors import NovaError
from nova.wire.hostname import host_problem
from nova.wire.text import untrusted

VERSION = 5
AUTH_VERSION = 1
NO_AUTH, USER_PASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT = 0x01
IPV4, DOMAIN, IPV6 = 0x01, 0x03, 0x04

MAX_BUFFER = 1024
"""
Most bytes held that do not yet make a message (or, while the tunnel opens,
that the client sent ahead of our reply).  Twice the longest message: a
client that pipelines its greeting, credentials and request still fits.
"""

AUTH_OK = bytes([AUTH_VERSION, 0])
AUTH_FAILED = bytes([AUTH_VERSION, 1])


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


def reply(code: Reply) -> bytes:
    """A reply with an all-zero bound address (clients ignore it)."""
    return bytes([VERSION, code, 0, IPV4, 0, 0, 0, 0, 0, 0])


class Malformed(NovaError):
    """The client broke the protocol; the message says how, in one line."""


# Events.


@dataclass(frozen=True)
class Send:
    """Write C{data} to the client; the negotiation goes on."""

    data: bytes


@dataclass(frozen=True)
class Credentials:
    """
    The client's username and password.  Nothing more is parsed until the
    adapter answers with L{Negotiation.accept} or L{Negotiation.reject}.
    """

    username: bytes
    password: bytes


@dataclass(frozen=True)
class Connect:
    """A well-formed CONNECT to C{host:port}; bytes after it are kept for L{Negotiation.finish}."""

    host: str
    port: int


@dataclass(frozen=True)
class Refuse:
    """Write C{data} (it may be empty), then close, logging C{why}."""

    why: str
    data: bytes = b""


Event = Send | Credentials | Connect | Refuse


class State(Enum):
    GREETING = "greeting"
    AUTH = "auth"
    AUTH_PENDING = "auth-pending"  # credentials handed out, no answer yet
    REQUEST = "request"
    CONNECTING = "connecting"  # CONNECT handed out, the tunnel not yet open
    DONE = "done"  # negotiated: the connection relays
    CLOSED = "closed"


NEGOTIATING = frozenset({State.GREETING, State.AUTH, State.REQUEST})
"""States in which the client owes us a message."""


class Negotiation:
    """One client's negotiation, from its greeting to a CONNECT (or a refusal)."""

    def __init__(self, password_required: bool) -> None:
        self.password_required = password_required
        self.state = State.GREETING
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive(self, data: bytes) -> list[Event]:
        """The client sent C{data}: what to do, in order."""
        if self.state in (State.DONE, State.CLOSED):
            return []
        events: list[Event] = []
        try:
            if self.state not in NEGOTIATING:
                # Waiting on the adapter: bytes are only kept, within the bound.
                self._keep(self._buffer, data)
                return events
            pending = self._buffer + data if self._buffer else bytearray(data)
            while self.state in NEGOTIATING:
                event = self._step(pending)
                if event is None:
                    break
                events.append(event)
                if isinstance(event, Refuse):
                    return events
            self._buffer = bytearray()
            self._keep(self._buffer, pending)
        except Malformed as e:
            events.append(self.refuse(str(e)))
        return events

    def _keep(self, buffer: bytearray, data: bytes | bytearray) -> None:
        if len(buffer) + len(data) > MAX_BUFFER:
            raise Malformed("request too long")
        buffer += data

    def refuse(self, why: str) -> Refuse:
        """End the negotiation as malformed (or too slow): a failure reply if the client waits for one."""
        data = reply(Reply.GENERAL_FAILURE) if self.state is State.REQUEST else b""
        self.close()
        return Refuse(f"malformed SOCKS5: {why}", data)

    def close(self) -> None:
        """Parse nothing more (the adapter closes the connection)."""
        self.state = State.CLOSED
        self._buffer = bytearray()

    def accept(self) -> bytes:
        """The credentials are good: the reply to send; call L{receive} again for what waits."""
        assert self.state is State.AUTH_PENDING
        self.state = State.REQUEST
        return AUTH_OK

    def reject(self) -> bytes:
        """The credentials are refused: the reply to send before closing."""
        self.close()
        return AUTH_FAILED

    def finish(self) -> bytes:
        """The tunnel is open: the bytes the client sent ahead of our reply, to relay first."""
        early = bytes(self._buffer)
        self._buffer = bytearray()
        self.state = State.DONE
        return early

    # Each step consumes one complete message from the front of C{b} and
    # returns what to do, or None to wait for more bytes.

    def _step(self, b: bytearray) -> Event | None:
        if self.state is State.GREETING:
            return self._greeting(b)
        if self.state is State.AUTH:
            return self._auth(b)
        return self._request(b)

    def _greeting(self, b: bytearray) -> Event | None:
        if len(b) < 2:
            return None
        if b[0] != VERSION:
            raise Malformed(f"not SOCKS5 (version byte {b[0]})")
        if len(b) < 2 + b[1]:
            return None
        methods = set(b[2 : 2 + b[1]])
        del b[: 2 + b[1]]
        if USER_PASS in methods:
            self.state = State.AUTH
            return Send(bytes([VERSION, USER_PASS]))
        if NO_AUTH in methods and not self.password_required:
            self.state = State.REQUEST
            return Send(bytes([VERSION, NO_AUTH]))
        self.close()
        return Refuse("no acceptable authentication method (a password is required)", bytes([VERSION, NO_ACCEPTABLE]))

    def _auth(self, b: bytearray) -> Event | None:
        if len(b) < 2:
            return None
        if b[0] != AUTH_VERSION:
            raise Malformed(f"bad username/password version {b[0]}")
        ulen = b[1]
        if len(b) < 2 + ulen + 1:
            return None
        plen = b[2 + ulen]
        if len(b) < 3 + ulen + plen:
            return None
        username = bytes(b[2 : 2 + ulen])
        password = bytes(b[3 + ulen : 3 + ulen + plen])
        del b[: 3 + ulen + plen]
        self.state = State.AUTH_PENDING
        return Credentials(username, password)

    def _request(self, b: bytearray) -> Event | None:
        if len(b) < 5:
            return None
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
            self.close()
            return Refuse(f"address type {atyp} not supported", reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED))
        if len(b) < size:
            return None
        raw = bytes(b[4 : size - 2])
        (port,) = struct.unpack(">H", b[size - 2 : size])
        del b[:size]
        if command != CONNECT:
            self.close()
            return Refuse(f"command {command} not supported (only CONNECT)", reply(Reply.COMMAND_NOT_SUPPORTED))
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
            # No agent could resolve it (or it would resolve to another name
            # than the one logged): answered now, nothing opened.
            self.close()
            why = f"refusing {untrusted(host)}:{port}: {problem} -> {Reply.HOST_UNREACHABLE.name}"
            return Refuse(why, reply(Reply.HOST_UNREACHABLE))
        self.state = State.CONNECTING
        return Connect(host, port)
