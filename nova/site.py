"""
The HTTP layer under NOVAS's admin port and NOVAC's probe port: a
twisted.web L{Site} whose responses all carry the browser security headers
and whose request bodies are refused past a small limit before they are read.

twisted.web reads a request's whole body before any resource runs, spooling
it to a temporary file past 100 KB, so a check in C{render} comes too late: a
client without a token could make the process read, and write to disk,
hundreds of MiB before its 401.  Here the check sits in the HTTP channel: a
declared C{Content-Length} over the limit is answered 413 as soon as the
headers end (before any C{100 Continue}); a chunked body is counted as it is
decoded and refused the moment it passes the limit.  Either way the
connection is closed at once, so nothing more is read, and an accepted body
is kept in memory: no request ever creates a temporary file.

The request line and headers are bounded by L{HTTPChannel} itself: each
line to C{MAX_LENGTH} (16 KiB), all of them together to C{totalHeadersSize}
(16 KiB) and their number to C{maxHeaders}; past these it answers 400 and
closes.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

MAX_REQUEST_BODY = 64 * 1024
"""
Largest request body either port accepts, in bytes.  The probes and today's
API take no body; the admin API's planned bodies (C{POST /api/v1/routes}) are
small JSON documents, for which 64 KiB is plenty.  Below twisted.web's
100 KB threshold, so an accepted body never reaches a temporary file.
"""

CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    b"require-trusted-types-for 'script'; trusted-types 'none'"
)
"""
The admin page loads its script and style sheet from NOVAS and talks only to
NOVAS; nothing inline runs, no page may frame it (clickjacking), and with
Trusted Types no script can turn a string into markup (agent-supplied names
and tags are shown as text only).
"""

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
"""Sent with every response of both ports, errors included."""


def _raw_response(status: bytes, body: bytes, content_type: bytes) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for answers the channel gives itself."""
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: " + content_type,
        b"content-length: " + str(len(body)).encode(),
        b"cache-control: no-store",
        b"connection: close",
    ]
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


TOO_LARGE = _raw_response(
    b"413 Content Too Large",
    json.dumps({"error": f"the request body is larger than {MAX_REQUEST_BODY} bytes"}).encode(),
    b"application/json",
)
BAD_REQUEST = _raw_response(b"400 Bad Request", b"", b"text/plain")


class BoundedChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that refuses a request body over L{MAX_REQUEST_BODY}
    before reading it: 413, then close.
    """

    refused = False

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        # self.length is the declared Content-Length, None when chunked.
        if self.length is not None and self.length > MAX_REQUEST_BODY:
            self.refuse_body()
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def refuse_body(self) -> None:
        """Answer 413 and close; read nothing more (idempotent)."""
        if self.refused:
            return
        self.refused = True
        self.transport.write(TOO_LARGE)  # type: ignore[union-attr]
        self.loseConnection()  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        # Bytes already taken off the socket before the close took effect.
        if not self.refused:
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        # A refused chunked body can still end inside the buffer being decoded.
        if not self.refused:
            super().allContentReceived()  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close without a word; answer like any bad request.
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own 400 (bad request line, headers too long or too many),
        # with the security headers like every other answer.
        self.transport.write(BAD_REQUEST)  # type: ignore[union-attr]
        self.loseConnection()  # type: ignore[no-untyped-call]


class BoundedRequest(Request):
    """A request that keeps its (small) body in memory and stamps the security headers on its response."""

    def __init__(self, channel: HTTPChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        self._body = BytesIO()
        self._too_large = False
        for name, value in SECURITY_HEADERS:
            self.responseHeaders.setRawHeaders(name, [value])

    def gotLength(self, length: int | None) -> None:
        # BoundedChannel has refused a declared length over the limit, and a
        # chunked body is stopped at the limit: memory always suffices.
        self.content = self._body

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large or self._body.tell() + len(data) > MAX_REQUEST_BODY:
            self._too_large = True
            channel = self.channel
            if isinstance(channel, BoundedChannel):
                channel.refuse_body()
            else:  # not under a BoundedSite: no 413 to give, but still no more reading
                channel.loseConnection()
            return
        self._body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Never run a resource with a body cut at the limit.
        if not self._too_large:
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]


class BoundedSite(Site):
    """A L{Site} of L{BoundedChannel}s and L{BoundedRequest}s, quiet in the log."""

    noisy = False
    requestFactory = BoundedRequest

    def __init__(self, resource: Resource, reactor: IReactorTime | None = None) -> None:
        super().__init__(resource, reactor=reactor)  # type: ignore[no-untyped-call]

    def protocol(self) -> BoundedChannel:  # type: ignore[override]
        # Plain HTTP/1.1 only: neither port offers TLS, so no HTTP/2 upgrade.
        return BoundedChannel()
