"""
Stream multiplexing over one tunnel connection.

L{nova.mux.core} is the pure state machine (frames in, events and frames
out); L{nova.mux.lifecycle} holds the session's and a stream's life-cycle
machines; L{nova.mux.stream} (one stream as a transport),
L{nova.mux.outbound} (when and how much to write), L{nova.mux.inbound}
(received frames to the streams) and L{nova.mux.tunnel} (the connection that
wires them) adapt it to Twisted, and L{nova.mux.splice} joins a stream to a
TCP connection.  docs/datapath.md has the map.
"""
