"""
Health probes for Kubernetes and load balancers: C{/healthz} (the process
is alive) and C{/readyz}.  NOVAS serves them on its admin port beside the
API; NOVAC serves them on its probe port (L{probe_resource}), with its
C{/metrics} unless C{NOVAC_METRICS=off}.  Outside L{nova.admin} and free of
prometheus_client, so that NOVAC loads neither the admin page nor
Prometheus unless it serves metrics (L{nova.prometheus.MetricsPage} is
both ports' C{/metrics}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request

READ_ONLY = (b"GET", b"HEAD")


def plain(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return text.encode()


class Probe(Resource):
    """200 while C{check()} holds, 503 naming C{what} otherwise; GET and HEAD only."""

    isLeaf = True

    def __init__(self, check: Callable[[], bool], what: str) -> None:
        Resource.__init__(self)
        self._check = check
        self._what = what

    def render(self, request: Request) -> bytes:
        if request.method not in READ_ONLY:
            request.setHeader(b"allow", b"GET, HEAD")
            return plain(request, 405, "method not allowed\n")
        # HEAD reaches render_GET through twisted.web, which drops the body.
        body: bytes = super().render(request)  # type: ignore[no-untyped-call]
        return body

    def render_GET(self, request: Request) -> bytes:
        if self._check():
            return plain(request, 200, "ok\n")
        return plain(request, 503, f"not ready: {self._what}\n")


class _NotFound(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        return plain(request, 404, "not found\n")


class ProbesOnly(Resource):
    """C{/healthz} and C{/readyz}, and C{/metrics} if given its page; 404 for every other path."""

    def __init__(self, ready: Callable[[], bool], what: str, metrics: Resource | None = None) -> None:
        Resource.__init__(self)
        self.putChild(b"healthz", Probe(lambda: True, "alive"))
        self.putChild(b"readyz", Probe(ready, what))
        if metrics is not None:
            self.putChild(b"metrics", metrics)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


def probe_resource(ready: Callable[[], bool], what: str, metrics: Resource | None = None) -> Resource:
    """NOVAC's probe port: the two probes, its metrics page if given, and nothing else (no admin page, no API)."""
    return ProbesOnly(ready, what, metrics)
