"""
Stream multiplexing over one tunnel connection.

L{nova.mux.core} is the pure state machine (frames in, events and frames
out); L{nova.mux.stream} and L{nova.mux.tunnel} adapt it to Twisted, and
L{nova.mux.splice} joins a stream to a TCP connection.
"""
