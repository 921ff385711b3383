"""
What the agent reports as it runs (a tunnel registered or ended, a stream
opened, failed or denied): one method per event, called where the agent
already logs it.  L{AgentEvents} records nothing; L{nova.agent.metrics}
counts the events for Prometheus when NOVAC serves C{/metrics}, so an agent
without a probe port never loads prometheus_client.  Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nova.wire.errors import ErrorCode

if TYPE_CHECKING:  # types only: this module loads nothing of Twisted
    from twisted.internet.interfaces import IStreamClientEndpoint

    from nova.transport.stream import StreamTransport

RECONNECT_REASONS = (
    "connect_failed",
    "handshake_failed",
    "rejected",
    "server_shutdown",
    "goaway",
    "lost",
    "duplicate",
)
"""
Why a tunnel (or an attempt at one) ended while the agent runs, so that
another attempt follows: the connection could not be made; it ended before
registration; the server refused the registration; the server announced its
shutdown (GOAWAY SHUTDOWN: a restart, most likely); it sent another GOAWAY
(e.g. REPLACED); a registered tunnel was lost otherwise (network, keepalive);
discovery led to a member the agent already holds (docs/cluster.md).
"""


class AgentEvents:
    """The agent's events, recorded nowhere (metrics are off); subclasses count them."""

    # Tunnels.

    def server_configured(self, server: str) -> None:
        """C{server} is one to keep a tunnel to."""

    def registered(self, server: str) -> None:
        """The tunnel to C{server} registered."""

    def tunnel_ended(self, server: str, registered: bool, stopping: bool, ended_by: str | None) -> None:
        """
        The tunnel to C{server} closed: it had C{registered} or not; the
        agent is C{stopping} (no reconnect follows); the tunnel was
        C{ended_by} a REJECT or GOAWAY (L{RECONNECT_REASONS}).
        """

    def pool(self, server: str, tunnels: int, members: int) -> None:
        """The pool behind C{server} holds C{tunnels} of the C{members} it knows (docs/cluster.md, Discovery)."""

    def connecting(self, endpoint: IStreamClientEndpoint, server: str) -> IStreamClientEndpoint:
        """The endpoint to dial C{server} with (a subclass may wrap it to count failures)."""
        return endpoint

    # Streams.

    def stream_opened(self, server: str, stream: StreamTransport, latency: float) -> None:
        """A stream from C{server} reached its target, C{latency} seconds after the OPEN."""

    def stream_failed(self, server: str, reason: str) -> None:
        """A stream from C{server} was refused with OPEN_FAIL C{reason}."""

    def denied(self, server: str) -> None:
        """The destination policy refused a stream from C{server}."""


def goaway_reason(code: ErrorCode) -> str:
    return "server_shutdown" if code == ErrorCode.SHUTDOWN else "goaway"
