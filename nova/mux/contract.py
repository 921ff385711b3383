"""
The stream/tunnel contract, as two interfaces keyed by stream id (no I/O):
what a stream asks of the tunnel that carries it (L{StreamOwner}) and what
the tunnel tells a stream (L{StreamEvents}), as Twisted's C{H2Stream} and
C{H2Connection} meet.  The pure inbound delivery (L{nova.mux.inbound}) and
the adapters (L{nova.transport.stream}, L{nova.transport.outbound},
L{nova.transport.tunnel}) all speak it; neither side touches the other's
fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from nova.wire.errors import ErrorCode

if TYPE_CHECKING:
    from twisted.python.failure import Failure


class StreamOwner(Protocol):
    """
    What a stream asks of the tunnel that carries it, by stream id.  Every
    effect a stream has on its tunnel goes through one of these.
    """

    def write_data(self, stream_id: int, data: bytes, high_water: int) -> int:
        """
        Queue C{data} to be sent and schedule a flush (at once if
        C{high_water} bytes or more are queued).  Returns the bytes still
        queued for the stream.
        """

    def end_stream(self, stream_id: int) -> None:
        """Send FIN after everything queued."""

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        """Send RST now and forget what is queued either way."""

    def read_data(self, stream_id: int, limit: int) -> list[bytes]:
        """Take received bytes (at least C{limit} if there are): credit for them goes back to the peer."""

    def data_consumed(self, stream_id: int) -> int:
        """
        A run of L{read_data} ended: send the credit it freed.  Returns the
        bytes still waiting for the stream.
        """

    def watch_drain(self, stream_id: int, watch: bool) -> None:
        """Tell the stream (L{StreamEvents.drained}) when its queue drains, or stop telling it."""

    def stream_closed(self, stream_id: int) -> None:
        """The stream is gone: forget it."""


class StreamEvents(Protocol):
    """What the tunnel tells a stream."""

    stream_id: int

    def data_available(self, batch: bool = False) -> None:
        """
        Received bytes wait for the stream (L{StreamOwner.read_data}).
        C{batch}: the tunnel is handing over one read's frames; until it
        ends, nothing more arrives that the stream is not told of again, and
        its end sends the credit the stream frees (so L{data_consumed} is
        not needed after a take that emptied the stream's bytes).
        """

    def remote_ended(self) -> None:
        "The peer's FIN arrived (after whatever bytes wait)."

    def fin_sent(self) -> None:
        "Our FIN went out."

    def drained(self, queued: int) -> bool:
        "Some queued bytes were sent, C{queued} remain; returns True while the stream still waits for more to drain."

    def reset_by_peer(self, code: ErrorCode) -> None:
        "The peer reset the stream."

    def tunnel_lost(self, reason: Failure) -> None:
        "The tunnel is gone."

    def quantum_changed(self, quantum: int) -> None:
        "The most a stream's local connection should read per reactor turn is now C{quantum}."
