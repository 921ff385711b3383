"""
A reference frame decoder, written for clarity and not for speed: the model
that L{nova.wire.codec.FrameDecoder} (whose one receive path is
C{feed_into}) is checked against in tests/test_fastpath_codec.py.

It buffers every byte in one C{bytearray} and builds each frame from it,
with the same checks in the same order (protocol.md §1): a header is checked
the moment it is complete, before any of its payload is buffered.
"""

from __future__ import annotations

from nova.wire.errors import ProtocolError
from nova.wire.frames import HEADER, HEADER_SIZE, Frame, FrameType, check_header, parse_payload


class ReferenceDecoder:
    """Bytes in, in any split; each complete frame out once; dead after the first error."""

    def __init__(self, max_version: int = 1) -> None:
        self.max_version = max_version
        self._buffer = bytearray()
        self._header: tuple[FrameType, int, int] | None = None
        self._layout = (1, 0)
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
                    version, type_byte, _flags, reserved, stream_id, length = HEADER.unpack(self._buffer)
                    self._buffer.clear()
                    checked = check_header(version, type_byte, stream_id, length, self.max_version)
                    self._header = (checked, stream_id, length)
                    self._layout = (version, reserved)
                frame_type, stream_id, length = self._header
                take = length - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < length:
                    break
                payload = bytes(self._buffer)
                self._buffer.clear()
                self._header = None
                frames.append(parse_payload(frame_type, stream_id, payload, *self._layout))
        except ProtocolError as e:
            self._error = e
            self._buffer.clear()
            raise
        return frames
