"""
NOVAS (adapters and assembly): accepts agents' tunnels, and opens streams
through them for the connections that arrive on its routes.

L{nova.server.tunnel} (the server's end of a tunnel, admitted by
L{nova.rules.admission}), L{nova.server.registry} (the registered tunnels
and the choice among them), L{nova.server.endpoint} (a client endpoint
through a tunnel), L{nova.server.listener} (route listeners),
L{nova.server.socks} (the SOCKS5 entry, over the parser in
L{nova.wire.socks5}), L{nova.server.refusals} (counted refusals), L{nova.server.cluster} (this
server as a cluster member: heartbeats, the cluster view, runtime routes).
Assembly: L{nova.server.options} (settings), L{nova.server.tap} (the
service tree).
"""
