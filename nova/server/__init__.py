"""
NOVAS: accepts agents' tunnels, and opens streams through them for the
connections that arrive on its routes.

Pure (no I/O): L{nova.server.routes} (routes and selectors),
L{nova.server.socks5} (the SOCKS5 negotiation parser),
L{nova.server.security} (tokens, throttling, limits; it reads the token
file it is given), L{nova.server.registry} (the registered tunnels and the
choice of one; it only logs).  Adapters: L{nova.server.tunnel} (the
server's end of a tunnel), L{nova.server.endpoint} (a client endpoint through a tunnel),
L{nova.server.listener} (route listeners), L{nova.server.socks} (the SOCKS5
entry), L{nova.server.refusals} (counted refusals).  Assembly:
L{nova.server.options} (settings), L{nova.server.tap} (the service tree).
"""
