"""
Routes as data: validating a route added at run time, and the desired set
of routes (static from the command line, dynamic from the store) that the
route listeners follow.  Pure.

Specs are read with the server's own C{--route} parser, so a route added
through the store means exactly what the same text means on the command line.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nova.errors import ConfigError
from nova.rules.records import RouteRecord
from nova.rules.routes import Route, parse_route

# Ids of the command-line routes: never written to the store, never deletable.
STATIC_PREFIX = "static-"
# Longest spec accepted: the longest host name (253) with room for the rest.
MAX_SPEC = 1024
MAX_ID = 64


class RouteRejected(Exception):
    """A route cannot be added; the message names the problem (it reaches the API's 400 answer)."""


def new_route_id() -> str:
    """A fresh id for a route added at run time."""
    return "r-" + secrets.token_hex(6)


def validate(spec: str, default_bind: str = "127.0.0.1") -> Route:
    """The route C{spec} means, or L{RouteRejected} saying why it means none."""
    if not isinstance(spec, str) or not spec.strip():
        raise RouteRejected("route is empty: give [BIND:]PORT:HOST:HOSTPORT[@SELECTOR]")
    if len(spec) > MAX_SPEC:
        raise RouteRejected(f"route is {len(spec)} characters long, more than {MAX_SPEC}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in spec):
        raise RouteRejected("route contains a control character")
    try:
        return parse_route(spec, default_bind)
    except ConfigError as e:
        raise RouteRejected(str(e)) from None


def validate_id(route_id: str) -> str:
    if not route_id or len(route_id) > MAX_ID or not all(ch.isalnum() or ch in "-_." for ch in route_id):
        raise RouteRejected(f"route id {route_id[:MAX_ID]!r} is not 1-{MAX_ID} letters, digits, '-', '_' or '.'")
    if route_id.startswith(STATIC_PREFIX):
        raise RouteRejected(f"route id {route_id!r}: ids starting {STATIC_PREFIX!r} are the command line's")
    return route_id


def listen_key(route: Route) -> str | None:
    """What two routes may not share: the address they listen on (port 0 picks a fresh port each time)."""
    if route.port == 0:
        return None
    return f"{route.bind}:{route.port}"


@dataclass(frozen=True)
class Desired:
    """The routes to listen for, by id, and the dynamic routes left out with the reason."""

    routes: dict[str, Route]
    problems: dict[str, str]


def desired(static: Sequence[Route], dynamic: Iterable[RouteRecord], default_bind: str = "127.0.0.1") -> Desired:
    """
    Static routes first (ids C{static-0}, C{static-1}, ...), then the
    dynamic ones in the order they were created.  A dynamic route whose
    spec no longer parses, or that would listen where an earlier route
    listens, is left out and reported, never raised: one bad row must not
    stop the others.
    """
    routes: dict[str, Route] = {}
    problems: dict[str, str] = {}
    taken: dict[str, str] = {}
    for i, route in enumerate(static):
        rid = f"{STATIC_PREFIX}{i}"
        routes[rid] = route
        key = listen_key(route)
        if key is not None:
            taken.setdefault(key, rid)
    for record in sorted(dynamic, key=lambda r: (r.created_at, r.id)):
        if record.id in routes:
            problems[record.id] = "duplicate route id"
            continue
        try:
            route = validate(record.spec, default_bind)
        except RouteRejected as e:
            problems[record.id] = str(e)
            continue
        key = listen_key(route)
        if key is not None and key in taken:
            problems[record.id] = f"{key} is already the listening address of route {taken[key]}"
            continue
        if key is not None:
            taken[key] = record.id
        routes[record.id] = route
    return Desired(routes, problems)
