"""
Routes (C{[BIND:]PORT:HOST:HOSTPORT[@SELECTOR]}) and agent selectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nova.values import ConfigError, parse_port, parse_tags
from nova.wire.hostname import host_problem


@dataclass(frozen=True)
class Selector:
    """
    Which agents may carry a stream: one by name, or every agent that
    carries all the given tags.  The empty selector matches any agent.
    """

    name: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def matches(self, name: str, tags: Mapping[str, str]) -> bool:
        if self.name is not None:
            return name == self.name
        return all(tags.get(k) == v for k, v in self.tags)

    def __str__(self) -> str:
        if self.name is not None:
            return f"name:{self.name}"
        return ";".join(f"{k}={v}" for k, v in self.tags) or "any agent"


def parse_selector(text: str) -> Selector:
    text = text.strip()
    if not text:
        return Selector()
    if text.startswith("name:"):
        name = text[len("name:") :].strip()
        if not name:
            raise ConfigError("selector 'name:' needs an agent name")
        return Selector(name=name)
    return Selector(tags=parse_tags(text, f"selector {text!r}"))


@dataclass(frozen=True)
class Route:
    bind: str
    port: int
    host: str
    host_port: int
    selector: Selector

    def __str__(self) -> str:
        bind = f"[{self.bind}]" if ":" in self.bind else self.bind
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = f"@{self.selector}" if self.selector != Selector() else ""
        return f"{bind}:{self.port}:{host}:{self.host_port}{suffix}"


def _fields(text: str) -> list[str]:
    """Split on ':' outside square brackets (IPv6 literals)."""
    fields, current, depth = [], "", 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ":" and depth == 0:
            fields.append(current)
            current = ""
        else:
            current += ch
    fields.append(current)
    return [f[1:-1] if f.startswith("[") and f.endswith("]") else f for f in fields]


def parse_route(text: str, default_bind: str = "127.0.0.1") -> Route:
    spec, _, selector = text.strip().partition("@")
    fields = _fields(spec)
    if len(fields) == 3:
        fields.insert(0, default_bind)
    if len(fields) != 4 or not all(fields[1:]):
        raise ConfigError(f"route {text!r} is not [BIND:]PORT:HOST:HOSTPORT[@SELECTOR]")
    bind, port, host, host_port = fields
    problem = host_problem(host)
    if problem is not None:
        raise ConfigError(f"route {text!r}: HOST {host!r} cannot be a destination: {problem}")
    return Route(
        bind=bind or default_bind,
        port=parse_port(port, f"route {text!r}: PORT", allow_zero=True),
        host=host,
        host_port=parse_port(host_port, f"route {text!r}: HOSTPORT"),
        selector=parse_selector(selector),
    )
