"""
What NOVAS and NOVAC both export to Prometheus, and the page that serves it:
the base registry (build info, process collector), the stream-open latency
buckets, and L{MetricsPage}.  The one module both sides import
prometheus_client through; NOVAC imports it only when it serves C{/metrics}.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Info, ProcessCollector, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from nova import __version__
from nova.probes import READ_ONLY, plain

OPEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def base_registry(component: str) -> CollectorRegistry:
    """
    A registry with what both NOVAS and NOVAC export: C{nova_build_info}
    and the process collector (C{process_resident_memory_bytes},
    C{process_open_fds}, C{process_cpu_seconds_total}, ...).
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    Info("nova_build", "NOVA's version; the value is always 1.", registry=registry).info(
        {"version": __version__, "component": component}
    )
    return registry


def _json(request: Request, code: int, error: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"error": error}).encode()


class MetricsPage(Resource):
    """
    Prometheus text from C{registry}; GET and HEAD only.  With C{tokens}
    (NOVAS: the admin token and the read-only metrics token), the request
    must carry C{Authorization: Bearer} one of them; an empty C{tokens}
    means none is configured and the page is off (403, naming C{off_hint});
    C{None} means no credential is asked (NOVAC's probe port, reachable
    inside the cluster only).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, tokens: Sequence[bytes] | None, off_hint: str = "") -> None:
        Resource.__init__(self)
        self._registry = registry
        self._tokens = tokens
        self._off_hint = off_hint

    def _authorized(self, request: Request) -> bool:
        assert self._tokens is not None
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        given = given.strip()
        # Compare with every token, so the time taken does not say which one matched.
        matches = [hmac.compare_digest(given, token) for token in self._tokens]
        return scheme.lower() == b"bearer" and any(matches)

    def render(self, request: Request) -> bytes:
        if self._tokens is not None:
            if not self._tokens:
                return _json(request, 403, f"/metrics is off: set {self._off_hint}")
            if not self._authorized(request):
                request.setHeader(b"www-authenticate", b'Bearer realm="nova"')
                return _json(request, 401, "a valid bearer token is required")
        if request.method not in READ_ONLY:
            request.setHeader(b"allow", b"GET, HEAD")
            return plain(request, 405, "method not allowed\n")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)
