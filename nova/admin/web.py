"""
The admin HTTP interface (twisted.web): the Reverse Tunnels page, the JSON
API, Prometheus metrics and health probes.

Everything but C{/healthz}, C{/readyz} and the page's own files (C{/},
C{/page.js}, C{/page.css}) needs C{Authorization: Bearer TOKEN}.  The page
itself carries no data; its script asks for the token and sends it with each
API call.  The page's script and style are files, so the Content-Security-
Policy (L{nova.site}) allows nothing inline.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from nova.probes import Probe

from .guarded import Guarded, _Leaf, send_json
from .store import AuditStore, Query

if TYPE_CHECKING:
    from .cluster_api import ClusterControl

_FILES = resources.files("nova.admin")
PAGE = _FILES.joinpath("page.html").read_bytes()
ASSETS: dict[bytes, tuple[bytes, bytes]] = {
    b"page.js": (b"text/javascript; charset=utf-8", _FILES.joinpath("page.js").read_bytes()),
    b"page.css": (b"text/css; charset=utf-8", _FILES.joinpath("page.css").read_bytes()),
}
"""The page's script and style sheet: public code, no data, served without the token."""
MAX_LIMIT = 1000


class Tunnels(Guarded):
    def __init__(self, token: bytes | None, tunnels: Callable[[], list[dict[str, Any]]], server: str) -> None:
        super().__init__(token)
        self._tunnels = tunnels
        self._server = server

    def render_authorized(self, request: Request) -> bytes:
        return send_json(request, {"server": self._server, "tunnels": self._tunnels()})


class Events(Guarded):
    def __init__(self, token: bytes | None, store: AuditStore | None) -> None:
        super().__init__(token)
        self._store = store

    def render_authorized(self, request: Request) -> bytes | int:
        try:
            q = parse_query(request.args)
        except ValueError as e:
            return send_json(request, {"error": str(e)}, 400)
        if self._store is None:
            return send_json(request, {"total": 0, "limit": q.limit, "offset": q.offset, "events": []})
        d = deferToThread(self._store.query, q)

        def done(result: tuple[int, list[dict[str, Any]]]) -> None:
            total, events = result
            request.write(send_json(request, {"total": total, "limit": q.limit, "offset": q.offset, "events": events}))
            request.finish()

        def failed(failure: Failure) -> None:
            request.write(send_json(request, {"error": "the audit store could not be read"}, 503))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


def parse_query(args: dict[bytes, list[bytes]]) -> Query:
    def one(name: str) -> str | None:
        values = args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def number(name: str) -> float | None:
        raw = one(name)
        if raw is None or raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number (seconds since the epoch)") from None

    def count(name: str, default: int, high: int) -> int:
        raw = one(name)
        if raw is None or raw == "":
            return default
        if not raw.isdigit() or not 0 <= int(raw) <= high:
            raise ValueError(f"{name} must be a whole number from 0 to {high}")
        return int(raw)

    return Query(
        since=number("since"),
        until=number("until"),
        agent=one("agent") or None,
        kind=one("kind") or None,
        limit=count("limit", 100, MAX_LIMIT),
        offset=count("offset", 0, 10**9),
    )


class Page(_Leaf):
    """A static file of the page; the security headers come from L{nova.site.BoundedRequest}."""

    def __init__(self, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self._content_type = content_type
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", b"no-store")
        return self._body


class NotFound(_Leaf):
    def render(self, request: Request) -> bytes:
        return send_json(request, {"error": "not found"}, 404)


class Root(Resource):
    def __init__(self, children: dict[bytes, Resource]) -> None:
        Resource.__init__(self)
        self._children = children

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return Page(b"text/html; charset=utf-8", PAGE)
        if path in ASSETS:
            return Page(*ASSETS[path])
        if path == b"api":
            key = b"/".join([b"api", *(request.postpath or [])])
            request.postpath = []
            if key in self._children:
                return self._children[key]
            # A child whose key ends in "/" takes every path below it (an id,
            # a name): it reads the rest from postpath.
            for prefix, child in self._children.items():
                if prefix.endswith(b"/") and key.startswith(prefix) and len(key) > len(prefix):
                    request.postpath = key[len(prefix) :].split(b"/")
                    return child
            return NotFound()
        return self._children.get(path, NotFound())


def admin_resource(
    token: bytes | None,
    tunnels: Callable[[], list[dict[str, Any]]],
    server: str,
    store: AuditStore | None,
    ready: Callable[[], bool],
    cluster: ClusterControl | None = None,
) -> Resource:
    """
    The admin site's root (C{/metrics} is added by the service, with the
    metrics token as well as the admin token).  With C{cluster}, C{/api/v1/tunnels} shows every
    tunnel of the cluster, and the routes, servers and drain endpoints exist.
    """
    from .cluster_api import ClusterTunnels, RouteItem, Routes, Servers, TunnelAction

    children: dict[bytes, Resource] = {}
    if cluster is not None:
        children = {
            b"api/v1/tunnels": ClusterTunnels(token, cluster),
            b"api/v1/tunnels/": TunnelAction(token, cluster),
            b"api/v1/servers": Servers(token, cluster),
            b"api/v1/routes": Routes(token, cluster),
            b"api/v1/routes/": RouteItem(token, cluster),
        }
    return Root(
        {
            b"api/v1/tunnels": Tunnels(token, tunnels, server),
            b"api/v1/events": Events(token, store),
            b"healthz": Probe(lambda: True, "alive"),
            b"readyz": Probe(ready, "the agent port is not listening"),
        }
        | children
    )
