"""
Attacks on the two HTTP ports: NOVAS's admin port and NOVAC's probe port.

A request body is refused before it is read (no temporary file, no disk,
bounded memory, the port keeps answering); headers and the request line are
bounded; NOVAC's probe port serves the two probes and nothing else; every
answer carries the browser security headers and a CSP without inline script.

The in-memory tests drive L{nova.site.BoundedSite} over a
L{StringTransport}; the integration tests attack real processes on loopback,
each parametrized over both ports so one failure never hides another.

The tests that start processes or open real sockets are in
tests/test_attack_http_integration.py.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nova.probes import probe_resource
from nova.site import MAX_REQUEST_BODY, SECURITY_HEADERS, BoundedRequest, BoundedSite

MiB = 1024 * 1024


# --- In memory ---------------------------------------------------------------


class _Recorder(Resource):
    """Answers any method with 200 and records the bodies it was given."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        return b"ok"


class _Conn:
    def __init__(self, resource: Resource) -> None:
        self.site = BoundedSite(resource, reactor=Clock())
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def feed(self, data: bytes, pieces: list[int] | None = None) -> None:
        """Deliver C{data}, split at the given sizes (the rest in one piece)."""
        for size in pieces or []:
            if not data:
                break
            self.channel.dataReceived(data[:size])
            data = data[size:]
        if data:
            self.channel.dataReceived(data)

    def close(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))

    @property
    def status(self) -> bytes:
        status: bytes = self.transport.value().split(b"\r\n", 1)[0]
        return status

    def headers(self) -> dict[bytes, bytes]:
        head = self.transport.value().split(b"\r\n\r\n", 1)[0]
        lines = head.split(b"\r\n")[1:]
        return {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}


def _post(body_headers: bytes, path: bytes = b"/") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + body_headers + b"\r\n"


def _chunked(body: bytes, chunk: int) -> bytes:
    out = b""
    for i in range(0, len(body), chunk):
        piece = body[i : i + chunk]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


class BoundedSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files: list[object] = []

        def no_temporary_files(*args: Any, **kwargs: Any) -> Any:
            self.files.append(args)
            raise AssertionError("a request body went to a temporary file")

        self.patch(tempfile, "TemporaryFile", no_temporary_files)

    def test_a_declared_length_over_the_limit_is_refused_after_the_headers(self) -> None:
        recorder = _Recorder()
        c = _Conn(recorder)
        c.feed(_post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % (300 * MiB)))
        self.assertEqual(c.status, b"HTTP/1.1 413 Content Too Large")
        self.assertNotIn(b"100 Continue", c.transport.value())
        self.assertTrue(c.transport.disconnecting)
        # Bytes taken off the socket before the close are dropped, not read.
        answered = c.transport.value()
        c.feed(b"x" * (2 * MAX_REQUEST_BODY))
        self.assertEqual(c.transport.value(), answered)
        c.close()
        self.assertEqual(recorder.bodies, [])

    def test_a_chunked_body_is_refused_the_moment_it_passes_the_limit(self) -> None:
        recorder = _Recorder()
        c = _Conn(recorder)
        # The whole body, terminating chunk included, in one delivery: it is
        # still refused, and the resource never runs.
        c.feed(_post(b"Transfer-Encoding: chunked\r\n") + _chunked(b"y" * (MAX_REQUEST_BODY + 1), 4096))
        self.assertEqual(c.status, b"HTTP/1.1 413 Content Too Large")
        self.assertTrue(c.transport.disconnecting)
        c.close()
        self.assertEqual(recorder.bodies, [])

    def test_a_bounded_request_on_a_plain_channel_still_never_runs_a_cut_body(self) -> None:
        recorder = _Recorder()
        site = Site(recorder, requestFactory=BoundedRequest, reactor=Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(_post(b"Transfer-Encoding: chunked\r\n") + _chunked(b"y" * (MAX_REQUEST_BODY + 1), 4096))
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.bodies, [])

    def test_bodies_up_to_the_limit_reach_the_resource_from_memory(self) -> None:
        for framing in ("length", "chunked"):
            recorder = _Recorder()
            c = _Conn(recorder)
            body = os.urandom(MAX_REQUEST_BODY)
            if framing == "length":
                c.feed(_post(b"Content-Length: %d\r\n" % len(body)) + body)
            else:
                c.feed(_post(b"Transfer-Encoding: chunked\r\n") + _chunked(body, 1000))
            self.assertEqual(c.status, b"HTTP/1.1 200 OK", framing)
            self.assertEqual(recorder.bodies, [body], framing)
            c.close()

    @settings(max_examples=60, deadline=None)
    @given(
        size=st.one_of(st.integers(0, 64), st.integers(MAX_REQUEST_BODY - 64, MAX_REQUEST_BODY + 64)),
        chunked=st.booleans(),
        chunk=st.integers(1, 70_000),
        pieces=st.lists(st.integers(1, 90_000), max_size=8),
    )
    def test_accepted_if_and_only_if_within_the_limit_however_it_arrives(
        self, size: int, chunked: bool, chunk: int, pieces: list[int]
    ) -> None:
        recorder = _Recorder()
        c = _Conn(recorder)
        body = b"z" * size
        if chunked:
            request = _post(b"Transfer-Encoding: chunked\r\n") + _chunked(body, chunk)
        else:
            request = _post(b"Content-Length: %d\r\n" % size) + body
        c.feed(request, pieces)
        if size <= MAX_REQUEST_BODY:
            self.assertEqual(c.status, b"HTTP/1.1 200 OK")
            self.assertEqual(recorder.bodies, [body])
        else:
            self.assertEqual(c.status, b"HTTP/1.1 413 Content Too Large")
            self.assertEqual(recorder.bodies, [])
            self.assertTrue(c.transport.disconnecting)
        c.close()
        self.assertEqual(self.files, [])

    def test_every_answer_carries_the_security_headers(self) -> None:
        requests = {
            b"200": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"404": b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
            b"405": b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"413": _post(b"Content-Length: %d\r\n" % (MAX_REQUEST_BODY + 1)),
            b"400": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 * MiB) + b"\r\n\r\n",
        }
        for code, request in requests.items():
            c = _Conn(probe_resource(lambda: True, "x"))
            c.feed(request)
            self.assertTrue(c.status.startswith(b"HTTP/1.1 " + code), (code, c.status))
            headers = c.headers()
            for name, value in SECURITY_HEADERS:
                self.assertEqual(headers.get(name), value, (code, name))
            c.close()

    def test_a_megabyte_of_headers_is_refused_at_sixteen_kilobytes(self) -> None:
        for request in (
            b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * (MiB // 8) + b"\r\n",  # many short lines
            b"GET /" + b"a" * MiB + b" HTTP/1.1\r\n\r\n",  # one long request line
        ):
            recorder = _Recorder()
            c = _Conn(recorder)
            # Delivered in socket-sized reads: the channel stops consuming at the limit.
            taken = 0
            for i in range(0, len(request), 65536):
                if c.transport.disconnecting:
                    break
                c.channel.dataReceived(request[i : i + 65536])
                taken += 65536
            self.assertEqual(c.status, b"HTTP/1.1 400 Bad Request")
            self.assertTrue(c.transport.disconnecting)
            self.assertLessEqual(taken, 2 * 65536)
            self.assertEqual(recorder.bodies, [])
            c.close()


# --- Real processes -----------------------------------------------------------
