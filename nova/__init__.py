"""
NOVA: a reverse-tunnel service.

Layers, from the wire up:

- L{nova.wire}: the frame format and handshake (pure, no I/O).
- L{nova.mux}: streams, windows and scheduling; their Twisted adapters.
- L{nova.server}: NOVAS, which accepts agents and opens streams for routes.
- L{nova.agent}: NOVAC, which dials servers and connects streams to targets.
- L{nova.admin}: NOVAS's audit history, metrics and admin page.

Shared by both commands: L{nova.values} (setting values, pure),
L{nova.config} (options and environment), L{nova.tls}, L{nova.service},
and the HTTP pieces both ports serve: L{nova.site} (bounded site),
L{nova.probes} (health probes), L{nova.prometheus} (metrics page; loaded by
NOVAC only when it serves C{/metrics}).
"""

__version__ = "0.1.0"
