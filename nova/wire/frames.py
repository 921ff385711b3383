"""
Frame types and their payload layouts (protocol.md §1, §2, §5.4).

Each frame is an immutable value.  L{encode} turns one into a list of byte
strings (the header, then the payload pieces) meant for C{writeSequence}, so a
DATA payload is never copied; L{parse_payload} turns a validated header and its
payload back into a frame.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import ClassVar

from .errors import ErrorCode, FrameTooLarge, OpenFailReason, ProtocolError, UnsupportedVersion

VERSION = 1
# The highest protocol version this side speaks (protocol.md §7).  A tunnel's
# version is negotiated in the handshake (§4.2); until then frames are version 1.
MAX_VERSION = 2
HEADER = struct.Struct(">BBBBII")
HEADER_SIZE = HEADER.size  # 12

MAX_DATA_PAYLOAD = 65_536
MAX_CONTROL_PAYLOAD = 4_096
MAX_WINDOW = 2**31 - 1
MIN_INITIAL_WINDOW = 16_384
DEFAULT_INITIAL_WINDOW = 262_144
NONCE_SIZE = 32
MAC_SIZE = 32
PING_SIZE = 8
MAX_STREAM_ID = 2**32 - 1
# A cluster's member list (WELCOME and MEMBERS, version 2): ids as long as a
# host name, and few enough that the list always fits a control frame
# (64 ids of 60 bytes plus WELCOME's other fields stay under 4,096 bytes; a
# longer list is refused by encode, and the server trims it: see
# nova.server.members).
MAX_MEMBERS = 64
MAX_MEMBER_ID = 255


class FrameType(IntEnum):
    HELLO = 0x01
    AUTH = 0x02
    WELCOME = 0x03
    REJECT = 0x04
    OPEN = 0x10
    OPEN_OK = 0x11
    OPEN_FAIL = 0x12
    DATA = 0x20
    WINDOW_UPDATE = 0x21
    FIN = 0x22
    RST = 0x23
    PING = 0x30
    PONG = 0x31
    GOAWAY = 0x32
    MEMBERS = 0x33  # version 2


CONNECTION_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.AUTH,
        FrameType.WELCOME,
        FrameType.REJECT,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOAWAY,
        FrameType.MEMBERS,
    }
)

# The frame types that have a version-2 layout (protocol.md §7): AUTH, WELCOME
# and REJECT gained fields, MEMBERS is new.  Every other frame keeps its
# version-1 layout and its version byte 1 on a version-2 tunnel, so the data
# path is the same bytes in both versions.
V2_TYPES = frozenset({FrameType.AUTH, FrameType.WELCOME, FrameType.REJECT, FrameType.MEMBERS})

# Feature bits (protocol.md §4.2): AUTH (version 2) carries the agent's, WELCOME
# (version 2) the server's; a feature is used on a tunnel when both set its
# bit.  Unknown bits are ignored.
FEATURE_NONE = 0
# "Data may follow OPEN" (protocol.md §7.2): the server may send a stream's
# first DATA right after its OPEN, before OPEN_OK, up to EARLY_DATA_BUDGET
# bytes; the agent holds them until its connection to the target is up.
FEATURE_EARLY_DATA = 0x1
# The most DATA payload a server sends on a stream before OPEN_OK (and an
# agent holds for it), when the feature is used.  64 KiB holds the first
# flight of the protocols people tunnel (an HTTP request with its headers, a
# TLS ClientHello, a PostgreSQL startup packet, a Redis command) several times
# over, and is a quarter of the default initial window, so the rest of the
# window is left for the stream once it is open.  What an agent may be made to
# hold for streams it has not accepted is bounded by max_streams times this
# (1,024 streams: 64 MiB at most, against 256 MiB of open windows).
EARLY_DATA_BUDGET = 64 * 1024


def max_payload(frame_type: FrameType) -> int:
    """The largest payload a frame of this type may carry."""
    return MAX_DATA_PAYLOAD if frame_type is FrameType.DATA else MAX_CONTROL_PAYLOAD


class _Reader:
    """Reads fields off a payload; any shortfall is a PROTOCOL_ERROR."""

    def __init__(self, what: str, payload: bytes) -> None:
        self._what = what
        self._data = payload
        self._pos = 0

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(f"{self._what} payload is truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self) -> int:
        value: int = struct.unpack(">H", self._take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self._take(4))[0]
        return value

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def string(self) -> str:
        raw = self._take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self._what} carries a string that is not UTF-8") from None

    def members(self) -> tuple[str, ...]:
        count = self.u16()
        if count > MAX_MEMBERS:
            raise ProtocolError(f"{self._what} lists {count} members, more than {MAX_MEMBERS}")
        ids = tuple(self.string() for _ in range(count))
        if any(not 1 <= len(i.encode("utf-8")) <= MAX_MEMBER_ID for i in ids):
            raise ProtocolError(f"{self._what} lists a member id that is empty or over {MAX_MEMBER_ID} bytes")
        return ids

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{self._what} payload has {len(self._data) - self._pos} bytes left over")


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string field longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _members(ids: tuple[str, ...]) -> list[bytes]:
    if len(ids) > MAX_MEMBERS:
        raise ValueError(f"more than {MAX_MEMBERS} members")
    return [struct.pack(">H", len(ids)), *(_string(i) for i in ids)]


def _parse_opaque(what: str, payload: bytes, size: int) -> bytes:
    r = _Reader(what, payload)
    value = r.raw(size)
    r.end()
    return value


def _parse_code_message(what: str, payload: bytes) -> tuple[int, str]:
    r = _Reader(what, payload)
    code = r.u16()
    message = r.string()
    r.end()
    return code, message


@dataclass(frozen=True, slots=True)
class Hello:
    """
    C{offer} travels in the header's reserved byte (protocol.md §4.2): the
    highest version the server speaks; a version-1 server sends 0 there and
    a version-1 agent ignores it, so the payload is the same in every version.
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    version: ClassVar[int] = 1
    nonce: bytes
    offer: int = 1
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        return [self.nonce]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Hello:
        return cls(_parse_opaque("HELLO", payload, NONCE_SIZE))


@dataclass(frozen=True, slots=True)
class Auth:
    """In version 2 the agent's feature bits follow the tags (and so are MACed)."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH
    mac: bytes
    initial_window: int
    name: str
    tags: tuple[tuple[str, str], ...] = ()
    version: int = 1
    features: int = FEATURE_NONE
    stream_id: int = 0

    def body(self) -> bytes:
        """The payload after the MAC: what the MAC covers (protocol.md §4)."""
        parts = [struct.pack(">I", self.initial_window), _string(self.name)]
        parts.append(struct.pack(">H", len(self.tags)))
        for key, value in self.tags:
            parts.append(_string(key))
            parts.append(_string(value))
        if self.version >= 2:
            parts.append(struct.pack(">I", self.features))
        return b"".join(parts)

    def payload(self) -> list[bytes]:
        return [self.mac, self.body()]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes, version: int = 1) -> Auth:
        r = _Reader("AUTH", payload)
        mac = r.raw(MAC_SIZE)
        window = r.u32()
        name = r.string()
        tags = tuple((r.string(), r.string()) for _ in range(r.u16()))
        features = r.u32() if version >= 2 else FEATURE_NONE
        r.end()
        return cls(mac, window, name, tags, version, features)


@dataclass(frozen=True, slots=True)
class Welcome:
    """In version 2 the server's feature bits and the cluster's members follow the server id."""

    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    initial_window: int
    keepalive_ms: int
    server_id: str
    version: int = 1
    features: int = FEATURE_NONE
    members: tuple[str, ...] = ()
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        parts = [struct.pack(">II", self.initial_window, self.keepalive_ms), _string(self.server_id)]
        if self.version >= 2:
            parts += [struct.pack(">I", self.features), *_members(self.members)]
        return parts

    @classmethod
    def parse(cls, stream_id: int, payload: bytes, version: int = 1) -> Welcome:
        r = _Reader("WELCOME", payload)
        window, keepalive = r.u32(), r.u32()
        server_id = r.string()
        if version >= 2:
            features, members = r.u32(), r.members()
        else:
            features, members = FEATURE_NONE, ()
        r.end()
        return cls(window, keepalive, server_id, version, features, members)


@dataclass(frozen=True, slots=True)
class Reject:
    """
    In version 2 (an answer to a version-2 AUTH) the server's id follows the
    message: an agent that dials every member learns which one refused it,
    and so whether it landed on a member it already holds (NAME_IN_USE).
    """

    TYPE: ClassVar[FrameType] = FrameType.REJECT
    code: ErrorCode
    message: str
    version: int = 1
    server_id: str = ""
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        parts = [struct.pack(">H", self.code), _string(self.message)]
        if self.version >= 2:
            parts.append(_string(self.server_id))
        return parts

    @classmethod
    def parse(cls, stream_id: int, payload: bytes, version: int = 1) -> Reject:
        r = _Reader("REJECT", payload)
        code = r.u16()
        message = r.string()
        server_id = r.string() if version >= 2 else ""
        r.end()
        return cls(ErrorCode.lenient(code), message, version, server_id)


@dataclass(frozen=True, slots=True)
class Open:
    TYPE: ClassVar[FrameType] = FrameType.OPEN
    version: ClassVar[int] = 1
    stream_id: int
    host: str
    port: int

    def payload(self) -> list[bytes]:
        return [struct.pack(">H", self.port), _string(self.host)]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Open:
        r = _Reader("OPEN", payload)
        port = r.u16()
        host = r.string()
        r.end()
        if not host or port == 0:
            raise ProtocolError("OPEN needs a host and a non-zero port")
        return cls(stream_id, host, port)


@dataclass(frozen=True, slots=True)
class OpenOk:
    TYPE: ClassVar[FrameType] = FrameType.OPEN_OK
    version: ClassVar[int] = 1
    stream_id: int

    def payload(self) -> list[bytes]:
        return []

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> OpenOk:
        _Reader("OPEN_OK", payload).end()
        return cls(stream_id)


@dataclass(frozen=True, slots=True)
class OpenFail:
    TYPE: ClassVar[FrameType] = FrameType.OPEN_FAIL
    version: ClassVar[int] = 1
    stream_id: int
    reason: OpenFailReason
    message: str

    def payload(self) -> list[bytes]:
        return [struct.pack(">H", self.reason), _string(self.message)]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> OpenFail:
        reason, message = _parse_code_message("OPEN_FAIL", payload)
        return cls(stream_id, OpenFailReason.lenient(reason), message)


@dataclass(frozen=True, slots=True)
class Data:
    TYPE: ClassVar[FrameType] = FrameType.DATA
    version: ClassVar[int] = 1
    stream_id: int
    data: bytes

    def payload(self) -> list[bytes]:
        return [self.data]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Data:
        if not payload:
            raise ProtocolError("empty DATA frame")
        return cls(stream_id, payload)


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    TYPE: ClassVar[FrameType] = FrameType.WINDOW_UPDATE
    version: ClassVar[int] = 1
    stream_id: int
    increment: int

    def payload(self) -> list[bytes]:
        return [struct.pack(">I", self.increment)]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> WindowUpdate:
        r = _Reader("WINDOW_UPDATE", payload)
        increment = r.u32()
        r.end()
        if not 1 <= increment <= MAX_WINDOW:
            raise ProtocolError(f"WINDOW_UPDATE increment {increment} out of range")
        return cls(stream_id, increment)


@dataclass(frozen=True, slots=True)
class Fin:
    TYPE: ClassVar[FrameType] = FrameType.FIN
    version: ClassVar[int] = 1
    stream_id: int

    def payload(self) -> list[bytes]:
        return []

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Fin:
        _Reader("FIN", payload).end()
        return cls(stream_id)


@dataclass(frozen=True, slots=True)
class Rst:
    TYPE: ClassVar[FrameType] = FrameType.RST
    version: ClassVar[int] = 1
    stream_id: int
    code: ErrorCode

    def payload(self) -> list[bytes]:
        return [struct.pack(">H", self.code)]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Rst:
        r = _Reader("RST", payload)
        code = ErrorCode.lenient(r.u16())
        r.end()
        return cls(stream_id, code)


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING
    version: ClassVar[int] = 1
    opaque: bytes
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        return [self.opaque]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Ping:
        return cls(_parse_opaque("PING", payload, PING_SIZE))


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[FrameType] = FrameType.PONG
    version: ClassVar[int] = 1
    opaque: bytes
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        return [self.opaque]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Pong:
        return cls(_parse_opaque("PONG", payload, PING_SIZE))


@dataclass(frozen=True, slots=True)
class GoAway:
    TYPE: ClassVar[FrameType] = FrameType.GOAWAY
    version: ClassVar[int] = 1
    code: ErrorCode
    message: str
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        return [struct.pack(">H", self.code), _string(self.message)]

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> GoAway:
        code, message = _parse_code_message("GOAWAY", payload)
        return cls(ErrorCode.lenient(code), message)


@dataclass(frozen=True, slots=True)
class Members:
    """Version 2 only, NOVAS → NOVAC: the cluster's member ids, whenever they change (protocol.md §6.1)."""

    TYPE: ClassVar[FrameType] = FrameType.MEMBERS
    version: ClassVar[int] = 2
    members: tuple[str, ...]
    stream_id: int = 0

    def payload(self) -> list[bytes]:
        return _members(self.members)

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Members:
        r = _Reader("MEMBERS", payload)
        members = r.members()
        r.end()
        return cls(members)


Frame = (
    Hello
    | Auth
    | Welcome
    | Reject
    | Open
    | OpenOk
    | OpenFail
    | Data
    | WindowUpdate
    | Fin
    | Rst
    | Ping
    | Pong
    | GoAway
    | Members
)

_V1_PARSERS: dict[FrameType, Callable[[int, bytes], Frame]] = {
    cls.TYPE: cls.parse
    for cls in (Hello, Auth, Welcome, Reject, Open, OpenOk, OpenFail, Data, WindowUpdate, Fin, Rst, Ping, Pong, GoAway)
}
_V2_PARSERS: dict[FrameType, Callable[[int, bytes], Frame]] = {
    FrameType.AUTH: partial(Auth.parse, version=2),
    FrameType.WELCOME: partial(Welcome.parse, version=2),
    FrameType.REJECT: partial(Reject.parse, version=2),
    FrameType.MEMBERS: Members.parse,
}


def check_header(version: int, type_byte: int, stream_id: int, length: int, max_version: int = VERSION) -> FrameType:
    """
    Validate a frame header before any of its payload is buffered
    (protocol.md §1).  Returns the frame type or raises L{ProtocolError}.
    C{max_version} is the highest version the tunnel accepts so far: 1 until
    the handshake has agreed on more (§4.2).
    """
    if not VERSION <= version <= max_version:
        raise UnsupportedVersion(
            f"protocol version {version} is not supported (this side speaks {max_version})", version
        )
    try:
        frame_type = FrameType(type_byte)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{type_byte:02x}") from None
    if version >= 2 and frame_type not in V2_TYPES:
        raise ProtocolError(f"{frame_type.name} has no version-{version} layout")
    if version == 1 and frame_type is FrameType.MEMBERS:
        raise ProtocolError("MEMBERS is a version-2 frame")
    if frame_type in CONNECTION_TYPES:
        if stream_id != 0:
            raise ProtocolError(f"{frame_type.name} must be sent on stream 0, not {stream_id}")
    elif stream_id == 0:
        raise ProtocolError(f"{frame_type.name} needs a stream id")
    limit = max_payload(frame_type)
    if length > limit:
        raise FrameTooLarge(f"{frame_type.name} payload of {length} bytes exceeds the limit of {limit}")
    return frame_type


def parse_payload(
    frame_type: FrameType, stream_id: int, payload: bytes, version: int = VERSION, reserved: int = 0
) -> Frame:
    """
    Build the frame for a header already passed by L{check_header}; the
    header's C{version} picks the layout, and its C{reserved} byte is
    HELLO's version offer (protocol.md §4.2).
    """
    if version >= 2:
        return _V2_PARSERS[frame_type](stream_id, payload)
    frame = _V1_PARSERS[frame_type](stream_id, payload)
    if reserved > 1 and isinstance(frame, Hello):
        return Hello(frame.nonce, reserved)
    return frame


def encode(frame: Frame) -> list[bytes]:
    """
    Encode C{frame} as C{[header, *payload]}, for C{writeSequence}.

    Raises C{ValueError} for a frame this side must never send (one that the
    receiver would reject by §1's checks).
    """
    parts = frame.payload()
    length = sum(len(p) for p in parts)
    if length > max_payload(frame.TYPE):
        raise ValueError(f"{frame.TYPE.name} payload of {length} bytes is over the limit")
    if (frame.TYPE in CONNECTION_TYPES) != (frame.stream_id == 0):
        raise ValueError(f"{frame.TYPE.name} with stream id {frame.stream_id}")
    offer = frame.offer if isinstance(frame, Hello) and frame.offer > 1 else 0
    return [HEADER.pack(frame.version, frame.TYPE, 0, offer, frame.stream_id, length), *parts]


# DATA and FIN headers, packed on the send path (nova.mux.core) once per
# frame, without building a frame: the same bytes as C{encode} writes
# (HEADER with zero flags and reserved byte), the two constant leading bytes
# bound in once.
_STREAM_HEADER = struct.Struct(">HxxII")
_DATA_TAG = VERSION << 8 | FrameType.DATA
_FIN_TAG = VERSION << 8 | FrameType.FIN

data_header: Callable[[int, int], bytes] = partial(_STREAM_HEADER.pack, _DATA_TAG)
"""C{data_header(stream_id, length)}: the header of a DATA frame whose payload is sent as it is."""


def fin_header(stream_id: int) -> bytes:
    """The whole of a FIN frame on C{stream_id}."""
    return _STREAM_HEADER.pack(_FIN_TAG, stream_id, 0)
