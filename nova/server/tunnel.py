"""
The server's end of a tunnel: the handshake's verifying half, registration,
and opening streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nova.admin.audit import Audit
from nova.mux.core import OpenRefused, Role
from nova.mux.stream import StreamTransport
from nova.mux.tunnel import Timing, TunnelProtocol
from nova.tls import channel_binding, client_identity, tls_version
from nova.wire.errors import ErrorCode, OpenFailReason, ProtocolError
from nova.wire.frames import VERSION, Auth, Frame, Hello, Reject, Welcome
from nova.wire.handshake import name_problem, new_nonce, tags_problem, window_problem

from .registry import Registry
from .security import Limits, Throttle, TokenSet

META_PREFIX = "nova/"


class OpenFailed(Exception):
    """The agent could not open the stream."""

    def __init__(self, reason: OpenFailReason, message: str, agent: str = "") -> None:
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason
        self.message = message
        self.agent = agent


class TunnelGone(Exception):
    """The tunnel closed before the stream was opened."""


class TunnelBusy(TunnelGone):
    """The tunnel has as many streams as the server allows it."""


@dataclass
class ServerContext:
    token: bytes | None
    tls: bool
    clock: IReactorTime
    registry: Registry = field(default_factory=Registry)
    window: int = 262_144
    timing: Timing = field(default_factory=Timing)
    server_id: str = "novas"
    audit: Audit = field(default_factory=Audit)
    tokens: TokenSet | None = None
    limits: Limits = field(default_factory=Limits)
    throttle: Throttle | None = None
    client_ca: bool = False  # agents present certificates whose names bind their agent names
    pending: int = 0

    def __post_init__(self) -> None:
        if self.tokens is None:
            if self.token is None:
                raise ValueError("a token or a token set is needed")
            self.tokens = TokenSet([self.token])
        self.token = None  # only the token set keeps it
        if self.throttle is None:
            self.throttle = Throttle(self.limits)


class ServerTunnel(TunnelProtocol):
    role = Role.SERVER

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.clock, context.window, context.timing)
        self.context = context
        self.name = ""
        self.tags: dict[str, str] = {}
        self.meta: dict[str, str] = {}  # reserved "nova/" tags: agent version, ...
        self.registered = False
        self.connected_at = 0.0
        self.registered_at = 0.0
        self.address = ""
        self.tls_version: str | None = None
        self.close_reason = ""
        self.token_id = ""
        self.source = ""
        self.client_subject: str | None = None
        self._pending = False
        self._rejected = False
        self._nonce = b""
        self._opening: dict[int, tuple[Deferred[StreamTransport], str, int]] = {}

    def __repr__(self) -> str:
        return f"<ServerTunnel {self.name or '?'}>"

    @property
    def peer_label(self) -> str:
        """The agent's name once it has registered, its address before."""
        return self.name if self.registered else super().peer_label

    # Handshake.

    def handshake_started(self) -> None:
        c = self.context
        assert c.throttle is not None and self.transport is not None
        now = self.connected_at = c.clock.seconds()
        self.address = TunnelProtocol.peer_label.fget(self)  # type: ignore[attr-defined]
        self.source = str(getattr(self.transport.getPeer(), "host", self.address))
        if c.throttle.blocked(self.source, now):
            self._refuse("BLOCKED", "too many failed handshakes from this address; blocked for a while")
            return
        if c.pending >= c.limits.max_pending_handshakes:
            self._refuse("OVERLOADED", f"{c.pending} handshakes already pending")
            return
        c.pending += 1
        self._pending = True
        delay = c.throttle.delay(self.source, now)
        if delay:
            self.log.info(
                "delaying the handshake of {peer} by {delay:g}s after repeated failures",
                peer=self.address,
                delay=delay,
            )
            c.clock.callLater(delay, self._hello)
        else:
            self._hello()

    def _hello(self) -> None:
        if self.closed:
            return
        self._nonce = new_nonce()
        self.send_frame(Hello(self._nonce))

    def _refuse(self, code: str, why: str) -> None:
        """Close a connection before the handshake, with one log line."""
        self.log.warn("refusing the connection from {peer}: {why}", peer=self.address, why=why, code=code)
        self.context.audit.auth_failed(self.address, "", code, why)
        self.abort(why, quiet=True)

    def _not_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.context.pending -= 1

    def handshake_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Auth):
            raise ProtocolError(f"expected AUTH, got {frame.TYPE.name}")
        binding = channel_binding(self.transport)
        if self.context.tls and binding is None:
            self._reject(ErrorCode.INTERNAL_ERROR, "TLS is required but the connection is not TLS", frame.name)
            return
        c = self.context
        assert c.tokens is not None and c.throttle is not None
        if not self._nonce:
            raise ProtocolError("AUTH before HELLO")
        token = c.tokens.match(self._nonce, binding or b"", frame)
        if token is None:
            c.throttle.failed(self.source, c.clock.seconds())
            self._reject(ErrorCode.AUTH_FAILED, "the token proof did not verify", frame.name)
            return
        problem = name_problem(frame.name) or tags_problem(frame.tags) or window_problem(frame.initial_window)
        if problem is not None:
            self._reject(ErrorCode.BAD_NAME, problem, frame.name)
            return
        if c.client_ca:
            self.client_subject, names = client_identity(self.transport)
            if frame.name not in names:
                c.throttle.failed(self.source, c.clock.seconds())
                self._reject(ErrorCode.BAD_NAME, "the client certificate does not name this agent", frame.name)
                return
        if c.registry.get(frame.name) is None and len(c.registry) >= c.limits.max_tunnels:
            self._reject(ErrorCode.OVERLOADED, f"the server already carries {len(c.registry)} tunnels", frame.name)
            return
        c.throttle.succeeded(self.source)
        self._not_pending()
        self.token_id = token
        self.name = frame.name
        self.tags = {k: v for k, v in frame.tags if not k.startswith(META_PREFIX)}
        self.meta = {k[len(META_PREFIX) :]: v for k, v in frame.tags if k.startswith(META_PREFIX)}
        self.tls_version = tls_version(self.transport)
        self.registered_at = self.context.clock.seconds()
        self.start_streams(frame.initial_window)
        self.send_frame(Welcome(self.local_window, int(self.context.timing.keepalive * 1000), self.context.server_id))
        self.registered = True
        self.context.registry.register(self)
        self.log.info(
            "agent {agent} registered from {peer} with tags {tags}",
            agent=self.name,
            peer=self.address,
            tags=";".join(f"{k}={v}" for k, v in self.tags.items()) or "(none)",
            agent_version=self.meta.get("version", ""),
        )
        self.context.audit.registered(
            self.name,
            address=self.address,
            tags=self.tags,
            agent_version=self.meta.get("version", ""),
            tls=self.tls_version or "off",
        )

    def revoke(self, why: str) -> None:
        """The token this tunnel proved is no longer valid: close it."""
        self.close_reason = why
        if self.mux is not None:
            self.mux.goaway(ErrorCode.AUTH_FAILED, why)
            self.flush()
        self.close()

    def _reject(self, code: ErrorCode, message: str, claimed_name: str) -> None:
        self.log.warn(
            "rejected agent {agent!r} from {peer}: {code}: {message}",
            agent=claimed_name[:64],
            peer=self.address,
            code=code.name,
            message=message,
        )
        self.context.audit.auth_failed(self.address, claimed_name, code.name, message)
        self._rejected = True
        self.send_frame(Reject(code, message))
        self.close()

    def protocol_error(self, error: ProtocolError) -> None:
        if self.mux is None:
            self._reject(error.code, error.message, self.name)
        else:
            super().protocol_error(error)

    def pending_streams(self) -> int:
        return len(self._opening)

    def handshake_timed_out(self) -> None:
        super().handshake_timed_out()
        self._rejected = True
        self.context.audit.auth_failed(self.address, "", "HANDSHAKE_TIMEOUT", "the handshake took too long")
        self.send_frame(Reject(ErrorCode.HANDSHAKE_TIMEOUT, "the handshake took too long"))

    # Streams.

    def open_stream(self, host: str, port: int) -> Deferred[StreamTransport]:
        """
        Ask the agent to connect to C{host:port}.  Fires with the stream's
        transport once the agent has connected, or fails with L{OpenFailed}
        or L{TunnelGone}.  Cancelling the Deferred resets the stream.
        """
        if self.mux is None or self.closed:
            raise TunnelGone("tunnel is not open")
        if self.open_streams() >= self.context.limits.max_streams_per_tunnel:
            raise TunnelBusy(f"agent {self.name} has {self.open_streams()} streams, the most allowed")
        sid = self.mux.open(host, port)

        def cancel(d: Deferred[StreamTransport]) -> None:
            if self._opening.pop(sid, None) is not None and self.mux is not None:
                self.mux.reset(sid, ErrorCode.CANCEL)
                self.flush()

        d: Deferred[StreamTransport] = Deferred(cancel)
        self._opening[sid] = (d, host, port)
        self.flush()
        return d

    def stream_opened(self, stream_id: int) -> None:
        entry = self._opening.pop(stream_id, None)
        if entry is None:
            return
        d, host, port = entry
        d.callback(self.add_stream(stream_id, host, port))

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None:
        entry = self._opening.pop(stream_id, None)
        if entry is not None:
            entry[0].errback(OpenFailed(event.reason, event.message, self.name))

    # Life cycle.

    def replaced(self) -> None:
        self.close_reason = "replaced by a newer registration under the same name"
        if self.mux is not None:
            self.mux.goaway(ErrorCode.REPLACED, "a newer tunnel registered under this name")
            self.flush()
        self.registered = False
        self.close()

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.log.info(
            "agent {agent} is going away ({code}: {message}); no new streams go to it",
            agent=self.name,
            code=code.name,
            message=message,
        )
        self.draining = True

    def tunnel_closed(self, reason: Failure) -> None:
        if self._pending and not self._rejected:
            # Closed mid-handshake without a REJECT: TLS failed, or the peer left.
            self.log.warn(
                "connection from {peer} closed before registering: {reason}",
                peer=self.address,
                reason=reason.getErrorMessage(),
            )
        self._not_pending()
        opening, self._opening = self._opening, {}
        for d, _host, _port in opening.values():
            if not d.called:
                d.errback(TunnelGone(f"tunnel to {self.name} closed"))
        if self.registered:
            self.registered = False
            self.context.registry.unregister(self)
            why = self.close_reason or reason.getErrorMessage()
            self.log.info("agent {agent} disconnected: {reason}", agent=self.name, reason=why)
            self.context.audit.unregistered(self.name, why, self.context.clock.seconds() - self.registered_at)

    def pong_received(self, opaque: bytes) -> None:
        super().pong_received(opaque)
        if self.rtt is not None and self.registered:
            self.context.audit.rtt(self.name, self.rtt)

    def abort(self, why: str, quiet: bool = False) -> None:
        self.close_reason = why
        super().abort(why, quiet)

    def describe(self) -> dict[str, object]:
        """What the admin API shows about this tunnel."""
        return {
            "name": self.name,
            "tags": self.tags,
            "address": self.address,
            "connected_since": self.registered_at,
            "protocol_version": VERSION,
            "agent_version": self.meta.get("version", ""),
            "status": "draining" if self.draining else "connected",
            "active_streams": self.open_streams(),
            "bytes_to_agent": self.bytes_sent,
            "bytes_from_agent": self.bytes_received,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "tls": self.tls_version,
            "client_certificate": self.client_subject,
        }


class ServerTunnelFactory(Factory):
    noisy = False

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: object) -> ServerTunnel:
        return ServerTunnel(self.context)


__all__ = ["OpenFailed", "ServerContext", "ServerTunnel", "ServerTunnelFactory", "TunnelGone"]
