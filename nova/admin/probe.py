"""
Health probes for Kubernetes and load balancers: C{/healthz} (the process
is alive) and C{/readyz}.  NOVAS serves them on its admin port beside the
API; NOVAC serves them on its probe port (L{probe_resource}), with its
C{/metrics} unless C{NOVAC_METRICS=off}.  L{MetricsPage} is both ports'
C{/metrics}.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

READ_ONLY = (b"GET", b"HEAD")


def _plain(request: Request, code: int, text: str) -> bytes:
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
            return _plain(request, 405, "method not allowed\n")
        # HEAD reaches render_GET through twisted.web, which drops the body.
        body: bytes = super().render(request)  # type: ignore[no-untyped-call]
        return body

    def render_GET(self, request: Request) -> bytes:
        if self._check():
            return _plain(request, 200, "ok\n")
        return _plain(request, 503, f"not ready: {self._what}\n")


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
            return _plain(request, 405, "method not allowed\n")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


class _NotFound(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        return _plain(request, 404, "not found\n")


class ProbesOnly(Resource):
    """C{/healthz} and C{/readyz}, and C{/metrics} if given a registry; 404 for every other path."""

    def __init__(self, ready: Callable[[], bool], what: str, metrics: CollectorRegistry | None = None) -> None:
        Resource.__init__(self)
        self.putChild(b"healthz", Probe(lambda: True, "alive"))
        self.putChild(b"readyz", Probe(ready, what))
        if metrics is not None:
            self.putChild(b"metrics", MetricsPage(metrics, None))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


def probe_resource(ready: Callable[[], bool], what: str, metrics: CollectorRegistry | None = None) -> Resource:
    """NOVAC's probe port: the two probes, its metrics if given, and nothing else (no admin page, no API)."""
    return ProbesOnly(ready, what, metrics)
