"""
The Twisted side of the agent pool (L{nova.agent.pool}): one service per
configured server address that dials it, one attempt at a time, until it
holds a tunnel to every member the servers behind it named.

It takes the place of the one reconnecting tunnel per address
(L{nova.agent.reconnect.reconnecting}) and keeps its behaviour where there
is one member: the first dial at once, the same L{Backoff} (and its retry
line) between attempts, the same drain on stop.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.wire.errors import ErrorCode

from .pool import PoolState, discovery_delay, member_added_delay
from .reconnect import Backoff, NotingEndpoint
from .tunnel import AgentContext, AgentTunnel, AgentTunnelFactory

log = Logger()


class AgentPool(Service):
    """Tunnels to every member behind one configured address."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        context: AgentContext,
        label: str,
        backoff: Backoff,
        clock: IReactorTime,
        drain_timeout: float = 30.0,
    ) -> None:
        self.endpoint = NotingEndpoint(endpoint, backoff)
        self.context = context
        self.label = label
        self.backoff = backoff
        self.clock = clock
        self.drain_timeout = drain_timeout
        # Pools do not share what they hold: a server id names a member only
        # within the cluster behind one address (two independent servers, or
        # two clusters, may use the same ids: host names, pod names).
        self.state = PoolState(clock, self, self._delay, self._added_delay)
        self.state.on_replace = self._close_stalled
        self.factory = AgentTunnelFactory(context, label, backoff, self.state)
        self._connecting: Deferred[IProtocol] | None = None

    # PoolHooks.

    def dial(self) -> None:
        d: Deferred[IProtocol] = self.endpoint.connect(self.factory)
        self._connecting = d

        def connected(protocol: IProtocol) -> None:
            self._connecting = None

        def failed(failure: Failure) -> None:
            self._connecting = None
            if self.running:
                self.state.attempt_failed()

        d.addCallbacks(connected, failed)

    def cancel_dial(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        attempt = self.state.attempt
        if isinstance(attempt, AgentTunnel) and not attempt.closed:
            attempt.close()

    def _close_stalled(self, tunnel: object) -> None:
        """A fresh tunnel registered in place of a stalled one: end the stalled one (the server replaced it)."""
        if not isinstance(tunnel, AgentTunnel):
            return
        if not tunnel.streams:
            tunnel.abort("a fresh tunnel to the same server replaced it")
            return
        # Its open streams may only be slow to recover: they run on (the dead
        # timeout, counted afresh, still drops the tunnel if it is really gone).
        tunnel.outlive_backoff()
        timing = self.context.timing
        tunnel.drain(timing.dead_timeout, ErrorCode.NO_ERROR, "replaced by a fresh tunnel")

    def _delay(self) -> float:
        missing = sorted(self.state.core.missing())
        if self.state.held and missing and self.state.duplicates_in_a_row:
            # Landed on a member already held: the balancer's luck, not a
            # failure (see discovery_delay), so the backoff does not grow.
            b = self.backoff
            delay = discovery_delay(b.initial, b.cap, self.state.duplicates_in_a_row, len(self.state.members), b.jitter)
        else:
            delay = self.backoff(0)
        self.backoff.attempts += 1
        if self.state.held and missing:
            log.info(
                "dialling {server} again in {delay:.1f}s for member(s) {missing}"
                " (retry {attempt}; last attempt: {reason})",
                server=self.label,
                delay=delay,
                missing=", ".join(missing),
                attempt=self.backoff.attempts,
                reason=self.backoff.last_failure,
            )
        else:
            # The line a single reconnecting tunnel logs (nova.agent.reconnect).
            log.info(
                "retrying {server} in {delay:.1f}s (retry {attempt}; last attempt: {reason})",
                server=self.label,
                reason=self.backoff.last_failure,
                attempt=self.backoff.attempts,
                delay=delay,
            )
        return delay

    def _added_delay(self) -> float:
        delay = member_added_delay(self.backoff.cap, self.backoff.jitter)
        log.info(
            "dialling {server} in {delay:.1f}s for member(s) {missing} (newly named)",
            server=self.label,
            delay=delay,
            missing=", ".join(sorted(self.state.core.missing())),
        )
        return delay

    # What the tunnels report goes to the state (nova.agent.tunnel calls it);
    # the metrics follow after every change.

    def _report(self) -> None:
        self.context.metrics.pool(self.label, len(self.state.held), len(self.state.members) or 1)

    def tunnels(self) -> list[AgentTunnel]:
        return [t for t in self.context.tunnels if t.server == self.label]

    def describe(self) -> dict[str, object]:
        return {
            "server": self.label,
            "members": sorted(self.state.members),
            "held": sorted(self.state.held),
            "duplicates": self.state.duplicates,
        }

    # Service.

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.context.metrics.server_configured(self.label)
        self.state.on_change = self._report
        self.state.start()

    def stopService(self) -> Deferred[None]:
        """
        Graceful drain: GOAWAY on every held tunnel (no new streams); the
        open ones run until they end or the drain timeout passes.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self.state.stop()
        drains = []
        for tunnel in self.tunnels():
            if tunnel.mux is None:
                tunnel.close()
            else:
                drains.append(tunnel.drain(self.drain_timeout, ErrorCode.SHUTDOWN, "agent shutting down"))
        d: Deferred[None] = gatherResults(drains).addCallback(lambda _: None)
        return d
