"""
The multiplexer over Twisted (adapters: this package does the I/O).

L{nova.transport.tunnel}: the tunnel connection, which wires the pure
L{nova.mux} core to a TLS or TCP transport; L{nova.transport.outbound}: when
and how much it writes; L{nova.transport.stream}: one stream as an
C{ITransport}, talking to its tunnel through a small owner interface;
L{nova.transport.splice}: a stream joined to a TCP connection;
L{nova.transport.fastpath}: the system-call-saving read and write paths;
L{nova.transport.private}: every private Twisted and pyOpenSSL name those
paths rely on, checked once per class, with the public path as fallback;
L{nova.transport.epoll}: the epoll reactor's per-event dispatch without the
legacy logging context.
"""
