"""
The admin API's cluster endpoints (issue 16): the cluster's tunnels and
members, the routes and their changes at run time, draining an agent.

This module is the HTTP side only: it parses requests and turns outcomes
into JSON answers.  What the endpoints do is the server's
(L{ClusterControl}, implemented by C{nova.server.cluster.ServerCluster}):
refusals come back as L{Refused} subclasses, each carrying its HTTP status,
so every error of the API is named once, here.
"""

from __future__ import annotations

import json
from typing import Any, Protocol
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from .guarded import Guarded, send_json

log = Logger()

WHO = "admin"
"""
Who the audit names for a change made through the API: the admin token has
no id of its own (there is one admin token), so the caller is "admin".
"""


class Refused(Exception):
    """A request the API refuses; the message is the reason the answer gives."""

    status = 400


class NotFound(Refused):
    """No such route, or no such agent."""

    status = 404


class Conflict(Refused):
    """The change collides with what exists: a duplicate route, a command-line route."""

    status = 409


class Unavailable(Refused):
    """The cluster store cannot be reached: route changes and drains wait for it."""

    status = 503


class ClusterControl(Protocol):
    """What the cluster endpoints ask of the server."""

    def tunnels(self, server: str | None = None) -> dict[str, Any]: ...

    def servers(self) -> dict[str, Any]: ...

    def routes(self) -> dict[str, Any]: ...

    def add_route(self, spec: object, route_id: object, who: str) -> Deferred[dict[str, Any]]: ...

    def remove_route(self, route_id: str, who: str) -> Deferred[dict[str, Any]]: ...

    def drain(self, agent: str, who: str) -> Deferred[dict[str, Any]]: ...


def _answer(request: Request, d: Deferred[dict[str, Any]], code: int = 200) -> int:
    """Finish C{request} with C{d}'s outcome: its result as JSON, or a L{Refused} as its status."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def write(data: bytes) -> None:
        # A length rather than chunks: the answer is complete already.
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def done(body: dict[str, Any]) -> None:
        if not gone:
            write(send_json(request, body, code))

    def failed(failure: Failure) -> None:
        if gone:
            return
        if failure.check(Refused):
            error = failure.value
            assert isinstance(error, Refused)
            write(send_json(request, {"error": str(error)}, error.status))
        else:
            log.failure("admin API: {method} {path} failed", failure, method=request.method, path=request.uri)
            write(send_json(request, {"error": "internal error"}, 500))

    d.addCallbacks(done, failed)
    return NOT_DONE_YET


def _refusal(request: Request, error: Refused) -> bytes:
    return send_json(request, {"error": str(error)}, error.status)


def _segments(request: Request) -> list[str]:
    """The path below the resource's prefix, each segment percent-decoded."""
    return [unquote(s.decode("utf-8", "replace")) for s in request.postpath or []]


class ClusterTunnels(Guarded):
    """C{GET /api/v1/tunnels[?server=ID]}: every tunnel of the cluster, with the server that holds it."""

    def __init__(self, token: bytes | None, cluster: ClusterControl) -> None:
        super().__init__(token)
        self._cluster = cluster

    def render_authorized(self, request: Request) -> bytes:
        values = request.args.get(b"server") if request.args else None
        server = values[0].decode("utf-8", "replace") if values else None
        return send_json(request, self._cluster.tunnels(server or None))


class Servers(Guarded):
    """C{GET /api/v1/servers}: the members and their state."""

    def __init__(self, token: bytes | None, cluster: ClusterControl) -> None:
        super().__init__(token)
        self._cluster = cluster

    def render_authorized(self, request: Request) -> bytes:
        return send_json(request, self._cluster.servers())


class Routes(Guarded):
    """C{GET /api/v1/routes}; C{POST} with C{{"route": SPEC}} adds one (answer: the route, its C{id} included)."""

    methods = (b"GET", b"HEAD", b"POST")

    def __init__(self, token: bytes | None, cluster: ClusterControl) -> None:
        super().__init__(token)
        self._cluster = cluster

    def render_authorized(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            return send_json(request, self._cluster.routes())
        try:
            body = _json_object(request)
            unknown = sorted(set(body) - {"route", "id"})
            if unknown:
                raise Refused(f'unknown field(s) {", ".join(repr(k[:32]) for k in unknown)}: give {{"route": SPEC}}')
            if "route" not in body:
                raise Refused('give {"route": "[BIND:]PORT:HOST:HOSTPORT[@SELECTOR]"}')
        except Refused as e:
            return _refusal(request, e)
        return _answer(request, self._cluster.add_route(body["route"], body.get("id"), WHO), 201)


class RouteItem(Guarded):
    """C{DELETE /api/v1/routes/{id}}: remove a route added at run time."""

    methods = (b"DELETE",)

    def __init__(self, token: bytes | None, cluster: ClusterControl) -> None:
        super().__init__(token)
        self._cluster = cluster

    def render_authorized(self, request: Request) -> bytes | int:
        path = _segments(request)
        if len(path) != 1 or not path[0]:
            return send_json(request, {"error": "not found"}, 404)
        return _answer(request, self._cluster.remove_route(path[0], WHO))


class TunnelAction(Guarded):
    """
    C{POST /api/v1/tunnels/{name}/drain}: GOAWAY to the agent's tunnel on
    every member that holds one (through the store); new streams go to the
    others.  202 with the members that hold it and the request.
    """

    methods = (b"POST",)

    def __init__(self, token: bytes | None, cluster: ClusterControl) -> None:
        super().__init__(token)
        self._cluster = cluster

    def render_authorized(self, request: Request) -> bytes | int:
        path = _segments(request)
        if len(path) != 2 or path[1] != "drain" or not path[0]:
            return send_json(request, {"error": "not found"}, 404)
        return _answer(request, self._cluster.drain(path[0], WHO), 202)


def _json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object (the site has bounded its size already)."""
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused("the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused('the body is not a JSON object: give {"route": SPEC}')
    return body
