"""
The inbound half of a tunnel: frames from the decoder to the multiplexer,
and what it reports to the streams and to the tunnel.

One L{InboundDelivery} per tunnel connection, fed by the tunnel's
L{FrameDecoder.feed_into} (one call per DATA frame, one per other frame).
DATA received within one read batch (L{ReadBatches}: the TLS records of one
socket read) is handed to each stream once, at the end of the batch, so a
stream gets what arrived for it in one piece and frees its credit in one
WINDOW_UPDATE.  The streams that received least in the batch are told
first: a request that arrived behind a bulk transfer's data reaches its
local connection before this side spends its turn writing the bulk data
(docs/datapath.md, "Fairness: bulk next to interactive").  Stream events go to the streams (L{StreamEvents}); tunnel
events (open requests and answers, PONG, GOAWAY) to the tunnel
(L{DeliveryHooks}).  It does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from nova.wire.errors import ErrorCode, OpenFailReason
from nova.wire.frames import Frame
from nova.wire.text import untrusted

from .core import (
    DataAvailable,
    Event,
    GoAwayReceived,
    MembersReceived,
    Multiplexer,
    OpenAccepted,
    OpenRefused,
    PongReceived,
    StreamEnded,
    StreamRequested,
    StreamReset,
    WindowOpened,
)

if TYPE_CHECKING:
    from nova.mux.contract import StreamEvents


@runtime_checkable
class ReadBatches(Protocol):
    """
    A protocol that wants to know where one read's worth of C{dataReceived}
    calls begins and ends (L{nova.transport.fastpath.fast_tls_receive} calls
    these around the TLS records of one socket read).
    """

    def begin_read(self) -> None:
        "Several C{dataReceived} calls follow, from one read."

    def end_read(self) -> None:
        "The calls announced by L{begin_read} are done."


class DeliveryHooks(Protocol):
    """What inbound delivery reports to its tunnel."""

    def stream_requested(self, stream_id: int, host: str, port: int) -> None: ...

    def stream_opened(self, stream_id: int) -> None: ...

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None: ...

    def pong_received(self, opaque: bytes) -> None: ...

    def goaway_received(self, code: ErrorCode, message: str) -> None: ...

    def members_received(self, members: tuple[str, ...]) -> None:
        "MEMBERS (protocol version 2): the server's cluster members changed."

    def read_ended(self) -> None:
        "A read batch was delivered: send what it made ready, decide whether to keep reading."


class InboundDelivery:
    """
    Received frames, to the multiplexer and on to the streams.

    Invariants (1 by L{_check_invariants}, which the tests run between and
    inside reads; 2 to 4 are orders of events, checked by
    tests/test_inbound.py on what the streams and hooks are told):

     1. C{arrived} is C{None} outside a read batch (L{begin_read} ..
        L{end_read}) and a dict inside one.
     2. A stream id is in C{arrived} only if it had DATA in this batch that
        its stream has not been told about yet; outside a batch every
        stream has been told about all its DATA.
     3. A stream hears of its DATA before any other event of the same read
        (a FIN or a RST after DATA reaches the stream second): C{arrived} is
        emptied before any other frame is dispatched.
     4. Once C{closed}, nothing more is dispatched.
     5. At the end of a batch the streams are told in order of the DATA
        bytes they received in it, fewest first (ties: order of arrival).
    """

    def __init__(self, streams: Mapping[int, StreamEvents], hooks: DeliveryHooks) -> None:
        self._streams = streams
        self._hooks = hooks
        self.mux: Multiplexer | None = None
        self.closed = False
        self.bytes_received = 0  # DATA payload
        # Streams with DATA received in the current batch (see begin_read)
        # and how many bytes each received; a dict, for the order of arrival.
        self.arrived: dict[int, int] | None = None

    # ReadBatches.

    def begin_read(self) -> None:
        """
        Several reads' worth of frames follow (the records of one TLS read,
        say): received DATA is handed to the streams in L{end_read}, each
        stream's in one piece, and the credit it frees in one WINDOW_UPDATE.
        """
        if self.arrived is None:
            self.arrived = {}

    def end_read(self) -> None:
        """The frames announced by L{begin_read} have all been decoded."""
        arrived = self.arrived
        if arrived:
            if len(arrived) == 1:
                # One stream had DATA (a request, a reply): told here,
                # without _deliver_arrived's ordering.
                stream_id, _ = arrived.popitem()
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.data_available(True)
            if arrived:
                self._deliver_arrived()
        self.arrived = None
        self._hooks.read_ended()

    # The decoder's two callbacks (FrameDecoder.feed_into).

    def data_received(self, stream_id: int, pieces: list[bytes], length: int) -> bool:
        """A DATA frame from the decoder (its payload in pieces); False stops decoding."""
        if self.closed:
            return False
        self.bytes_received += length
        mux = self.mux
        assert mux is not None
        result = mux.receive_data(stream_id, pieces, length)
        if result is True:
            arrived = self.arrived
            if arrived is not None:
                arrived[stream_id] = arrived.get(stream_id, 0) + length
            else:
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.data_available()
        elif result is not False:
            self._deliver_arrived()
            self._dispatch([result])
        return not self.closed

    def frame_received(self, frame: Frame) -> bool:
        """Any other frame from the decoder, after the handshake; False stops decoding."""
        if self.closed:
            return False
        mux = self.mux
        assert mux is not None
        if self.arrived:
            self._deliver_arrived()  # DATA before (say) a FIN or an RST reaches the stream first
        self._dispatch(mux.receive(frame))
        return not self.closed

    def _dispatch(self, events: list[Event]) -> None:
        """Tell each event to the stream or to the tunnel it is for."""
        streams = self._streams
        hooks = self._hooks
        for event in events:
            if isinstance(event, DataAvailable):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.data_available()
            elif isinstance(event, WindowOpened):
                pass  # the flush after this read sends what the window now allows
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.remote_ended()
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_peer(event.code)
                else:
                    hooks.stream_refused(
                        event.stream_id, OpenRefused(event.stream_id, OpenFailReason.OTHER, f"reset: {event.code.name}")
                    )
            elif isinstance(event, StreamRequested):
                hooks.stream_requested(event.stream_id, event.host, event.port)
            elif isinstance(event, OpenAccepted):
                hooks.stream_opened(event.stream_id)
            elif isinstance(event, OpenRefused):
                hooks.stream_refused(event.stream_id, event)
            elif isinstance(event, PongReceived):
                hooks.pong_received(event.opaque)
            elif isinstance(event, GoAwayReceived):
                hooks.goaway_received(event.code, untrusted(event.message))
            elif isinstance(event, MembersReceived):
                hooks.members_received(event.members)

    def _deliver_arrived(self) -> None:
        """Tell the streams with DATA in this batch, fewest bytes first (invariant 5)."""
        arrived = self.arrived
        streams = self._streams
        while arrived:
            order = list(arrived) if len(arrived) == 1 else sorted(arrived, key=arrived.__getitem__)
            for stream_id in order:
                if arrived.pop(stream_id, None) is None:
                    continue  # told already, from inside another stream's turn
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.data_available(True)

    def _check_invariants(self, in_batch: bool = False) -> None:
        """Raise AssertionError if an invariant in the class docstring does not hold."""
        if in_batch:
            assert self.arrived is not None, "no batch open inside begin_read .. end_read"
        else:
            assert self.arrived is None, f"a batch left open: {self.arrived}"
