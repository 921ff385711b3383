"""
Command-line options that fall back to environment variables.

Each command declares its settings once (name, variable, default, help); the
same table drives parsing, the environment fallback and C{--help}, so the
three cannot drift apart.  Bad input becomes one L{ConfigError} line, never a
traceback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.python import usage


class ConfigError(Exception):
    """Configuration that cannot work; the message is one line for the user."""


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: str | None
    help: str
    flag: bool = False
    repeat: bool = False
    env_separator: str = ","
    secret: bool = False

    def doc(self) -> str:
        if self.flag:
            where = f"[env {self.env}]"
        elif self.secret:
            # Never the value: only whether the environment sets it.
            where = f"[env {self.env}; {'set' if os.environ.get(self.env) else 'unset'}]"
        else:
            shown = "none" if self.default is None else (self.default or '""')
            where = f"[env {self.env}; default {shown}]"
        return f"{self.help} {where}"


_TRUE = frozenset({"on", "true", "1", "yes"})
_FALSE = frozenset({"off", "false", "0", "no"})


def resolve(settings: Sequence[Setting], given: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """
    Merge command line (C{given}), environment and defaults, in that order
    of precedence.  Flags come back as bools; repeatable settings as lists.
    """
    values: dict[str, Any] = {}
    for s in settings:
        value = given.get(s.name)
        if s.flag:
            if value:
                values[s.name] = True
            else:
                raw = env.get(s.env, "").strip().lower()
                if raw not in _TRUE | _FALSE | {""}:
                    raise ConfigError(f"{s.env} must be on or off, not {raw!r}")
                # A negative flag (--no-tls) is set by turning its variable off.
                values[s.name] = raw in (_FALSE if s.name.startswith("no-") else _TRUE)
        elif s.repeat:
            if value:
                values[s.name] = list(value)
            else:
                raw = env.get(s.env, "")
                values[s.name] = [p.strip() for p in raw.split(s.env_separator) if p.strip()]
        else:
            if value is None:
                value = env.get(s.env) or None
            if value is None:
                value = s.default
            values[s.name] = value
    return values


class EnvOptions(usage.Options):
    """
    L{usage.Options} built from a table of L{Setting}s.  Subclasses set
    C{settings}, C{command} and implement L{build}, which turns the merged
    values into a typed configuration (raising L{ConfigError}).
    """

    settings: ClassVar[Sequence[Setting]] = ()
    command: ClassVar[str] = "nova"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.optParameters = [[s.name, None, None, s.doc()] for s in cls.settings if not (s.flag or s.repeat)]  # type: ignore[attr-defined]
        cls.optFlags = [[s.name, None, s.doc()] for s in cls.settings if s.flag]  # type: ignore[attr-defined]
        for s in cls.settings:
            if s.repeat:
                setattr(cls, "opt_" + s.name.replace("-", "_"), _repeatable(s))

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.env = os.environ if env is None else env
        for s in self.settings:
            if s.repeat:
                self[s.name] = []

    def postOptions(self) -> None:
        try:
            self.config = self.build(resolve(self.settings, self, self.env))
        except ConfigError as e:
            raise SystemExit(f"{self.command}: error: {e}") from None

    def build(self, values: dict[str, Any]) -> Any:
        raise NotImplementedError


def _repeatable(s: Setting) -> Any:
    def opt(self: EnvOptions, value: str) -> None:
        self[s.name].append(value)

    opt.__doc__ = s.doc()
    return opt


# Parsers shared by both commands.


def parse_port(value: str, what: str, allow_zero: bool = False) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a port number, not {value!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{what} must be between 1 and 65535, not {port}")
    return port


def parse_seconds(value: str, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of seconds, not {value!r}") from None
    if not 0 < seconds < 86400 * 365:
        raise ConfigError(f"{what} must be a positive number of seconds")
    return seconds


def parse_int(value: str, what: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{what} must be between {low} and {high}, not {number}")
    return number


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


def split_host_port(value: str, what: str) -> tuple[str, int]:
    """C{HOST:PORT} or C{[V6]:PORT}."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{what}: {value!r} is not [IPV6]:PORT")
        return host, parse_port(rest[1:], what)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT")
    return host, parse_port(port, what)


def read_secret(value: str | None, setting: Setting, minimum: int = 8) -> bytes:
    """A token from its setting; refuses a missing, empty or short one by name."""
    if value is None or not value.strip():
        raise ConfigError(f"--{setting.name} / {setting.env} is required")
    token = value.strip().encode("utf-8")
    if len(token) < minimum:
        raise ConfigError(f"--{setting.name} / {setting.env} must be at least {minimum} characters")
    return token


def parse_timing(v: dict[str, Any], prefix: str) -> tuple[float, float, float]:
    """Keepalive, dead timeout and drain timeout, checked against each other."""
    keepalive = parse_seconds(v["keepalive"], f"--keepalive / {prefix}_KEEPALIVE")
    dead = parse_seconds(v["dead-timeout"], f"--dead-timeout / {prefix}_DEAD_TIMEOUT")
    drain = parse_seconds(v["drain-timeout"], f"--drain-timeout / {prefix}_DRAIN_TIMEOUT")
    if dead <= keepalive:
        raise ConfigError(
            f"--dead-timeout / {prefix}_DEAD_TIMEOUT ({dead:g}s) must be longer than"
            f" --keepalive / {prefix}_KEEPALIVE ({keepalive:g}s)"
        )
    return keepalive, dead, drain


def timing_settings(prefix: str) -> tuple[Setting, ...]:
    return (
        Setting("keepalive", f"{prefix}_KEEPALIVE", "15", "Seconds between pings on an idle tunnel."),
        Setting("dead-timeout", f"{prefix}_DEAD_TIMEOUT", "45", "Drop a tunnel that sent nothing for this long."),
        Setting("drain-timeout", f"{prefix}_DRAIN_TIMEOUT", "30", "On SIGTERM, how long open streams may run."),
    )
