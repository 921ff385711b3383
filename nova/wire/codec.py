"""
The incremental frame decoder: bytes in, frames out, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ProtocolError
from .frames import HEADER, HEADER_SIZE, MAX_DATA_PAYLOAD, VERSION, Data, Frame, FrameType, check_header, parse_payload

_DATA = FrameType.DATA
_DATA_BYTE = int(FrameType.DATA)

# feed_into's callbacks; each returns False to stop decoding (the rest of the
# bytes are dropped: the connection is going away).
DataSink = Callable[[int, list[bytes], int], bool]
FrameSink = Callable[[Frame], bool]


class FrameDecoder:
    """
    Feed it bytes as they arrive, in any split; it returns each complete
    frame once.  Headers are checked the moment they are complete, so the
    buffer never holds more than one header plus one frame's allowed payload.
    After the first L{ProtocolError} the decoder is dead: every later call
    raises the same error.
    """

    def __init__(self, max_version: int = VERSION) -> None:
        self._buffer = bytearray()
        # The highest header version accepted (protocol.md §4.2): 1 until the
        # handshake agrees on more; the handshake code raises or lowers it.
        self.max_version = max_version
        self._header: tuple[FrameType, int, int] | None = None
        self._layout = (VERSION, 0)  # the pending non-DATA frame's version and reserved byte
        self._error: ProtocolError | None = None
        # feed_into() keeps a DATA payload as the pieces it arrived in.
        self._pieces: list[bytes] = []
        self._have = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer) + self._have

    def feed(self, data: bytes) -> list[Frame]:
        """
        The frames C{data} completes, in order: L{feed_into} with callbacks
        that collect them (a DATA payload joined into one byte string).  For
        tests and handshakes; the tunnel's receive path is L{feed_into}.
        """
        frames: list[Frame] = []
        append = frames.append

        def on_data(stream_id: int, pieces: list[bytes], length: int) -> bool:
            append(Data(stream_id, pieces[0] if len(pieces) == 1 else b"".join(pieces)))
            return True

        def on_frame(frame: Frame) -> bool:
            append(frame)
            return True

        self.feed_into(data, on_data, on_frame)
        return frames

    def feed_into(self, data: bytes, on_data: DataSink, on_frame: FrameSink) -> None:
        """
        Decode C{data}, handing each frame over as soon as it is complete: C{on_data(stream_id, pieces, length)} for
        DATA, whose payload is the concatenation of C{pieces} (the received
        byte strings themselves where a piece spans one whole read, so a
        payload is never copied twice), and C{on_frame(frame)} for the
        others.  A callback that returns False stops decoding.
        """
        if self._error is not None:
            raise self._error
        if not isinstance(data, bytes):
            data = bytes(data)
        # The loop runs for every read of every tunnel: it is written out
        # here rather than behind a call of its own, and a protocol error
        # is caught around it (free in CPython until raised).
        try:
            if self._header is None and not self._buffer and len(data) > HEADER_SIZE:
                # The read is exactly one whole DATA frame (a request, a reply):
                # the loop below would decode it the same way, with four times
                # the bytecode.
                version, type_byte, _flags, _reserved, stream_id, length = HEADER.unpack_from(data)
                if (
                    type_byte == _DATA_BYTE
                    and length == len(data) - HEADER_SIZE
                    and version == VERSION
                    and stream_id
                    and length <= MAX_DATA_PAYLOAD
                ):
                    on_data(stream_id, [data[HEADER_SIZE:]], length)
                    return
            buf = self._buffer
            pos, end = 0, len(data)
            header = self._header
            while True:
                if header is None:
                    if buf:
                        take = HEADER_SIZE - len(buf)
                        buf += data[pos : pos + take]
                        pos += take
                        if len(buf) < HEADER_SIZE:
                            return
                        version, type_byte, _flags, reserved, stream_id, length = HEADER.unpack(buf)
                        buf.clear()
                    elif end - pos >= HEADER_SIZE:
                        version, type_byte, _flags, reserved, stream_id, length = HEADER.unpack_from(data, pos)
                        pos += HEADER_SIZE
                    else:
                        if pos < end:
                            buf += data[pos:]
                        return
                    if type_byte == _DATA_BYTE and version == VERSION and stream_id and 0 < length <= MAX_DATA_PAYLOAD:
                        frame_type = _DATA
                    else:
                        frame_type = check_header(version, type_byte, stream_id, length, self.max_version)
                        if frame_type is _DATA:
                            raise ProtocolError("empty DATA frame")
                        self._layout = (version, reserved)
                    header = self._header = (frame_type, stream_id, length)
                else:
                    frame_type, stream_id, length = header
                avail = end - pos
                if frame_type is _DATA:
                    need = length - self._have
                    if avail < need:
                        if avail:
                            self._pieces.append(data if avail == end else data[pos:])
                            self._have += avail
                        return
                    piece = data if need == end else data[pos : pos + need]
                    pos += need
                    pieces = self._pieces
                    if pieces:
                        pieces.append(piece)
                        self._pieces, self._have = [], 0
                    else:
                        pieces = [piece]
                    header = self._header = None
                    if not on_data(stream_id, pieces, length):
                        return
                else:
                    if not buf and avail >= length:
                        payload = data[pos : pos + length]
                        pos += length
                    else:
                        take = length - len(buf)
                        buf += data[pos : pos + take]
                        pos += take
                        if len(buf) < length:
                            return
                        payload = bytes(buf)
                        buf.clear()
                    header = self._header = None
                    if not on_frame(parse_payload(frame_type, stream_id, payload, *self._layout)):
                        return
                if pos >= end:
                    return
        except ProtocolError as e:
            self._error = e
            self._buffer.clear()
            self._pieces, self._have = [], 0
            raise
