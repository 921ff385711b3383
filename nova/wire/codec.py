"""
The incremental frame decoder: bytes in, frames out, no I/O.
"""

from __future__ import annotations

from .errors import ProtocolError
from .frames import HEADER, HEADER_SIZE, Frame, FrameType, check_header, parse_payload


class FrameDecoder:
    """
    Feed it bytes as they arrive, in any split; it returns each complete
    frame once.  Headers are checked the moment they are complete, so the
    buffer never holds more than one header plus one frame's allowed payload.
    After the first L{ProtocolError} the decoder is dead: every later call
    raises the same error.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: tuple[FrameType, int, int] | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        frames: list[Frame] = []
        view = memoryview(data)
        try:
            while view:
                if self._header is None:
                    take = HEADER_SIZE - len(self._buffer)
                    self._buffer += view[:take]
                    view = view[take:]
                    if len(self._buffer) < HEADER_SIZE:
                        break
                    version, type_byte, _flags, _reserved, stream_id, length = HEADER.unpack(self._buffer)
                    self._buffer.clear()
                    self._header = (check_header(version, type_byte, stream_id, length), stream_id, length)
                frame_type, stream_id, length = self._header
                take = length - len(self._buffer)
                if not self._buffer and len(view) >= take:
                    payload = bytes(view[:take])
                else:
                    self._buffer += view[:take]
                    if len(self._buffer) < length:
                        view = view[take:]
                        break
                    payload = bytes(self._buffer)
                    self._buffer.clear()
                view = view[take:]
                self._header = None
                frames.append(parse_payload(frame_type, stream_id, payload))
        except ProtocolError as e:
            self._error = e
            self._buffer.clear()
            raise
        return frames
