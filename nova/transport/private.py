"""
The private names of Twisted and pyOpenSSL that the fast paths use, all of
them, and the one check of each.

The epoll reactor's per-event dispatch (L{nova.transport.epoll}) is fenced
here too: L{EPOLL_NAMES} and L{plain_epoll}, checked once, when NOVAS or
NOVAC starts.

The fast paths (L{nova.transport.fastpath}, L{nova.transport.splice}) reach under
Twisted's transports to write and read sooner than Twisted would
(docs/datapath.md, "What the fast paths rely on").  Everything they touch
that is not public API is listed here; a transport class gets a fast path
only if every name it needs is there, checked once per class (the first
connected instance that has them all decides, and the pass is cached: these
are attributes every instance of the class gets in its constructor or
C{makeConnection}).  A class that fails the check gets the public path:
slower, never wrong.  setup.cfg bounds Twisted and pyOpenSSL at the releases
this was checked against, and tests/test_private_api.py fails if the
installed releases take the public path for real TCP and TLS connections.

Nothing here does I/O; the fast paths call these checks when a connection
is set up, never per frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet import tcp

try:  # Twisted's TLS transport; absent without pyOpenSSL
    from twisted.protocols.tls import TLSMemoryBIOProtocol as _TLS
except ImportError:  # pragma: no cover
    _TLS = None  # type: ignore[assignment,misc]

try:
    from twisted.internet.endpoints import _WrappingProtocol as _EndpointWrapper
except ImportError:  # pragma: no cover
    _EndpointWrapper = None  # type: ignore[assignment,misc]

# OpenSSL itself, through pyOpenSSL's private bindings (OpenSSL._util): calls
# that report "no data" with a return code instead of raising, and buffers
# that need no copy.  None when the bindings are not there.
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    SSL_read: Any = _lib.SSL_read
    SSL_write: Any = _lib.SSL_write
    SSL_get_error: Any = _lib.SSL_get_error
    BIO_read: Any = _lib.BIO_read
    BIO_write: Any = _lib.BIO_write
    SSL_ERROR_WANT_READ: int | None = _lib.SSL_ERROR_WANT_READ
    ffi_new: Any = _ffi.new
    ffi_buffer: Any = _ffi.buffer
    ffi_unpack: Any = _ffi.unpack
    ffi_from_buffer: Any = _ffi.from_buffer
except (ImportError, AttributeError):  # pragma: no cover
    SSL_read = SSL_write = SSL_get_error = BIO_read = BIO_write = ffi_new = ffi_buffer = ffi_unpack = None
    SSL_ERROR_WANT_READ = None
    ffi_from_buffer = None

OPENSSL_AVAILABLE = ffi_buffer is not None

# twisted.internet.tcp.Connection (through abstract.FileDescriptor): what
# write_tcp reads to know that nothing is queued, the socket it sends on,
# the read size splice.read_size sets, and what lose_write_tcp reads and
# calls to shut the write side as doWrite would.
TCP_NAMES = (
    "_tempDataBuffer", "dataBuffer", "connected", "disconnecting", "_writeDisconnecting", "_writeDisconnected",
    "socket", "bufferSize", "producer", "streamingProducer", "producerPaused", "_closeWriteConnection",
)  # fmt: skip

# twisted.protocols.tls.TLSMemoryBIOProtocol: what FrameWriter and
# fast_tls_receive read and call.
TLS_NAMES = (
    "_handshakeDone", "_appSendBuffer", "_lostTLSConnection", "_aborted", "_tlsConnection",
    "_flushReceiveBIO", "_bufferedWrite", "_tlsShutdownFinished", "_producer", "disconnecting",
    "wrappedProtocol", "transport",
)  # fmt: skip

# BufferingTLSTransport (Twisted's default TLS transport) holds small writes
# in C{_aggregator}; FrameWriter flushes them first.  Optional: a plain
# TLSMemoryBIOProtocol has none.
AGGREGATOR_NAMES = ("_buffer", "flush")

# OpenSSL.SSL.Connection (pyOpenSSL): the SSL*, the memory BIOs OpenSSL
# writes its records to and reads them from, and the method that turns a
# failed call's return code into pyOpenSSL's exception (the raw path calls
# SSL_write and BIO_write itself, and pyOpenSSL's own methods only when a
# call fails, so that errors are pyOpenSSL's).
CONNECTION_NAMES = ("_ssl", "_from_ssl", "_into_ssl", "_raise_ssl_error", "bio_write", "send")

# twisted.internet.endpoints._WrappingProtocol: what a client endpoint puts
# between a TCP connection and the protocol it connected; once connected it
# only forwards every call.  L{unwrap_endpoint} takes it out of the read
# path.
WRAPPER_NAMES = ("_wrappedProtocol",)

# twisted.internet.epollreactor.EPollReactor: what nova.transport.epoll's
# dispatch reads per poll (the epoll object, the descriptor-to-selectable
# map) and calls per event (the read/write/disconnect handling that
# doPoll calls through log.callWithLogger).
EPOLL_NAMES = ("_poller", "_selectables", "_doReadOrWrite")

# How many wrappers deep a transport chain goes at most (TLS over TCP is two).
_MAX_DEPTH = 4

# The classes that passed.  Only a pass is remembered: a connection already
# closed has lost some of these attributes (its socket, its pyOpenSSL
# connection), and must not condemn its class; a class that fails is checked
# again at its next connection (once per connection, never per frame).
_fast_tcp_classes: set[type] = set()
_fast_tls_classes: set[tuple[type, type]] = set()


def transports(transport: object) -> Iterator[object]:
    """
    C{transport}, then the transport under it, and so on (a TLS protocol's
    C{.transport}, say), at most a few levels: the one walker of a wrapper
    chain.
    """
    for _ in range(_MAX_DEPTH):
        if transport is None:
            return
        yield transport
        transport = getattr(transport, "transport", None)


def _has(obj: object, names: tuple[str, ...]) -> bool:
    return all(hasattr(obj, name) for name in names)


def fast_tcp(transport: object) -> tcp.Connection | None:
    """
    C{transport} if it is a Twisted TCP connection whose class has every
    name in L{TCP_NAMES}, else None (the public path).
    """
    if not isinstance(transport, tcp.Connection):
        return None
    cls = type(transport)
    if cls in _fast_tcp_classes:
        return transport
    if _has(transport, TCP_NAMES):
        _fast_tcp_classes.add(cls)
        return transport
    return None


def unwrap_endpoint(t: tcp.Connection | None, protocol: object) -> None:
    """
    Let the TCP connection C{t} call C{protocol} directly where a client
    endpoint's forwarding wrapper (C{_WrappingProtocol}) sits between them:
    one call less per read.  Only once the connection is made (the wrapper
    has fired its Deferred; from then on it only forwards), and only if it
    wraps C{protocol} itself; else nothing changes.
    """
    if t is None or _EndpointWrapper is None:
        return
    wrapper = getattr(t, "protocol", None)
    if type(wrapper) is _EndpointWrapper and getattr(wrapper, "_wrappedProtocol", None) is protocol:
        t.protocol = protocol  # type: ignore[assignment]


def innermost(transport: object) -> object:
    """The transport at the bottom of C{transport}'s wrapper chain (the socket's)."""
    bottom = transport
    for t in transports(transport):
        bottom = t
    return bottom


def tcp_under(transport: object) -> tcp.Connection | None:
    """The TCP connection under C{transport} (through any TLS wrapper), if its class passes L{fast_tcp}."""
    for t in transports(transport):
        if isinstance(t, tcp.Connection):
            return fast_tcp(t)
    return None


def fast_tls(transport: object) -> bool:
    """
    Whether C{transport} is Twisted's TLS transport and its class (and that
    of its pyOpenSSL connection) has every name the raw TLS path uses, with
    OpenSSL's bindings available.
    """
    if _TLS is None or not OPENSSL_AVAILABLE or not isinstance(transport, _TLS):
        return False
    conn = getattr(transport, "_tlsConnection", None)
    key = (type(transport), type(conn))
    if key in _fast_tls_classes:
        return True
    aggregator = getattr(transport, "_aggregator", None)
    if (
        _has(transport, TLS_NAMES)
        and _has(conn, CONNECTION_NAMES)
        and (aggregator is None or _has(aggregator, AGGREGATOR_NAMES))
    ):
        _fast_tls_classes.add(key)
        return True
    return False


def plain_epoll(reactor: object) -> bool:
    """
    Whether C{reactor} is exactly Twisted's C{EPollReactor} (not a subclass,
    which may poll its own way) whose C{doIteration} is still C{doPoll} (the
    code the dispatch replaces) and which has every name in L{EPOLL_NAMES}.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover  (no epoll: not Linux)
        return False
    return (
        type(reactor) is EPollReactor
        and getattr(EPollReactor, "doIteration", None) is getattr(EPollReactor, "doPoll", None)
        and "doIteration" not in vars(reactor)
        and _has(reactor, EPOLL_NAMES)
        and callable(getattr(getattr(reactor, "_poller", None), "poll", None))
    )
