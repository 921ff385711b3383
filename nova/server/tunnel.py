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

from nova.mux.core import OpenRefused, Role
from nova.mux.stream import StreamTransport
from nova.mux.tunnel import Timing, TunnelProtocol
from nova.tls import channel_binding
from nova.wire.errors import ErrorCode, OpenFailReason, ProtocolError
from nova.wire.frames import Auth, Frame, Hello, Reject, Welcome
from nova.wire.handshake import name_problem, new_nonce, tags_problem, verify_auth, window_problem

from .registry import Registry


class OpenFailed(Exception):
    """The agent could not open the stream."""

    def __init__(self, reason: OpenFailReason, message: str) -> None:
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason


class TunnelGone(Exception):
    """The tunnel closed before the stream was opened."""


@dataclass
class ServerContext:
    token: bytes
    tls: bool
    clock: IReactorTime
    registry: Registry = field(default_factory=Registry)
    window: int = 262_144
    timing: Timing = field(default_factory=Timing)
    server_id: str = "novas"


class ServerTunnel(TunnelProtocol):
    role = Role.SERVER

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.clock, context.window, context.timing)
        self.context = context
        self.name = ""
        self.tags: dict[str, str] = {}
        self.registered = False
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
        self._nonce = new_nonce()
        self.send_frame(Hello(self._nonce))

    def handshake_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Auth):
            raise ProtocolError(f"expected AUTH, got {frame.TYPE.name}")
        binding = channel_binding(self.transport)
        if self.context.tls and binding is None:
            self._reject(ErrorCode.INTERNAL_ERROR, "TLS is required but the connection is not TLS", frame.name)
            return
        if not verify_auth(self.context.token, self._nonce, binding or b"", frame):
            self._reject(ErrorCode.AUTH_FAILED, "the token proof did not verify", frame.name)
            return
        problem = name_problem(frame.name) or tags_problem(frame.tags) or window_problem(frame.initial_window)
        if problem is not None:
            self._reject(ErrorCode.BAD_NAME, problem, frame.name)
            return
        self.name = frame.name
        self.tags = dict(frame.tags)
        self.start_streams(frame.initial_window)
        self.send_frame(Welcome(self.local_window, int(self.context.timing.keepalive * 1000), self.context.server_id))
        self.registered = True
        self.context.registry.register(self)
        self.log.info(
            "agent {agent} registered from {peer} with tags {tags}",
            agent=self.name,
            peer=TunnelProtocol.peer_label.fget(self),  # type: ignore[attr-defined]
            tags=";".join(f"{k}={v}" for k, v in frame.tags) or "(none)",
        )

    def _reject(self, code: ErrorCode, message: str, claimed_name: str) -> None:
        self.log.warn(
            "rejected agent {agent!r} from {peer}: {code}: {message}",
            agent=claimed_name[:64],
            peer=self.peer_label,
            code=code.name,
            message=message,
        )
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
            entry[0].errback(OpenFailed(event.reason, event.message))

    # Life cycle.

    def replaced(self) -> None:
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
        opening, self._opening = self._opening, {}
        for d, _host, _port in opening.values():
            if not d.called:
                d.errback(TunnelGone(f"tunnel to {self.name} closed"))
        if self.registered:
            self.registered = False
            self.context.registry.unregister(self)
            self.log.info("agent {agent} disconnected: {reason}", agent=self.name, reason=reason.getErrorMessage())


class ServerTunnelFactory(Factory):
    noisy = False

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: object) -> ServerTunnel:
        return ServerTunnel(self.context)


__all__ = ["OpenFailed", "ServerContext", "ServerTunnel", "ServerTunnelFactory", "TunnelGone"]
