"""
Writing without the extra reactor turn.

Twisted's TCP transport never writes in C{write()}: it queues the bytes, asks
the reactor for writability and sends them on a later turn (two C{epoll_ctl}
calls and one more C{epoll_wait} for every write).  Its TLS transport
(C{BufferingTLSTransport}) adds a turn of its own: it holds small writes until
a C{callLater(0)}, then encrypts in 16 KiB slices, each read out of the memory
BIO and queued separately.

The relay writes a lot and latency matters, so these helpers write the way
Twisted would, only sooner:

- L{write_tcp}: when nothing is queued on a TCP transport, C{send()} on its
  socket now; whatever the kernel does not take is queued by the transport as
  usual (so its producer pausing, half-close and error handling are
  unchanged).
- L{FrameWriter}: a tunnel's frames, encrypted in one C{SSL_write} per batch
  and handed to the TCP socket with L{write_tcp}.  Anything unusual (the TLS
  handshake not finished, Twisted holding data of its own, a transport that is
  neither TLS-over-TCP nor TCP) takes Twisted's own path, in order.

Every private Twisted and pyOpenSSL name used here is listed, and checked per
transport class, in L{nova.transport.private}: a class that lacks one gets
Twisted's public path.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import tcp
from twisted.python.failure import Failure

from nova.mux.core import Buffer
from nova.mux.inbound import ReadBatches
from nova.transport import private
from nova.transport.private import SSL_ERROR_WANT_READ as _WANT_READ
from nova.transport.private import BIO_read as _BIO_read
from nova.transport.private import BIO_write as _BIO_write
from nova.transport.private import SSL_get_error as _SSL_get_error
from nova.transport.private import SSL_read as _SSL_read
from nova.transport.private import SSL_write as _SSL_write
from nova.transport.private import ffi_buffer as _ffi_buffer
from nova.transport.private import ffi_from_buffer as _ffi_from_buffer
from nova.transport.private import ffi_new as _ffi_new
from nova.transport.private import ffi_unpack as _ffi_unpack

try:  # public pyOpenSSL names; absent without pyOpenSSL
    from OpenSSL.SSL import Error as _SSLError
    from OpenSSL.SSL import WantReadError as _WantReadError
except ImportError:  # pragma: no cover
    pass

# One record's plaintext at most (TLS: 16 KiB), and the encrypted output of
# one flush: shared by every tunnel of the process (the reactor is one
# thread, and each is copied or sent before anything else runs).
_RECORD = 16 * 1024
_OUT_SIZE = 512 * 1024
_IN: Any = _ffi_new("char[]", _RECORD) if private.OPENSSL_AVAILABLE else None
_OUT: Any = _ffi_new("char[]", _OUT_SIZE) if private.OPENSSL_AVAILABLE else None


# TCP_NOTSENT_LOWAT (Linux 3.12+): keep at most this much unsent data in the
# kernel's queue of the tunnel's socket, so that what is sent next is decided
# by the multiplexer's scheduler, not by the order of a deep socket buffer.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT = 128 * 1024

# At most this many buffers in one sendmsg() (IOV_MAX is 1024 on Linux).
_MAX_IOV = 512


# The connections handed to the functions below come from private.fast_tcp or
# private.tcp_under: their class has every name private.TCP_NAMES lists.


def _idle(t: tcp.Connection) -> bool:
    """Nothing queued, and the connection open for writing."""
    return bool(
        not t._tempDataBuffer
        and not t.dataBuffer
        and t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
    )


def write_tcp(t: tcp.Connection, data: Buffer) -> None:
    """
    C{t.write(data)}, but sent at once when nothing else is queued.  A
    socket error (EAGAIN, or one the transport then finds and reports)
    leaves the data to the transport.
    """
    # _idle(t), inline: this runs for every write to a socket.
    sent = 0
    if (
        not t._tempDataBuffer
        and not t.dataBuffer
        and t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
    ):
        try:
            sent = t.socket.send(data)
        except OSError:
            pass
    if sent < len(data):
        rest = data[sent:] if sent else data
        t.write(rest if isinstance(rest, bytes) else bytes(rest))


def lose_write_tcp(t: tcp.Connection) -> None:
    """
    C{t.loseWriteConnection()}, but the write side is shut at once when
    nothing is queued.  Twisted first waits for the socket to be writable
    (an C{epoll_ctl} each way, a reactor turn and an empty C{send}) only to
    find the buffer empty and shut it then: what C{doWrite} does in that
    case is done here, in the same order.  A producer that C{doWrite} would
    resume first (a pull producer, or a paused one) takes Twisted's path.
    """
    if _idle(t) and (t.producer is None or (t.streamingProducer and not t.producerPaused)):
        t._writeDisconnecting = True
        t._writeDisconnected = True
        t._closeWriteConnection()
        return
    t.loseWriteConnection()


def writev_tcp(t: tcp.Connection, parts: Sequence[Buffer]) -> None:
    """C{t.writeSequence(parts)}, but sent at once when nothing else is queued."""
    if len(parts) == 1:
        write_tcp(t, parts[0])
        return
    if _idle(t) and len(parts) <= _MAX_IOV:
        try:
            sent = t.socket.sendmsg(parts)
        except OSError:
            sent = 0
        if sent:
            rest: list[Buffer] = []
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                elif sent:
                    rest.append(part[sent:])
                    sent = 0
                else:
                    rest.append(part)
            parts = rest
            if not parts:
                return
    t.write(b"".join(parts))


def record_chunks(parts: Sequence[Buffer], record: int = _RECORD) -> list[Buffer]:
    """
    C{parts} regrouped for C{SSL_write}: every chunk but the last is a
    multiple of one TLS record, so the records are full (one write of a
    12-byte header would be a record of its own), and a large payload goes
    in whole records as a view of itself: only the pieces that share a
    record with a header are copied, not the payload.
    """
    if len(parts) == 1:
        return [parts[0]]
    chunks: list[Buffer] = []
    pending: list[Buffer] = []
    pending_len = 0
    for part in parts:
        n = len(part)
        if n < record:
            pending.append(part)
            pending_len += n
            continue
        view = part if isinstance(part, memoryview) else memoryview(part)
        fill = -pending_len % record if pending_len else 0
        if pending:
            if fill:
                pending.append(view[:fill])
            chunks.append(b"".join(pending))
            pending = []
        whole = (n - fill) // record * record
        if whole:
            chunks.append(view[fill : fill + whole])
        rest = n - fill - whole
        pending_len = rest
        if rest:
            pending.append(view[fill + whole :])
    if pending:
        chunks.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return chunks


def raw_tls_supported(tls: Any) -> bool:
    """Whether L{FrameWriter} can take the raw path for C{tls} (L{private.fast_tls})."""
    return private.fast_tls(tls)


def set_notsent_lowat(t: tcp.Connection | None, value: int = NOTSENT_LOWAT) -> None:
    if t is None:
        return
    try:
        t.socket.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, value)
    except (OSError, AttributeError):
        pass


# TCP_USER_TIMEOUT (Linux 2.6.37+): how long sent data may stay unacknowledged
# before the kernel gives the connection up.  Without it a blackholed tunnel
# retransmits with exponential backoff for about 15 minutes (tcp_retries2),
# and a link that comes back waits for the next backed-off retransmission.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def set_user_timeout(t: tcp.Connection | None, seconds: float) -> bool:
    """
    Give a tunnel's connection up in the kernel once sent data has gone
    unacknowledged for C{seconds} (the tunnel's dead timeout), so both ends
    and the kernel agree on when a blackholed peer is dead.  False where the
    option cannot be set (not Linux, not TCP).
    """
    if t is None or seconds <= 0:
        return False
    try:
        t.socket.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))
    except (OSError, AttributeError):
        return False
    return True


class FrameWriter:
    """
    Writes a tunnel's encoded frames to its transport, the fastest safe way
    for that transport.  Everything written goes out in order.

    Over Twisted's TLS transport (when L{raw_tls_supported}) it encrypts with
    one C{SSL_write} per record-sized chunk and moves the records to the
    socket itself, and it takes over the reading side too
    (L{fast_tls_receive}), which is where most of a small request's TLS cost
    went.  Over plain TCP it writes with L{writev_tcp}; over anything else
    (a test's fake transport, say), with C{writeSequence}.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.tcp = private.tcp_under(transport)
        self._tls = transport if raw_tls_supported(transport) else None
        # BufferingTLSTransport's buffer of small writes, if it has one (it
        # is made with the transport), and the OpenSSL connection (made with
        # the connection): looked up once, not per write.
        self._aggregator: Any = None
        self._conn: Any = None
        self._ssl: Any = None
        self._from_ssl: Any = None
        if self._tls is not None:
            if self._tls.transport is not self.tcp:
                self.tcp = None  # TLS over something other than TCP
            self._aggregator = getattr(self._tls, "_aggregator", None)
            self._conn = conn = self._tls._tlsConnection
            self._ssl, self._from_ssl = conn._ssl, conn._from_ssl
            fast_tls_receive(self._tls, self.tcp)
        elif transport is not self.tcp:
            self.tcp = None

    @property
    def raw_tls(self) -> bool:
        """Whether the raw TLS path is in use."""
        return self._tls is not None

    def write(self, parts: list[Buffer]) -> None:
        tls = self._tls
        if tls is None:
            if self.tcp is not None:
                writev_tcp(self.tcp, parts)
            else:
                # Twisted's transports take byte strings only; pull() hands
                # over views of long writes.
                self.transport.writeSequence([p if type(p) is bytes else bytes(p) for p in parts])
            return
        if (
            not tls._handshakeDone
            or tls._lostTLSConnection
            or tls._appSendBuffer
            or (tls.disconnecting and tls._producer is None)
        ):
            tls.writeSequence(parts)  # joins them: views are fine
            return
        aggregator = self._aggregator
        if aggregator is not None and aggregator._buffer:
            aggregator.flush()  # earlier writes (the handshake's) go first
            if tls._appSendBuffer:
                tls.writeSequence(parts)
                return
        conn = self._conn
        if (len(parts[0]) + len(parts[1]) if len(parts) == 2 else sum(map(len, parts))) <= _RECORD:
            # Frames that fit one record (a request, a reply; a stream's
            # OPEN and first DATA): joined, encrypted and sent here;
            # record_chunks, _encrypt and _send_bio would do the same with
            # three calls more.
            chunk = b"".join(parts)
            size = len(chunk)
            n = _SSL_write(self._ssl, chunk, size)
            if n != size and not _encrypt(tls, conn, [chunk[n:]] if n > 0 else [chunk], n):
                return
        elif not _encrypt(tls, conn, record_chunks(parts)):
            return
        n = _BIO_read(self._from_ssl, _OUT, _OUT_SIZE)
        if n > 0:
            t = self.tcp
            if t is not None and n < _OUT_SIZE:
                write_tcp(t, _ffi_buffer(_OUT, n))  # _send_bio's common case: all of it, in one send
            else:
                _send_bio(conn, tls.transport, t, n)


def _encrypt(tls: Any, conn: Any, chunks: list[Buffer], failed: int | None = None) -> bool:
    """
    C{chunks} through C{SSL_write}, in order, as C{TLSMemoryBIOProtocol}
    would: what OpenSSL cannot take before the peer speaks is buffered by
    Twisted; False if the connection failed (Twisted was told).  C{failed}:
    what C{SSL_write} just returned for the first chunk, if it was not
    written at all (its error is raised and handled here).
    """
    ssl = conn._ssl
    for i, chunk in enumerate(chunks):
        size, done = len(chunk), 0
        try:
            if failed is not None:
                code, failed = failed, None
                conn._raise_ssl_error(ssl, code)
            while done < size:
                # SSL_write itself (pyOpenSSL's send() costs three calls
                # more); a failure is raised as pyOpenSSL raises it.
                piece = chunk[done:] if done else chunk
                n = _SSL_write(ssl, piece if type(piece) is bytes else _ffi_from_buffer(piece), len(piece))
                if n <= 0:
                    conn._raise_ssl_error(ssl, n)
                done += n
        except _WantReadError:
            # As TLSMemoryBIOProtocol does: keep the rest until the peer speaks.
            tls._bufferedWrite(b"".join([chunk[done:], *chunks[i + 1 :]]))
            break
        except _SSLError:
            tls._tlsShutdownFinished(Failure())
            return False
    return True


def _send_bio(conn: Any, transport: Any, t: tcp.Connection | None, n: int) -> None:
    """
    What OpenSSL wrote to the connection's memory BIO, to C{transport}: the
    C{n} bytes the caller just read into the shared buffer (C{BIO_read},
    done inline where the common answer is "nothing"), then the rest.
    Twisted's C{_flushSendBIO}, without an exception when there is nothing
    and without a copy when the socket takes it all at once.
    """
    bio = conn._from_ssl
    out = _OUT
    while True:
        view = _ffi_buffer(out, n)
        if t is not None:
            write_tcp(t, view)  # what is not sent at once is copied out of the shared buffer
        else:
            transport.write(view[:])
        if n < _OUT_SIZE:
            return
        n = _BIO_read(bio, out, _OUT_SIZE)
        if n <= 0:
            return


def _nothing() -> None:
    pass


def _read_batches(protocol: object) -> tuple[Callable[[], None], Callable[[], None]]:
    """C{protocol}'s L{ReadBatches} methods, or two that do nothing if it has none."""
    if isinstance(protocol, ReadBatches):
        return protocol.begin_read, protocol.end_read
    return _nothing, _nothing


def _deliver_batch(
    tls: Any, records: list[bytes], deliver: Callable[[bytes], None], begin: Callable[[], None], end: Callable[[], None]
) -> None:
    """The records of one read, to the protocol as one read batch (L{ReadBatches}), while the connection lasts."""
    begin()
    try:
        for chunk in records:
            if tls._lostTLSConnection or tls._aborted:
                break
            deliver(chunk)
    finally:
        end()


def fast_tls_receive(tls: Any, t: tcp.Connection | None) -> None:
    """
    Make C{tls} (a C{TLSMemoryBIOProtocol}) read its records with OpenSSL
    directly: the same steps as its C{dataReceived}, but "no more records"
    is a return code instead of two exceptions per read, the plaintext is
    read into a buffer shared by every tunnel, and what OpenSSL has to send
    meanwhile goes out with L{_send_bio} (to C{t}, the TCP connection under
    C{tls}, if there is one).  Until the handshake is done, and
    for anything out of the ordinary (a close_notify, an error), Twisted's
    own code runs.
    """
    original = tls.dataReceived
    # The protocol may want to know when the records of one read end.  Its
    # methods are looked up once, here: a wrapper in front of it (Twisted's
    # ClientService puts a proxy there) would otherwise look them up again
    # with a call of its own at every read.
    wrapped = tls.wrappedProtocol
    deliver = wrapped.dataReceived
    begin, end = _read_batches(wrapped)
    buf = _IN

    # The connection's OpenSSL objects, the same for its whole life.
    conn = tls._tlsConnection
    ssl, into, out_bio = conn._ssl, conn._into_ssl, conn._from_ssl

    def data_received(data: bytes) -> None:
        if not tls._handshakeDone or tls._appSendBuffer or tls._lostTLSConnection or tls._aborted:
            original(data)
            return
        if type(data) is not bytes:
            data = bytes(data)
        if _BIO_write(into, data, len(data)) <= 0:
            conn.bio_write(data)  # pyOpenSSL raises what went wrong
        # Every record this read completed, then handed over: one record (a
        # request, a reply) to the protocol alone, which makes its own
        # batch of it; several as one read batch (begin .. end).
        records = None
        n = _SSL_read(ssl, buf, _RECORD)
        record = _ffi_unpack(buf, n) if n > 0 else None
        if record is not None:
            n = _SSL_read(ssl, buf, _RECORD)
            if n > 0:
                records = [record]
                while n > 0:
                    records.append(_ffi_unpack(buf, n))
                    n = _SSL_read(ssl, buf, _RECORD)
        failed = _SSL_get_error(ssl, n) != _WANT_READ  # asked at once: before anything else uses OpenSSL
        if records is not None:
            _deliver_batch(tls, records, deliver, begin, end)
        elif record is not None and not tls._aborted:
            deliver(record)
        if failed:
            tls._flushReceiveBIO()  # Twisted raises what went wrong (a close_notify, say) and handles it
            return
        if tls.transport is not None:
            # What OpenSSL has to send (_send_bio), read inline: after a read
            # there is most often nothing.
            n = _BIO_read(out_bio, _OUT, _OUT_SIZE)
            if n > 0:
                _send_bio(conn, tls.transport, t, n)

    tls.dataReceived = data_received
    private.unwrap_endpoint(t, tls)
