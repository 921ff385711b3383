"""
Command-line options that fall back to environment variables.

Each command declares its settings once (name, variable, default, help); the
same table drives parsing, the environment fallback and C{--help}, so the
three cannot drift apart.  Bad input becomes one L{ConfigError} line, never a
traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from twisted.logger import Logger
from twisted.python import usage

import nova

# Re-exported: the settings below parse with them, and callers import them from here.
from nova.values import ConfigError as ConfigError
from nova.values import parse_port as parse_port
from nova.values import parse_tags as parse_tags

log = Logger()


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


def unknown_variables(settings: Sequence[Setting], env: Mapping[str, str]) -> list[str]:
    """
    One warning per variable that looks like one of these settings' (same
    C{NOVAS_}/C{NOVAC_} prefix) but is none of them, naming the closest
    setting: a misspelt variable is otherwise silently ignored.
    """
    known = {s.env for s in settings}
    prefixes = tuple(sorted({s.env.split("_", 1)[0] + "_" for s in settings}))
    warnings = []
    for name in sorted(env):
        if not name.startswith(prefixes) or name in known or _service_link(name):
            continue
        # Compared without the shared prefix, which would make every name look close.
        prefix, _, rest = name.partition("_")
        suffixes = {k.partition("_")[2]: k for k in known if k.startswith(prefix + "_")}
        close = difflib.get_close_matches(rest, suffixes, n=1, cutoff=0.6)
        hint = f"did you mean {suffixes[close[0]]}?" if close else "see --help for the settings"
        warnings.append(f"{name} is not a setting and is ignored; {hint}")
    return warnings


_SERVICE_LINK = re.compile(r"[A-Z0-9]+_(SERVICE_HOST|SERVICE_PORT(_.*)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_.*)?)")


def _service_link(name: str) -> bool:
    """Kubernetes' variables for a Service named novas (NOVAS_SERVICE_HOST, NOVAS_PORT...): not ours."""
    return _SERVICE_LINK.fullmatch(name) is not None


# Placeholders that the example files (etc/*.env.example, README) carry where
# a secret belongs: starting a service with one would make the secret public.
_PLACEHOLDER = re.compile(r"(change-?me|replace-?me|paste-).*", re.IGNORECASE)


def is_placeholder(secret: str) -> bool:
    return _PLACEHOLDER.fullmatch(secret.strip()) is not None


def placeholder_error(what: str) -> ConfigError:
    return ConfigError(
        f"{what} is still the example's placeholder: set a long random secret (e.g. `openssl rand -hex 32`)"
    )


def separator_hint(entries: Sequence[str], what: str) -> str:
    """For a list setting that failed to parse: a hint if ';' was used where ',' separates entries."""
    if any(";" in e for e in entries):
        return f" ({what} separates entries with ',', not ';')"
    return ""


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

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        An unknown option or a missing argument is one line and a hint, not
        the usage error followed by every option's help.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            self._usage_error(str(e))

    def _usage_error(self, message: str) -> NoReturn:
        m = re.fullmatch(r"option (-{1,2})(\S+) not recognized", message)
        if m is not None:
            names = [s.name for s in self.settings] + ["help", "version"]
            close = difflib.get_close_matches(m.group(2), names, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else ""
            message = f"unknown option {m.group(1)}{m.group(2)}{hint}"
        raise SystemExit(f"{self.command}: error: {message} (--help lists the options)")

    def opt_version(self) -> NoReturn:
        """Print NOVA's version and exit."""
        print(f"{self.command} (NOVA) {nova.__version__}")
        raise SystemExit(0)

    def _choose_log_format(self) -> None:
        """
        Under C{twist}, one default everywhere: text, whether the output is a
        terminal or not (twist itself picks JSON sequences when it is not, so
        containers logged JSON and systemd text).  NOVA_LOG_FORMAT=json gives
        one JSON object per line; twist's own --log-format still wins.
        """
        from nova.service import LOG_FORMAT_VARIABLE, log_observer_factory

        parent = getattr(self, "parent", None)
        if parent is None or "fileLogObserverFactory" not in parent or _given_to_twist("--log-format", self.command):
            return
        try:
            parent["fileLogObserverFactory"] = log_observer_factory(self.env.get(LOG_FORMAT_VARIABLE))
        except ValueError as e:
            raise SystemExit(f"{self.command}: error: {e}") from None

    def postOptions(self) -> None:
        self._choose_log_format()
        self.warnings = unknown_variables(self.settings, self.env)
        try:
            self.config = self.build(resolve(self.settings, self, self.env))
        except ConfigError as e:
            # The warnings first: a misspelt variable is often why a setting is missing.
            lines = [f"{self.command}: warning: {w}" for w in self.warnings]
            raise SystemExit("\n".join([*lines, f"{self.command}: error: {e}"])) from None
        for warning in self.warnings:
            # Before logging has begun: the log beginner keeps the event until it has.
            log.warn("{command}: {warning}", command=self.command, warning=warning)

    def build(self, values: dict[str, Any]) -> Any:
        raise NotImplementedError


def _given_to_twist(option: str, command: str) -> bool:
    """Whether C{option} is on the command line before the plugin's name C{command}."""
    for arg in sys.argv[1:]:
        if arg == command:
            return False  # the plugin's own options follow
        if arg == option or arg.startswith(option + "="):
            return True
    return False


def _repeatable(s: Setting) -> Any:
    def opt(self: EnvOptions, value: str) -> None:
        self[s.name].append(value)

    opt.__doc__ = s.doc()
    return opt


# Parsers shared by both commands.


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


def split_host_port(value: str, what: str) -> tuple[str, int]:
    """C{HOST:PORT} or C{[V6]:PORT}; a URL (C{https://host:9022}) is refused, not read as host C{https://host}."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if sep:
        raise ConfigError(f"{what}: {value!r} is a URL: give HOST:PORT without {scheme}:// (e.g. {rest.rstrip('/')})")
    if "/" in value:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT (no path, no '/')")
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
    if is_placeholder(value):
        raise placeholder_error(f"--{setting.name} / {setting.env}")
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


def parse_max_window(v: dict[str, Any], prefix: str, minimum: int, maximum: int) -> int:
    """C{--max-window}: at least the initial window (an auto-tuned window never shrinks below it)."""
    window = parse_int(v["window"], f"--window / {prefix}_WINDOW", minimum, maximum)
    what = f"--max-window / {prefix}_MAX_WINDOW"
    value = parse_int(v["max-window"], what, minimum, maximum)
    if value < window:
        raise ConfigError(
            f"{what} ({value}) must be at least --window / {prefix}_WINDOW ({window}); raise it or lower the window"
        )
    return value


def timing_settings(prefix: str) -> tuple[Setting, ...]:
    return (
        Setting("keepalive", f"{prefix}_KEEPALIVE", "15", "Seconds between pings on an idle tunnel."),
        Setting("dead-timeout", f"{prefix}_DEAD_TIMEOUT", "45", "Drop a tunnel that sent nothing for this long."),
        Setting("drain-timeout", f"{prefix}_DRAIN_TIMEOUT", "30", "On SIGTERM, how long open streams may run."),
    )
