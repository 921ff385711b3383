"""
The agent's end of a tunnel: the handshake's proving half, and connecting
each stream NOVAS opens to its target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nova import __version__
from nova.errors import NovaError, dial_failure
from nova.mux.core import OpenRefused, Role
from nova.rules.destinations import Policy, PolicyDenied
from nova.tls import channel_binding
from nova.transport.splice import Pipe, splice
from nova.transport.tunnel import Timing, TunnelProtocol
from nova.wire.errors import ErrorCode, OpenFailReason, ProtocolError
from nova.wire.frames import (
    EARLY_DATA_BUDGET,
    FEATURE_EARLY_DATA,
    MAX_VERSION,
    Frame,
    GoAway,
    Hello,
    Reject,
    Welcome,
)
from nova.wire.handshake import make_auth, negotiated_version, window_problem
from nova.wire.hostname import host_problem
from nova.wire.text import untrusted

from .events import AgentEvents, goaway_reason
from .pool import PoolState
from .reconnect import Backoff

# connect(host, port, protocol) -> Deferred firing with the protocol once connected.
TargetConnector = Callable[[str, int, IProtocol], "Deferred[IProtocol]"]
# on_denied(server, denial): called for every stream the policy refuses (the audit hook).
DenialHook = Callable[[str, PolicyDenied], None]

# What an agent sees when its TLS setting differs from the server's.
NOT_TLS = (
    "the server does not speak TLS (NOVAS runs with --no-tls / NOVAS_TLS=off?) but this agent does:"
    " turn TLS on at the server, or set NOVAC_TLS=off here (trusted networks only)"
)
MAYBE_TLS = (
    "no HELLO from the server within {timeout:g}s: it may be speaking TLS while this agent has NOVAC_TLS=off:"
    " remove NOVAC_TLS=off and pin NOVAC_TLS_FINGERPRINT (or NOVAC_TLS_CA), or run NOVAS with --no-tls"
)
DROPPED_SILENTLY = (
    "the server ended the connection after {seconds:.0f}s without a word (no HELLO): it may be speaking TLS while"
    " this agent has NOVAC_TLS=off (remove NOVAC_TLS=off and pin NOVAC_TLS_FINGERPRINT or NOVAC_TLS_CA, or run"
    " NOVAS with --no-tls), or it refused this address: see its log"
)


def tls_mismatch(reason: Failure, tls: bool) -> str | None:
    """
    The hint for a connection that ended before registration because the two
    ends disagree about TLS, or None.  A TLS client that reads a plaintext
    HELLO gets OpenSSL's "wrong version number" (the frame's first bytes are
    no TLS record header).
    """
    if tls and reason.check(SSL.Error) is not None and "wrong version number" in str(reason.value):
        return NOT_TLS
    return None


class Duplicate(NovaError):
    """Discovery led to a server that already holds a tunnel of this agent."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"server {server_id} already holds a tunnel of this agent")
        self.server_id = server_id


class Rejected(NovaError):
    """The server refused the registration."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


# The version-2 features this agent offers in AUTH (protocol.md §4.2, §7.2).
AGENT_FEATURES = FEATURE_EARLY_DATA


def _prometheus_metrics() -> AgentEvents:
    # Imported here: an agent that serves no /metrics never loads prometheus_client.
    from .metrics import AgentMetrics

    return AgentMetrics()


@dataclass
class AgentContext:
    name: str
    tags: tuple[tuple[str, str], ...]
    token: bytes
    tls: bool
    clock: IReactorTime
    connect_target: TargetConnector
    # From the settings, with no defaults of their own (nova.agent.wiring
    # builds a context from the configuration; so do the tests, from its defaults).
    window: int
    max_window: int
    timing: Timing
    max_streams: int
    # Checked before connect_target is called; connect_target checks the
    # resolved addresses (see nova.agent.dialer.Dialer).
    policy: Policy
    # OPENs per second a server may ask of this agent (a token bucket whose
    # burst is one second's worth); beyond it OPEN_FAIL OVERLOADED.
    max_open_rate: float
    tunnels: set[AgentTunnel] = field(default_factory=set)
    on_denied: DenialHook | None = None
    # Where the agent's events are counted: Prometheus unless told otherwise
    # (NOVAC passes a plain AgentEvents when it serves no /metrics).
    metrics: AgentEvents = field(default_factory=_prometheus_metrics)
    # The highest protocol version offered (protocol.md §4.2); tests set 1 to be a version-1 agent.
    max_version: int = MAX_VERSION


def classify(failure: Failure) -> OpenFailReason:
    """The OPEN_FAIL reason for a failed connection to a target (see L{nova.errors.DIAL_ERRORS})."""
    return OpenFailReason(dial_failure(failure).wire)


class TargetPipe(Pipe):
    """The agent's connection to a target; paused until spliced."""

    requested_at = 0.0  # when the server asked for it (the open latency's start)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]


class AgentTunnel(TunnelProtocol):
    role = Role.AGENT

    def __init__(
        self, context: AgentContext, server: str, backoff: Backoff | None = None, pool: PoolState | None = None
    ) -> None:
        super().__init__(context.clock, context.window, context.timing, context.max_window)
        self.context = context
        self.server = server
        self.backoff = backoff
        self.pool = pool
        self.server_id = ""  # the server's id, from WELCOME (or a version-2 REJECT)
        self.members: tuple[str, ...] = ()  # the cluster's members, as the server last named them
        self._outcome: AgentTunnel | Failure | None = None
        self._waiters: list[Deferred[AgentTunnel]] = []
        self._dialing: dict[int, Deferred[IProtocol]] = {}
        self._open_tokens = context.max_open_rate
        self._open_refilled = context.clock.seconds()
        self.refused_for_rate = 0
        self._saw_hello = False
        self._ended_by: str | None = None  # a REJECT or GOAWAY: the reconnect's reason
        self._heard = False  # a frame (or bytes that were no frame) from the server before registering
        self._connected_at = 0.0
        self._mismatch: str | None = None

    @property
    def peer_label(self) -> str:
        return self.server

    def handshake_started(self) -> None:
        self.context.tunnels.add(self)
        self._connected_at = self.clock.seconds()

    def handshake_timed_out(self) -> None:
        # A plaintext agent and a TLS server both wait for the other to speak first.
        if not self.context.tls and not self._heard:
            self._mismatch = MAYBE_TLS.format(timeout=self.context.timing.handshake_timeout)

    # Handshake.

    def protocol_error(self, error: ProtocolError) -> None:
        self._heard = True  # bytes arrived, even if they were no frame
        super().protocol_error(error)

    def handshake_frame(self, frame: Frame) -> None:
        self._heard = True
        if isinstance(frame, Hello) and not self._saw_hello:
            self._hello(frame)
        elif isinstance(frame, Welcome) and self._saw_hello:
            self._welcome(frame)
        elif (
            isinstance(frame, Reject)
            and frame.server_id
            and self.pool is not None
            and self.pool.has_tunnel(frame.server_id)
        ):
            # A version-2 REJECT from a member this agent already holds (its
            # live-name rule: NAME_IN_USE): a duplicate, not a refusal.
            self.server_id = frame.server_id
            self._duplicate(f"({frame.code.name})")
        elif isinstance(frame, Reject):
            self._reject_received(frame)
        else:
            raise ProtocolError(f"unexpected {frame.TYPE.name} during the handshake")

    def _hello(self, frame: Hello) -> None:
        self._saw_hello = True
        binding = channel_binding(self.transport)
        if self.context.tls and binding is None:
            raise ProtocolError("TLS is required but the connection is not TLS")
        version = negotiated_version(frame.offer, self.context.max_version)
        self.protocol_version = version
        self.accept_version(version)  # the server answers a version-2 AUTH in version 2
        self.send_frame(
            make_auth(
                self.context.token,
                frame.nonce,
                binding or b"",
                self.context.name,
                (*self.context.tags, ("nova/version", __version__)),
                self.local_window,
                version,
                AGENT_FEATURES,
            )
        )

    def _welcome(self, frame: Welcome) -> None:
        problem = window_problem(frame.initial_window)
        if problem is not None:
            raise ProtocolError(f"WELCOME: {problem}")
        if frame.version != self.protocol_version:
            raise ProtocolError(f"a version-{frame.version} WELCOME answered a version-{self.protocol_version} AUTH")
        self.server_id = frame.server_id
        self.members = frame.members if frame.version >= 2 else (frame.server_id,)
        if self.pool is not None and self.pool.holds(frame.server_id):
            # Registered anyway (the member judged our other tunnel dead):
            # close this one at once (docs/cluster.md, "Discovery").
            self.send_frame(GoAway(ErrorCode.NO_ERROR, "already connected to this server"))
            self._duplicate("; closing this one")
            return
        if frame.keepalive_ms:
            # The server knows its network (a load balancer's idle cut).
            self.core.keepalive = min(self.core.keepalive, max(frame.keepalive_ms / 1000, 1.0))
        if self.backoff is not None:
            self.backoff.reset()
        self.start_streams(frame.initial_window, self.context.max_streams)
        if frame.version >= 2 and frame.features & FEATURE_EARLY_DATA:
            # The server may send a stream's first bytes before our OPEN_OK
            # (protocol.md §7.2); the multiplexer holds them within the budget.
            assert self.mux is not None
            self.mux.early_budget = EARLY_DATA_BUDGET
        self.probe_rtt()  # measured now, while the tunnel is idle (window auto-tuning)
        self.log.info(
            "registered with {server} as {agent} (server {server_id})",
            server=self.server,
            agent=self.context.name,
            server_id=frame.server_id,
        )
        self.context.metrics.registered(self.server)
        if self.backoff is not None:
            self.backoff.failed(f"registered with server {frame.server_id}")  # the last attempt, for the next line
        self._settle(self)
        if self.pool is not None and not self.pool.welcomed(self, frame.server_id, self.members):
            self.close()  # a duplicate after all (checked above: not expected)

    def _duplicate(self, how: str) -> None:
        """Discovery led to a member this agent already holds: not a refusal; this connection closes."""
        assert self.pool is not None
        self.log.info(
            "{server} led to server {server_id} again, which already holds a tunnel of {agent} {how}",
            server=self.server,
            server_id=self.server_id,
            agent=self.context.name,
            how=how,
        )
        self._ended_by = "duplicate"
        self.pool.refused_duplicate()
        if self.backoff is not None:
            self.backoff.failed(f"landed on server {self.server_id} again, which this agent holds")
        self._fail_registration(Duplicate(self.server_id))
        self.close()

    def _reject_received(self, frame: Reject) -> None:
        self.log.error(
            "server {server} rejected the registration of {agent}: {code}: {detail}",
            server=self.server,
            agent=self.context.name,
            code=frame.code.name,
            detail=untrusted(frame.message),
        )
        self._ended_by = "rejected"
        if self.backoff is not None:
            self.backoff.rejected = True
            self.backoff.failed(f"registration rejected: {frame.code.name}")
        self._fail_registration(Rejected(frame.code, untrusted(frame.message)))
        self.close()

    def stalled(self, silent: float) -> None:
        """No answer to a PING within the stall timeout: the pool dials a fresh tunnel beside this one."""
        self.log.warn(
            "tunnel to {server} stalled (nothing heard for {silent:.1f}s); opening a fresh tunnel beside it",
            server=self.server,
            silent=silent,
        )
        if self.backoff is not None:
            # The link is faulty, not the server: dial again soon (while the
            # link is down each attempt is paced by the connect timeout), not
            # after a backoff grown over the outage (docs/faults.md).
            self.backoff.expect_restart()
        if self.pool is not None:
            self.pool.tunnel_stalled(self)

    def stall_ended(self) -> None:
        self.log.info("tunnel to {server} is answering again", server=self.server)
        if self.pool is not None:
            self.pool.tunnel_recovered(self)

    def members_received(self, members: tuple[str, ...]) -> None:
        """MEMBERS: the cluster changed; the pool follows it."""
        self.members = members
        self.log.info(
            "server {server_id} (via {server}) names {n} member(s): {members}",
            server_id=self.server_id,
            server=self.server,
            n=len(members),
            members=untrusted(", ".join(members)),
        )
        if self.pool is not None:
            self.pool.members_changed(members)

    def when_registered(self) -> Deferred[AgentTunnel]:
        """Fires with this tunnel once registered, or fails with why not."""
        if self._outcome is None:
            d: Deferred[AgentTunnel] = Deferred()
            self._waiters.append(d)
            return d
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        return succeed(self._outcome)

    def _settle(self, outcome: AgentTunnel | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _fail_registration(self, reason: Exception) -> None:
        if self._outcome is None:
            self._settle(Failure(reason))

    # Streams.

    def pending_streams(self) -> int:
        return len(self._dialing)

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.log.info(
            "server {server} is going away ({code}: {detail}); reconnecting once it closes",
            server=self.server,
            code=code.name,
            detail=message,
        )
        self._ended_by = goaway_reason(code)
        if code == ErrorCode.SHUTDOWN and self.backoff is not None:
            self.backoff.expect_restart()

    def _take_open_token(self) -> bool:
        """The OPEN rate limit: refill, then take one token if there is one."""
        rate = self.context.max_open_rate
        now = self.clock.seconds()
        self._open_tokens = min(rate, self._open_tokens + (now - self._open_refilled) * rate)
        self._open_refilled = now
        if self._open_tokens >= 1:
            self._open_tokens -= 1
            return True
        return False

    def stream_requested(self, stream_id: int, host: str, port: int) -> None:
        assert self.mux is not None
        if self.draining:
            self.context.metrics.stream_failed(self.server, OpenFailReason.DRAINING.name)
            self.mux.refuse(stream_id, OpenFailReason.DRAINING, "the agent is shutting down")
            return
        if not self._take_open_token():
            self.refused_for_rate += 1
            if self.refused_for_rate == 1 or self.refused_for_rate % 1000 == 0:
                self.log.warn(
                    "server {server} opens streams faster than {rate:g}/s; refused {n} so far",
                    server=self.server,
                    rate=self.context.max_open_rate,
                    n=self.refused_for_rate,
                )
            self.context.metrics.stream_failed(self.server, OpenFailReason.OVERLOADED.name)
            self.mux.refuse(stream_id, OpenFailReason.OVERLOADED, "open rate limit")
            return
        problem = host_problem(host)
        if problem is not None:
            # A name no resolver can take (IDNA refuses it, or it holds a
            # NUL or a control character): answered now, never left to time out.
            self.log.warn(
                "refusing to open {target} for {server}: DNS_FAILURE ({why})",
                event="bad_host_name",
                target=untrusted(f"{host}:{port}"),
                server=self.server,
                why=problem,
            )
            self.mux.refuse(stream_id, OpenFailReason.DNS_FAILURE, f"invalid host name: {problem}")
            return
        decision = self.context.policy.check_name(host, port)
        if not decision.allowed:
            # Denied before anything is resolved or dialled.
            self._denied(stream_id, PolicyDenied(host, port, decision.why))
            return
        target = TargetPipe()
        target.requested_at = self.clock.seconds()
        try:
            d = self.context.connect_target(host, port, target)
        except Exception:
            d = fail()  # answered as a failed connection, below
        self._dialing[stream_id] = d
        d.addCallbacks(
            lambda _: self._target_connected(stream_id, host, port, target),
            lambda f: self._target_failed(stream_id, host, port, f),
        )

    def _target_connected(self, stream_id: int, host: str, port: int, target: TargetPipe) -> None:
        self._dialing.pop(stream_id, None)
        if self.mux is None or stream_id not in self.mux or self.closed:
            assert target.transport is not None
            target.transport.loseConnection()
            return
        self.mux.accept(stream_id)
        stream = self.add_stream(stream_id, host, port)
        self.context.metrics.stream_opened(self.server, stream, self.clock.seconds() - target.requested_at)
        other = Pipe()
        # Bytes that followed the OPEN wait in the stream's inbox: hand them
        # over only once the pipe is spliced to the target (splice resumes).
        stream.pauseProducing()
        stream.makeConnection(other)
        splice(target, other)
        self.flush()

    def _target_failed(self, stream_id: int, host: str, port: int, failure: Failure) -> None:
        self._dialing.pop(stream_id, None)
        if self.mux is None or self.closed:
            return
        if isinstance(failure.value, PolicyDenied):
            self._denied(stream_id, failure.value)
            self.flush()
            return
        reason = classify(failure)
        if reason is OpenFailReason.TIMEOUT and stream_id not in self.mux:
            return  # cancelled because the server gave up on the stream
        message = failure.getErrorMessage()
        self.log.warn(
            "cannot connect to {target} for {server}: {reason} ({detail})",
            target=untrusted(f"{host}:{port}"),
            server=self.server,
            reason=reason.name,
            detail=untrusted(message),
        )
        self.context.metrics.stream_failed(self.server, reason.name)
        self.mux.refuse(stream_id, reason, message)
        self.flush()

    def _denied(self, stream_id: int, denial: PolicyDenied) -> None:
        """Refuse a stream the policy forbids: OPEN_FAIL DENIED, logged and audited."""
        assert self.mux is not None
        self.log.warn(
            "policy denied {target} for {server}: DENIED ({detail})",
            event="stream_denied",
            agent=self.context.name,
            target=untrusted(denial.target),
            server=self.server,
            reason=denial.why,
            addresses=[str(a) for a in denial.addresses],
            detail=untrusted(denial.message),
        )
        self.context.metrics.denied(self.server)
        if self.context.on_denied is not None:
            try:
                self.context.on_denied(self.server, denial)
            except Exception:
                self.log.failure("the on_denied hook failed for {target}", target=denial.target)
        self.mux.refuse(stream_id, OpenFailReason.DENIED, denial.message)

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None:
        # The server reset a stream we are still dialing: stop dialing.
        d = self._dialing.pop(stream_id, None)
        if d is not None:
            d.cancel()

    # Life cycle.

    def tunnel_closed(self, reason: Failure) -> None:
        self.context.tunnels.discard(self)
        self.context.metrics.tunnel_ended(self.server, self._outcome is self, self.draining, self._ended_by)
        for d in list(self._dialing.values()):
            d.cancel()
        self._dialing.clear()
        if self._outcome is None:
            mismatch = self._mismatch or tls_mismatch(reason, self.context.tls)
            waited = self.clock.seconds() - self._connected_at
            if mismatch is None and not self.context.tls and not self._heard and waited >= 1.0:
                # Dropped at the server's handshake deadline, having said nothing:
                # what a TLS server does to a client that never starts TLS.
                mismatch = DROPPED_SILENTLY.format(seconds=waited)
            if mismatch is not None:
                self.log.error("cannot register with {server}: {hint}", server=self.server, hint=mismatch)
            elif self._ended_by == "duplicate":
                pass  # logged when it was found out
            else:
                self.log.warn(
                    "connection to {server} ended before registration: {reason}",
                    server=self.server,
                    reason=reason.getErrorMessage(),
                )
            if self.backoff is not None and self._ended_by != "duplicate":
                self.backoff.failed(
                    f"TLS mismatch: {mismatch.split(':')[0]}"
                    if mismatch
                    else f"ended before registration: {reason.getErrorMessage()}"
                )
            self._fail_registration(ConnectionError(reason.getErrorMessage()))
        elif self._ended_by != "duplicate":  # a duplicate was logged when it was found out
            self.log.info(
                "tunnel to {server} closed: {reason}{member}",
                server=self.server,
                reason=reason.getErrorMessage(),
                member=f" (server {self.server_id})" if self.pool is not None and self.server_id else "",
            )
            if self.backoff is not None and not isinstance(self._outcome, Failure):  # not the REJECT just noted
                self.backoff.failed(f"tunnel closed: {reason.getErrorMessage()}")
        if self.pool is not None:
            self.pool.closed(self)


class AgentTunnelFactory(Factory):
    noisy = False

    def __init__(
        self, context: AgentContext, server: str, backoff: Backoff | None = None, pool: PoolState | None = None
    ) -> None:
        self.context = context
        self.server = server
        self.backoff = backoff
        self.pool = pool

    def buildProtocol(self, addr: object) -> AgentTunnel:
        tunnel = AgentTunnel(self.context, self.server, self.backoff, self.pool)
        if self.pool is not None:
            self.pool.connected(tunnel)
        return tunnel
