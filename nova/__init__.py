"""
NOVA: a reverse-tunnel service.

The folders say which code does I/O.  Pure cores (bytes, frames, state and
decisions in; results out; no sockets, files or reactor; time passed in;
tests/test_layers.py checks what they load):

- L{nova.wire}: the frame format, handshake, host names, SOCKS5 messages.
- L{nova.mux}: the multiplexer and the life-cycle machines.
- L{nova.rules}: destination rules, token scopes and throttling, routes and
  selectors, cluster membership, selection and drain requests.
- L{nova.values}, L{nova.errors}: setting values, and NOVA's one error
  taxonomy (the open-failure table included).

Adapters (Twisted, sockets, databases, HTTP):

- L{nova.transport}: the multiplexer over a TLS or TCP connection.
- L{nova.server}: NOVAS, which accepts agents and opens streams for routes.
- L{nova.agent}: NOVAC, which dials servers and connects streams to targets.
- L{nova.admin}: NOVAS's audit history, metrics and admin page.
- L{nova.cluster}: the servers' shared store, heartbeats and runtime routes.
- Shared by both commands: L{nova.config} (options and environment),
  L{nova.tls}, L{nova.service}, L{nova.site} (bounded HTTP site),
  L{nova.probes} (health probes), L{nova.prometheus} (the metrics page;
  NOVAC loads it only when it serves C{/metrics}), L{nova.demo}.
"""

__version__ = "0.1.0"
