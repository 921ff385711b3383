"""
NOVAC's probes for Kubernetes: C{/healthz} (the process is alive) and
C{/readyz} (registered with at least one server), its Prometheus C{/metrics}
(unless C{NOVAC_METRICS=off}), and nothing else: the port often listens on
every address, so it serves no admin page or API, refuses every method but
GET and HEAD, and refuses request bodies before reading them
(L{nova.site}).  Nothing here loads L{nova.admin} or prometheus_client: the
metrics page, when there is one, comes from L{nova.agent.metrics}.  The metrics carry no secret and no target: server
addresses, counts and timings, as readable as the probes inside the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.resource import Resource

from nova.probes import probe_resource
from nova.service import ListenerService
from nova.site import BoundedSite


def health_service(
    reactor: Any, bind: str, port: int, ready: Callable[[], bool], metrics: Resource | None = None
) -> ListenerService:
    endpoint: IStreamServerEndpoint
    if ":" in bind:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=bind)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=bind)
    site = BoundedSite(probe_resource(ready, "not registered with any server", metrics))
    return ListenerService("novac", f"health probes on {bind}:{port}", endpoint, site)
