"""
Error and reason codes (protocol.md §3) and the typed errors that carry them.
"""

from __future__ import annotations

from enum import IntEnum

from nova.errors import NovaError


class ErrorCode(IntEnum):
    """Codes used in REJECT, RST and GOAWAY."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    UNSUPPORTED_VERSION = 5
    AUTH_FAILED = 6
    HANDSHAKE_TIMEOUT = 7
    INTERNAL_ERROR = 8
    CANCEL = 9
    BAD_NAME = 10
    REPLACED = 11
    SHUTDOWN = 12
    TOO_MANY_STREAMS = 13
    OVERLOADED = 14
    CONTROL_FLOOD = 15  # the peer asked for answers (PING, OPEN) faster than it read them
    NAME_IN_USE = 16  # REJECT: a live agent holds this name (it answered a ping)
    FORBIDDEN = 17  # REJECT: the token's scope does not allow this name or these tags

    @classmethod
    def lenient(cls, value: int) -> ErrorCode:
        """An unknown code received from a peer maps to INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class OpenFailReason(IntEnum):
    """Reasons carried by OPEN_FAIL."""

    REFUSED = 1
    DNS_FAILURE = 2
    TIMEOUT = 3
    DENIED = 4
    UNREACHABLE = 5
    OVERLOADED = 6
    OTHER = 7
    DRAINING = 8

    @classmethod
    def lenient(cls, value: int) -> OpenFailReason:
        """An unknown reason received from a peer maps to OTHER."""
        try:
            return cls(value)
        except ValueError:
            return cls.OTHER


class ProtocolError(NovaError):
    """
    The peer broke the protocol.  A connection error: the connection is
    ended with GOAWAY (or REJECT during the handshake) carrying C{code}.
    """

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class FlowControlError(ProtocolError):
    code = ErrorCode.FLOW_CONTROL_ERROR


class EarlyDataExceeded(ProtocolError):
    """
    The server sent more DATA on a stream before OPEN_OK than the early-data
    budget (protocol.md §7.2): what an agent holds for a stream it has not
    accepted is bounded, so more is a connection error, not a buffer.
    """


class UnsupportedVersion(ProtocolError):
    """A header whose version this side does not speak; C{version} is the byte received."""

    code = ErrorCode.UNSUPPORTED_VERSION

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class ControlFlood(ProtocolError):
    """
    The peer sent frames that each need an answer (PING, OPEN) faster than
    it read the answers, until the most answers a side keeps waiting
    (L{nova.mux.core.MAX_QUEUED_REPLIES}) were waiting.
    """

    code = ErrorCode.CONTROL_FLOOD
