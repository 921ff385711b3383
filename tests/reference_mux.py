"""
The multiplexer's reference model: L{nova.mux.core.Multiplexer} with the
one-at-a-time operations the adapter does not use, kept here as the model its
batch paths are checked against (tests/test_fastpath_mux.py):

 - L{ReferenceMultiplexer.next_frame}: one frame at a time, as a frame
   object; C{pull} must write the same bytes, in the same order, as
   repeated C{next_frame} calls whose frames are encoded with
   L{nova.wire.frames.encode};
 - L{ReferenceMultiplexer.take}: one chunk at a time; C{take_upto} must
   hand over the same bytes and return the same credit;
 - L{ReferenceMultiplexer.receive} of a L{Data} frame (joined payload, one
   event); C{receive_data} with the decoder's pieces must have the same
   effect.

Tests that drive the multiplexer frame by frame use this class too.
"""

from __future__ import annotations

from nova.mux.core import TUNNEL_WINDOW_BUDGET, Buffer, DataAvailable, Event, Multiplexer, Role, WindowBudget
from nova.mux.defaults import DEFAULT_MAX_STREAMS
from nova.wire.frames import Data, Fin, Frame, OpenFail, OpenOk, Pong

_REPLY_TYPES = frozenset((Pong, OpenOk, OpenFail))


class ReferenceMultiplexer(Multiplexer):
    def __init__(
        self,
        role: Role,
        local_window: int,
        peer_window: int,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_window: int | None = None,
        tunnel_budget: int = TUNNEL_WINDOW_BUDGET,
        budget: WindowBudget | None = None,
    ) -> None:
        # The core takes every limit from its caller (the tunnel, from the
        # settings); frame-by-frame tests name only what they vary.
        super().__init__(
            role,
            local_window,
            peer_window,
            max_streams,
            local_window if max_window is None else max_window,
            tunnel_budget=tunnel_budget,
            budget=budget,
        )

    @property
    def queued_control(self) -> int:
        """Control frames of any kind queued and not yet taken."""
        return len(self._control or ())

    def next_frame(self, data_allowed: bool = True) -> Frame | None:
        """
        The next frame to write, or None.  Control frames come first; DATA
        (and the FIN that follows a stream's last DATA) is scheduled round
        robin across the streams, one frame at a time, each within its
        window.  With C{data_allowed} false only control frames are returned.
        """
        if self._control:
            frame = self._control.popleft()
            if type(frame) in _REPLY_TYPES:
                self._replies -= 1
            return frame
        if self._opens_queued:
            self._opens_sent()  # every OPEN went: early DATA may follow (as in pull)
        while data_allowed and self._ready:
            s = self._streams.get(self._ready.popleft())
            if s is None:
                continue
            s.scheduled = False
            out: list[Buffer] = []
            n = self._stream_frame(s, out)
            if n is None:
                continue
            self._schedule(s)
            return Data(s.stream_id, b"".join(bytes(p) for p in out[1:])) if n else Fin(s.stream_id)
        return None

    def take(self, stream_id: int, now: float | None = None) -> bytes | None:
        """The oldest chunk of the stream's inbox (its credit returned), or None if it is empty."""
        chunks = self.take_upto(stream_id, 1, now)
        return chunks[0] if chunks else None

    def receive(self, frame: Frame) -> list[Event]:
        """Any frame from the peer, DATA included (as one joined payload)."""
        if isinstance(frame, Data):
            result = self.receive_data(frame.stream_id, [frame.data], len(frame.data))
            if result is True:
                return [DataAvailable(frame.stream_id)]
            return [] if result is False else [result]
        return super().receive(frame)
