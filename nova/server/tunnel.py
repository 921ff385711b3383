"""
The server's end of a tunnel: the handshake's verifying half, registration,
and opening streams.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.admin.audit import Audit
from nova.errors import OpenError, Why, reason_why
from nova.mux.core import OpenRefused, Role
from nova.mux.defaults import DEFAULT_MAX_STREAMS
from nova.rules.admission import AgentToken, Limits, Throttle, TokenSet, source_key
from nova.tls import channel_binding, client_identity, tls_version
from nova.transport.private import innermost
from nova.transport.stream import StreamTransport
from nova.transport.tunnel import Timing, TunnelProtocol
from nova.wire.errors import ErrorCode, OpenFailReason, ProtocolError, UnsupportedVersion
from nova.wire.frames import (
    EARLY_DATA_BUDGET,
    FEATURE_EARLY_DATA,
    MAX_VERSION,
    VERSION,
    Auth,
    Frame,
    Hello,
    Reject,
    Welcome,
)
from nova.wire.handshake import name_problem, new_nonce, tags_problem, window_problem
from nova.wire.text import untrusted

from .early import EarlyData
from .members import MembersProvider, current_members, single_server
from .refusals import Refusals
from .registry import Registry

META_PREFIX = "nova/"


class OpenFailed(OpenError):
    """The agent could not open the stream: its OPEN_FAIL C{reason} is the row."""

    def __init__(self, reason: OpenFailReason, message: str, agent: str = "") -> None:
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason
        self.message = message
        self.agent = agent
        self.why = reason_why(reason)


class TunnelGone(OpenError):
    """The tunnel closed before the stream was opened (another agent may do)."""

    why = Why.TUNNEL_GONE


class TunnelBusy(OpenError):
    """The tunnel has as many streams as the server allows it (another agent may do)."""

    why = Why.TUNNEL_BUSY


# The first byte of a TLS handshake record (a ClientHello), read as a NOVA
# header's version byte by a plaintext agent port.
TLS_HANDSHAKE_RECORD = 0x16

# How long a registered tunnel has to answer a ping when another connection
# registers under its name: a live agent answers within a round trip; one
# that does not is dead (its host restarted, its network path is gone) and is
# replaced.  Short enough that a restarted agent gets its name back at once.
LIVE_NAME_PROBE = 2.0

log = Logger()


@dataclass
class ServerContext:
    token: bytes | None
    tls: bool
    clock: IReactorTime
    # From the settings, with no defaults of their own (nova.server.wiring
    # builds a context from the configuration; so do the tests, from its defaults).
    window: int
    max_window: int
    timing: Timing
    server_id: str
    limits: Limits
    client_ca: bool  # agents present certificates whose names bind their agent names
    registry: Registry = field(default_factory=Registry)
    audit: Audit = field(default_factory=Audit)
    tokens: TokenSet | None = None
    throttle: Throttle | None = None
    pending: int = 0
    pending_by_source: dict[str, int] = field(default_factory=dict)
    # Connections over their source's pending limit, waiting (reading paused,
    # so no TLS work is spent on them) for one of its handshakes to end.
    waiting: dict[str, deque[ServerTunnel]] = field(default_factory=dict)
    waiting_count: int = 0
    refusals: Refusals = field(init=False)
    # This server's id and the cluster's member ids, for version-2 agents
    # (nova.server.members); None: this server alone.
    members: MembersProvider | None = None

    def __post_init__(self) -> None:
        if self.members is None:
            self.members = single_server(self.server_id)
        if self.tokens is None:
            if self.token is None:
                raise ValueError("a token or a token set is needed")
            self.tokens = TokenSet([self.token])
        self.token = None  # only the token set keeps it
        if self.throttle is None:
            self.throttle = Throttle(self.limits)
        self.refusals = Refusals(self.clock, self.audit)


# The version-2 features this server offers in WELCOME (protocol.md §4.2, §7.2).
SERVER_FEATURES = FEATURE_EARLY_DATA


@implementer(IHandshakeListener)
class ServerTunnel(TunnelProtocol):
    role = Role.SERVER

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.clock, context.window, context.timing, context.max_window)
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
        self.token_key = ""  # the hash-derived key of the token it proved (see AgentToken)
        self.token_id = ""  # what the API and the audit show: the token's id= label, else its key
        self.source = ""  # the throttle's key for the peer (its IPv4 address, or IPv6 /64)
        self.client_subject: str | None = None
        self._pending = False
        self._waiting = False
        self._tls_done = False
        self._rejected = False
        self._nonce = b""
        self._hello_sent_at = 0.0
        self._handshake_rtt = -1.0
        self._opening: dict[int, tuple[Deferred[StreamTransport], str, int]] = {}
        self._probes: list[Deferred[bool]] = []
        self._auth_version = VERSION  # the layout of the agent's AUTH, and so of our REJECT
        self.members_sent: tuple[str, ...] = ()  # the member list this (version-2) agent was last sent

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
        self.connected_at = c.clock.seconds()
        self.address = TunnelProtocol.peer_label.fget(self)  # type: ignore[attr-defined]
        self.source = source_key(str(getattr(self.transport.getPeer(), "host", self.address)))
        if c.throttle.blocked(self.source, self.connected_at):
            self._refuse("BLOCKED", "too many failed handshakes from this address; blocked for a while")
            return
        if c.pending >= c.limits.max_pending_handshakes:
            self._refuse("OVERLOADED", f"{c.pending} handshakes already pending")
            return
        from_source = c.pending_by_source.get(self.source, 0)
        if from_source >= c.limits.max_pending_per_source:
            # Many agents behind one address (a NAT, a PrivateLink NLB) after
            # a restart: wait in turn rather than be refused and redial.
            if c.waiting_count >= c.limits.max_pending_handshakes:
                self._refuse("OVERLOADED", f"{from_source} handshakes pending from this source, and the queue is full")
                return
            _reading(self.transport, False)
            c.waiting.setdefault(self.source, deque()).append(self)
            c.waiting_count += 1
            self._waiting = True
            return
        self._start()

    def _start(self) -> None:
        """Count this connection as a pending handshake and let it proceed."""
        c = self.context
        c.pending += 1
        c.pending_by_source[self.source] = c.pending_by_source.get(self.source, 0) + 1
        self._pending = True
        if not c.tls or self._tls_done:
            self._ready()
        # Else HELLO waits for the TLS handshake (handshakeCompleted): written
        # before it, it would sit in the TLS layer's buffer.

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            c = self.context
            c.waiting_count -= 1
            queue = c.waiting.get(self.source)
            if queue is not None:
                if self in queue:
                    queue.remove(self)
                if not queue:
                    del c.waiting[self.source]

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake finished."""
        self._tls_done = True
        if not self.closed and self._pending:
            self._ready()

    def _ready(self) -> None:
        """The connection can carry frames: send HELLO, after the throttle's delay if any."""
        c = self.context
        assert c.throttle is not None
        delay = c.throttle.delay(self.source, c.clock.seconds())
        if delay:
            c.clock.callLater(delay, self._hello, True)
        else:
            self._hello(False)

    def _hello(self, waited: bool) -> None:
        if self.closed:
            return
        if waited and self.session is not None:
            self.session.handshake_restarted()  # the delay is ours: it must not eat the agent's deadline
        self._nonce = new_nonce()
        # The offer (protocol.md §4.2): a version-2 agent answers with a
        # version-2 AUTH, a version-1 agent ignores it.
        self.accept_version(MAX_VERSION)
        self.send_frame(Hello(self._nonce, MAX_VERSION))
        self._hello_sent_at = self.clock.seconds()

    def _report(self, code: str, why: str, claimed: str = "", token: str = "") -> None:
        self.context.refusals.refused(self.address, self.source, code, why, claimed, token)

    def _refuse(self, code: str, why: str) -> None:
        """Drop a connection before the handshake (no TLS work is done for it)."""
        self._rejected = True
        self._report(code, why)
        self.abort(why, quiet=True)

    def _not_pending(self) -> None:
        if self._pending:
            self._pending = False
            c = self.context
            c.pending -= 1
            left = c.pending_by_source.get(self.source, 1) - 1
            if left > 0:
                c.pending_by_source[self.source] = left
            else:
                c.pending_by_source.pop(self.source, None)
            # The next connection waiting from the same source takes the slot.
            queue = c.waiting.get(self.source)
            while queue:
                following = queue[0]
                following._stop_waiting()
                if not following.closed:
                    _reading(following.transport, True)
                    following._start()
                    break

    def handshake_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Auth):
            raise ProtocolError(f"expected AUTH, got {frame.TYPE.name}")
        if self._rejected:
            return  # refused already; the connection is closing
        c = self.context
        assert c.tokens is not None and c.throttle is not None
        if not self._nonce:
            raise ProtocolError("AUTH before HELLO")
        self._auth_version = frame.version
        # HELLO to AUTH is a round trip measured on an idle connection (window
        # auto-tuning needs one before bulk data can skew a PING's).
        self._handshake_rtt = self.clock.seconds() - self._hello_sent_at
        binding = channel_binding(self.transport)
        if c.tls and binding is None:
            self._reject(ErrorCode.INTERNAL_ERROR, "TLS is required but the connection is not TLS", frame.name)
            return
        now = c.clock.seconds()
        if c.throttle.blocked(self.source, now):
            # Its budget is spent: refused without checking, so guesses sent
            # in parallel before the block began gain nothing.
            self._reject(
                ErrorCode.AUTH_FAILED, "too many failed handshakes from this address", frame.name, reported="BLOCKED"
            )
            return
        token = c.tokens.match(self._nonce, binding or b"", frame)
        if token is None:
            self._failed(now)
            self._reject(ErrorCode.AUTH_FAILED, "the token proof did not verify", frame.name)
            return
        problem = name_problem(frame.name) or tags_problem(frame.tags) or window_problem(frame.initial_window)
        if problem is not None:
            self._reject(ErrorCode.BAD_NAME, problem, frame.name, token.id)
            return
        tags = {k: v for k, v in frame.tags if not k.startswith(META_PREFIX)}
        problem = token.scope.problem(frame.name, tags.items())
        if problem is not None:
            self._reject(ErrorCode.FORBIDDEN, problem, frame.name, token.id)
            return
        if c.client_ca:
            self.client_subject, names = client_identity(self.transport)
            if frame.name not in names:
                self._failed(now)
                self._reject(ErrorCode.BAD_NAME, "the client certificate does not name this agent", frame.name)
                return
        self._admit(frame, token)

    def _failed(self, now: float) -> None:
        """A failed proof: count it; the one that blocks the source is logged once, at once."""
        c = self.context
        assert c.throttle is not None
        if c.throttle.failed(self.source, now):
            limits = c.limits
            log.warn(
                "blocking {source} for {seconds:g}s after {n} failed handshakes: its connections are dropped"
                " and its AUTHs refused unchecked until then (--auth-block-after / NOVAS_AUTH_BLOCK_AFTER)",
                source=self.source,
                seconds=limits.block_seconds,
                n=limits.failures_before_block,
            )
            c.audit.auth_failed(self.source, "", "BLOCKED", f"blocked for {limits.block_seconds:g}s")

    def _admit(self, frame: Auth, token: AgentToken) -> None:
        """
        The agent proved a token that admits it.  If a tunnel holds its name
        already, that tunnel must prove it is alive (answer a ping within
        L{LIVE_NAME_PROBE} seconds) or be replaced; a live one keeps its name.
        """
        c = self.context
        current = c.registry.get(frame.name)
        if current is None or current is self or not isinstance(current, ServerTunnel):
            if current is None and len(c.registry) >= c.limits.max_tunnels:
                self._reject(
                    ErrorCode.OVERLOADED, f"the server already carries {len(c.registry)} tunnels", frame.name, token.id
                )
                return
            self._register(frame, token)
            return

        def decided(alive: bool) -> None:
            if self.closed:
                return
            if c.registry.get(frame.name) is not current:
                self._admit(frame, token)  # it changed meanwhile: look again
            elif alive:
                since = datetime.fromtimestamp(current.registered_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                # A version-2 agent with the live tunnel's own token that dials
                # again is discovery landing here twice (docs/cluster.md): normal,
                # so not reported as a refusal; the REJECT is the same.
                discovery = frame.version >= 2 and current.token_key == token.key
                if discovery:
                    self.log.debug("agent {agent} reached this server again through the balancer", agent=frame.name)
                self._reject(
                    ErrorCode.NAME_IN_USE,
                    f"the agent name {frame.name!r} is in use by a live agent connected from"
                    f" {current.address} since {since}",
                    frame.name,
                    token.id,
                    report=not discovery,
                )
            else:
                current.dead(f"it did not answer a ping when {frame.name} registered again from {self.address}")
                self._admit(frame, token)

        current.answers_ping(LIVE_NAME_PROBE).addCallback(decided)

    def _register(self, frame: Auth, token: AgentToken) -> None:
        c = self.context
        assert c.throttle is not None
        c.throttle.succeeded(self.source)
        self._not_pending()
        self.token_key = token.key
        self.token_id = token.id
        self.name = frame.name
        self.tags = {k: v for k, v in frame.tags if not k.startswith(META_PREFIX)}
        self.meta = {k[len(META_PREFIX) :]: v for k, v in frame.tags if k.startswith(META_PREFIX)}
        self.tls_version = tls_version(self.transport)
        self.registered_at = c.clock.seconds()
        # The limit counts streams the peer opens, and agents open none.
        self.start_streams(frame.initial_window, DEFAULT_MAX_STREAMS)
        self.rtt_measured(self._handshake_rtt, keepalive=False)
        self.protocol_version = frame.version
        self.accept_version(frame.version)
        keepalive_ms = int(c.timing.keepalive * 1000)
        if frame.version >= 2:
            assert c.members is not None
            own, self.members_sent = current_members(c.members, c.server_id)
            features = SERVER_FEATURES & frame.features
            if features & FEATURE_EARLY_DATA:
                # A stream's first bytes may follow its OPEN (protocol.md §7.2).
                assert self.mux is not None
                self.mux.early_budget = EARLY_DATA_BUDGET
            self.send_frame(Welcome(self.local_window, keepalive_ms, own, 2, features, self.members_sent))
        else:
            self.send_frame(Welcome(self.local_window, keepalive_ms, c.server_id))
        self.registered = True
        c.registry.register(self)
        self.log.info(
            "agent {agent} registered from {peer} with tags {tags} (token {token_id})",
            agent=self.name,
            peer=self.address,
            tags=untrusted(";".join(f"{k}={v}" for k, v in self.tags.items())) or "(none)",
            agent_version=untrusted(self.meta.get("version", ""), 64),
            token_id=self.token_id,
        )
        c.audit.registered(
            self.name,
            address=self.address,
            tags=self.tags,
            agent_version=self.meta.get("version", ""),
            tls=self.tls_version or "off",
            token_id=self.token_id,
        )

    def send_members(self, members: tuple[str, ...]) -> None:
        """Tell a version-2 agent the cluster's members (MEMBERS), if they changed since it was last told."""
        if self.protocol_version < 2 or self.mux is None or self.closed or members == self.members_sent:
            return
        self.members_sent = members
        self.mux.members(members)
        self.flush_soon()

    def answers_ping(self, timeout: float) -> Deferred[bool]:
        """
        Ping the agent: fires True when any PONG arrives within C{timeout}
        seconds, False if none does or the tunnel closes.
        """
        d: Deferred[bool] = Deferred()
        if self.closed or self.mux is None:
            d.callback(False)
            return d
        self._probes.append(d)

        def expired() -> None:
            if d in self._probes:
                self._probes.remove(d)
                d.callback(False)

        call = self.clock.callLater(timeout, expired)

        def done(result: bool) -> bool:
            if call.active():
                call.cancel()
            return result

        d.addCallback(done)
        self.send_ping()
        return d

    def _settle_probes(self, alive: bool) -> None:
        probes, self._probes = self._probes, []
        for d in probes:
            d.callback(alive)

    def dead(self, why: str) -> None:
        """Another connection claims this name and this tunnel did not answer: drop it."""
        self.close_reason = f"replaced: {why}"
        self.log.info(
            "agent {agent}: dropping its tunnel from {peer}: {reason}", agent=self.name, peer=self.address, reason=why
        )
        self.context.registry.unregister(self)
        self._fail_opening(f"tunnel to {self.name} was replaced")
        if not self.streams or self.session is None:
            self.abort(why, quiet=True)
            return
        # Its open streams are users' connections that may only be slow to
        # recover (a stalled link backing off its retransmissions: the
        # agent's fresh tunnel is what replaced it, docs/faults.md).  New
        # streams go to the new tunnel; these run on until they end, and the
        # dead timeout, counted afresh, still drops a tunnel that is really gone.
        self.outlive_backoff()
        self.drain(self.timing.dead_timeout, ErrorCode.REPLACED, "a newer tunnel registered under this name")

    def _fail_opening(self, why: str) -> None:
        """Fail the opens still waiting for the agent's answer (the endpoint retries them elsewhere)."""
        opening, self._opening = self._opening, {}
        for sid, (d, _host, _port) in opening.items():
            if self.mux is not None and not self.closed:
                self.mux.reset(sid, ErrorCode.CANCEL)
            if not d.called:
                d.errback(TunnelGone(why))
        if opening:
            self.flush()

    def revoke(self, why: str) -> None:
        """The token this tunnel proved is no longer valid: close it."""
        self.close_reason = why
        if self.mux is not None:
            self.mux.goaway(ErrorCode.AUTH_FAILED, why)
            self.flush()
        self.close()

    def _reject(
        self,
        code: ErrorCode,
        message: str,
        claimed_name: str,
        token: str = "",
        *,
        reported: str = "",
        report: bool = True,
    ) -> None:
        """
        Refuse the registration: REJECT C{code}, close, and report it
        (aggregated per source) as C{reported}, else as C{code}, unless not
        to C{report} it.
        """
        self._rejected = True
        if report:
            self._report(reported or code.name, message, claimed_name, token)
        if self._auth_version >= 2:
            # Who refused: an agent that dials every member learns whether it
            # landed on one it already holds (NAME_IN_USE), protocol.md §4.2.
            assert self.context.members is not None
            own, _ = current_members(self.context.members, self.context.server_id)
            self.send_frame(Reject(code, message, 2, own))
        else:
            self.send_frame(Reject(code, message))
        self.close()  # the handshake deadline drops it if the peer never reads

    def protocol_error(self, error: ProtocolError) -> None:
        if self.mux is None:
            message = error.message
            if isinstance(error, UnsupportedVersion) and error.version == TLS_HANDSHAKE_RECORD and not self.context.tls:
                message = (
                    "the client started a TLS handshake on this plaintext agent port (--no-tls / NOVAS_TLS=off):"
                    " set NOVAC_TLS=off on the agent, or turn TLS on here"
                )
            self._reject(error.code, message, self.name)
        else:
            super().protocol_error(error)

    def pending_streams(self) -> int:
        return len(self._opening)

    def handshake_timed_out(self) -> None:
        if self._rejected:
            return  # refused already, and still not gone: the abort that follows ends it
        self._rejected = True
        timeout = self.timing.handshake_timeout
        if self.context.tls and not self._tls_done:
            # Also what a plaintext agent (NOVAC_TLS=off) looks like: it waits
            # for HELLO and sends nothing.
            why = f"the TLS handshake did not finish within {timeout:g}s (an agent with NOVAC_TLS=off sends nothing)"
        else:
            why = f"the handshake did not finish within {timeout:g}s"
        self._report("HANDSHAKE_TIMEOUT", why)
        if self._nonce:  # HELLO went out, so TLS is up: say why before dropping
            self.send_frame(Reject(ErrorCode.HANDSHAKE_TIMEOUT, "the handshake took too long"))

    # Streams.

    def open_stream(self, host: str, port: int, early: EarlyData | None = None) -> Deferred[StreamTransport]:
        """
        Ask the agent to connect to C{host:port}.  Fires with the stream's
        transport once the agent has connected, or fails with L{OpenFailed}
        or L{TunnelGone}.  Cancelling the Deferred resets the stream.  If
        the agent takes data after OPEN (protocol.md §7.2), C{early}'s bytes
        follow the OPEN at once (the caller detaches it when the attempt ends).
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
        if early is not None and self.mux.early_budget:
            early.attach(lambda data: self._early_write(sid, data))
        self.flush()
        return d

    def _early_write(self, stream_id: int, data: bytes) -> None:
        """Bytes for a stream the agent has not accepted yet: the multiplexer sends what its rule allows."""
        mux = self.mux
        if mux is not None and stream_id in mux and not self.closed:
            mux.send(stream_id, data)
            self.flush_soon()

    def stream_opened(self, stream_id: int) -> None:
        entry = self._opening.pop(stream_id, None)
        if entry is None:
            return
        d, host, port = entry
        d.callback(self.add_stream(stream_id, host, port))

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None:
        entry = self._opening.pop(stream_id, None)
        if entry is not None:
            entry[0].errback(OpenFailed(event.reason, untrusted(event.message), self.name))

    # Life cycle.

    def replaced(self) -> None:
        """
        The registry now maps this name to another tunnel.  Still
        C{registered} here: L{tunnel_closed} reports its end to the audit and
        the metrics like any other.
        """
        if not self.close_reason:
            self.close_reason = "replaced by a newer registration under the same name"
        if self.mux is not None and not self.closed:
            self.mux.goaway(ErrorCode.REPLACED, "a newer tunnel registered under this name")
            self.flush()
        self.close()

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.log.info(
            "agent {agent} is going away ({code}: {detail}); no new streams go to it",
            agent=self.name,
            code=code.name,
            detail=message,
        )
        self.draining = True

    def tunnel_closed(self, reason: Failure) -> None:
        if self._pending and not self._rejected:
            # Closed mid-handshake without a REJECT: TLS failed, or the peer left.
            self._report("CLOSED_EARLY", f"the connection closed before registering: {reason.getErrorMessage()}")
        self._stop_waiting()
        self._not_pending()
        self._settle_probes(False)
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
        self._settle_probes(True)
        if self.rtt is not None and self.registered:
            self.context.audit.rtt(self.name, self.rtt)

    def abort(self, why: str, quiet: bool = False) -> None:
        if not self.close_reason:
            self.close_reason = why
        # Before registration every drop is reported through the refusals.
        super().abort(why, quiet or not self.registered)

    def describe(self) -> dict[str, object]:
        """What the admin API shows about this tunnel."""
        return {
            "name": self.name,
            "tags": self.tags,
            "address": self.address,
            "connected_since": self.registered_at,
            "protocol_version": VERSION,
            # What the handshake agreed on (protocol.md §4.2); protocol_version
            # stays the version of the frames every tunnel shares.
            "negotiated_version": self.protocol_version,
            "agent_version": self.meta.get("version", ""),
            "status": "draining" if self.draining else "connected",
            "active_streams": self.open_streams(),
            "bytes_to_agent": self.bytes_sent,
            "bytes_from_agent": self.bytes_received,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "tls": self.tls_version,
            "client_certificate": self.client_subject,
            "token_id": self.token_id,
        }


def _reading(transport: object, on: bool) -> None:
    """Pause or resume reading on the connection under C{transport} (through a TLS wrapper)."""
    bottom = innermost(transport)
    if on:
        bottom.resumeProducing()  # type: ignore[attr-defined]
    else:
        bottom.pauseProducing()  # type: ignore[attr-defined]


class ServerTunnelFactory(Factory):
    noisy = False

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: object) -> ServerTunnel:
        return ServerTunnel(self.context)


__all__ = ["OpenFailed", "ServerContext", "ServerTunnel", "ServerTunnelFactory", "TunnelBusy", "TunnelGone"]
