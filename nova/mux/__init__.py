"""
Stream multiplexing, as state machines that do no I/O (a pure core).

L{nova.mux.contract}: the stream/tunnel contract (what a stream asks of
its tunnel, what the tunnel tells a stream).  L{nova.mux.core}: the
multiplexer (frames in, events and frames out; windows, window tuning,
stream limits).  L{nova.mux.lifecycle}: the tunnel
session's and a stream's two halves' life cycles, as explicit machines with
time passed in.  L{nova.mux.inbound}: received frames delivered to the
streams, a read at a time.  L{nova.mux.defaults}: the defaults the settings
start from.  L{nova.transport} adapts all of this to Twisted;
docs/datapath.md has the map.
"""
