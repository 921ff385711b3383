"""
NOVA: a reverse-tunnel service.

Layers, from the wire up:

- L{nova.wire}: the frame format and handshake (pure, no I/O).
- L{nova.mux}: streams, windows and scheduling; their Twisted adapters.
- L{nova.server}: NOVAS, which accepts agents and opens streams for routes.
- L{nova.agent}: NOVAC, which dials servers and connects streams to targets.
"""

__version__ = "0.1.0"
