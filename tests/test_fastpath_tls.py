"""
FrameWriter's raw TLS write, when OpenSSL does not take a frame whole: a
partial write, a write that must wait for the peer (WANT_READ, as during a
renegotiation or a key update), a failed connection.  The common case (one
frame that fits one record, written with one SSL_write) is joined and
written inline; these are the paths behind it, driven with a fake
connection so that each outcome of SSL_write can be chosen.
"""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL

from nova.transport import fastpath, private
from nova.transport.fastpath import FrameWriter

HEADER = b"H" * 12


class FakeConnection:
    """A pyOpenSSL Connection's private face, as FrameWriter uses it."""

    def __init__(self, error: type[Exception] | None = None) -> None:
        self._ssl = object()
        self._from_ssl = object()
        self._into_ssl = object()
        self.error = error
        self.raised: list[int] = []

    def _raise_ssl_error(self, ssl: object, result: int) -> None:
        self.raised.append(result)
        if self.error is not None:
            raise self.error()


class FakeTLS:
    """A TLSMemoryBIOProtocol's private face, as FrameWriter uses it."""

    def __init__(self, conn: FakeConnection) -> None:
        self._handshakeDone = True
        self._lostTLSConnection = False
        self._appSendBuffer: list[bytes] = []
        self._tlsConnection = conn
        self.disconnecting = False
        self._producer = None
        self.transport = self
        self.buffered: list[bytes] = []
        self.failed: list[Any] = []
        self.written: list[bytes] = []

    def _bufferedWrite(self, data: bytes) -> None:
        self.buffered.append(data)

    def _tlsShutdownFinished(self, failure: Any) -> None:
        self.failed.append(failure)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


class FakeOpenSSL:
    """SSL_write and BIO_read: each SSL_write returns the next of C{results} (None: all of it); the BIO echoes."""

    def __init__(self, results: list[int | None]) -> None:
        self.results = results
        self.calls: list[bytes] = []
        self.pending = b""

    def SSL_write(self, ssl: object, data: Any, size: int) -> int:
        data = bytes(private.ffi_buffer(data, size)) if not isinstance(data, bytes) else data[:size]
        result = self.results.pop(0) if self.results else None
        n = size if result is None else result
        self.calls.append(data)
        if n > 0:
            self.pending += data[:n]
        return n

    def BIO_read(self, bio: object, out: Any, size: int) -> int:
        n = min(size, len(self.pending))
        if n:
            private.ffi_buffer(out, n)[:] = self.pending[:n]
            self.pending = self.pending[n:]
        return n


@pytest.fixture
def openssl(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(results: list[int | None]) -> FakeOpenSSL:
        fake = FakeOpenSSL(results)
        monkeypatch.setattr(fastpath, "_SSL_write", fake.SSL_write)
        monkeypatch.setattr(fastpath, "_BIO_read", fake.BIO_read)
        return fake

    return install


def _writer(conn: FakeConnection) -> tuple[FrameWriter, FakeTLS]:
    tls = FakeTLS(conn)
    writer = FrameWriter.__new__(FrameWriter)
    writer.transport = tls
    writer.tcp = None
    writer._tls = tls
    writer._aggregator = None
    writer._conn = conn
    writer._ssl, writer._from_ssl = conn._ssl, conn._from_ssl
    return writer, tls


def test_a_frame_that_fits_one_record_is_one_ssl_write(openssl: Any) -> None:
    fake = openssl([])
    writer, tls = _writer(FakeConnection())
    writer.write([HEADER, memoryview(b"payload")])
    assert fake.calls == [HEADER + b"payload"]
    assert tls.written == [HEADER + b"payload"]


def test_a_partial_write_sends_the_rest_in_order(openssl: Any) -> None:
    fake = openssl([5, None])
    writer, tls = _writer(FakeConnection())
    writer.write([HEADER, b"payload"])
    assert fake.calls == [HEADER + b"payload", (HEADER + b"payload")[5:]]
    assert b"".join(tls.written) == HEADER + b"payload"


def test_a_write_that_must_wait_for_the_peer_is_buffered_whole(openssl: Any) -> None:
    fake = openssl([-1])
    conn = FakeConnection(SSL.WantReadError)
    writer, tls = _writer(conn)
    writer.write([HEADER, b"payload"])
    assert conn.raised == [-1]  # the error SSL_write returned, raised as pyOpenSSL raises it
    assert tls.buffered == [HEADER + b"payload"]  # kept for Twisted to write once the peer speaks
    assert tls.written == [] and not tls.failed
    assert fake.calls == [HEADER + b"payload"]  # not written twice


def test_a_failed_connection_is_handed_to_twisted_and_nothing_is_sent(openssl: Any) -> None:
    openssl([-1])
    conn = FakeConnection(SSL.Error)
    writer, tls = _writer(conn)
    writer.write([HEADER, b"payload"])
    assert len(tls.failed) == 1 and tls.failed[0].check(SSL.Error)
    assert tls.written == [] and tls.buffered == []


def test_frames_larger_than_a_record_take_the_general_path(openssl: Any) -> None:
    fake = openssl([])
    writer, tls = _writer(FakeConnection())
    payload = bytes(range(256)) * 100  # 25,600 bytes: more than one record
    writer.write([HEADER, memoryview(payload)])
    assert b"".join(fake.calls) == HEADER + payload
    assert all(len(call) <= fastpath._RECORD for call in fake.calls)
    assert b"".join(tls.written) == HEADER + payload


def test_several_small_frames_are_one_ssl_write(openssl: Any) -> None:
    # A stream's OPEN and its first DATA (or a WINDOW_UPDATE and a reply)
    # fit one record: one SSL_write, in order.
    fake = openssl([])
    writer, tls = _writer(FakeConnection())
    parts: list[Any] = [b"OPEN-frame", HEADER, memoryview(b"first bytes")]
    writer.write(parts)
    assert fake.calls == [b"OPEN-frame" + HEADER + b"first bytes"]
    assert tls.written == fake.calls
