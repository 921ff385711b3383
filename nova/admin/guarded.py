"""
The admin API's building blocks: a resource behind the bearer token
(L{Guarded}) and a JSON answer (L{send_json}), shared by the audit and
tunnel views (L{nova.admin.web}) and the cluster's (L{nova.admin.cluster_api}).
"""

from __future__ import annotations

import hmac
import json

from twisted.web.resource import Resource
from twisted.web.server import Request


def send_json(request: Request, body: object, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


class _Leaf(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)


class Guarded(_Leaf):
    """A resource behind the bearer token; C{methods} are those it answers (others: 405)."""

    methods: tuple[bytes, ...] = (b"GET", b"HEAD")

    def __init__(self, token: bytes | None) -> None:
        super().__init__()
        self._token = token

    def render(self, request: Request) -> bytes | int:
        if self._token is None:
            return send_json(request, {"error": "the admin API is off: set NOVAS_ADMIN_TOKEN"}, 403)
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            request.setHeader(b"www-authenticate", b'Bearer realm="nova"')
            return send_json(request, {"error": "a valid bearer token is required"}, 401)
        if request.method not in self.methods:
            return send_json(request, {"error": "method not allowed"}, 405)
        return self.render_authorized(request)

    def render_authorized(self, request: Request) -> bytes | int:
        raise NotImplementedError
