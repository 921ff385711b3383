"""
The text forms of setting values that more than the command line reads
(ports, C{Key=Value} tags), parsed to typed values.  Pure: no Twisted, no
environment; bad input is one L{ConfigError} line.  Routes and selectors
(L{nova.rules.routes}) parse with these without importing the
command-line layer (L{nova.config}), which re-exports them.
"""

from __future__ import annotations

from nova.errors import ConfigError as ConfigError  # re-exported for the pure parsers' callers


def parse_port(value: str, what: str, allow_zero: bool = False) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a port number, not {value!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{what} must be between 1 and 65535, not {port}")
    return port


def parse_tags(value: str, what: str) -> tuple[tuple[str, str], ...]:
    """C{Key=Value;Key=Value} to pairs, in order; empty string means none."""
    tags: list[tuple[str, str]] = []
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: {part!r} is not Key=Value")
        tags.append((key.strip(), val.strip()))
    return tuple(tags)
