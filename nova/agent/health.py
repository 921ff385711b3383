"""
NOVAC's probes for Kubernetes: C{/healthz} (the process is alive) and
C{/readyz} (registered with at least one server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.server import Site

from nova.admin.web import health_resource
from nova.service import ListenerService


def health_service(reactor: Any, bind: str, port: int, ready: Callable[[], bool]) -> ListenerService:
    endpoint: IStreamServerEndpoint
    if ":" in bind:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=bind)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=bind)
    site = Site(health_resource(ready, "not registered with any server"))
    site.noisy = False
    return ListenerService("novac", f"health probes on {bind}:{port}", endpoint, site)
