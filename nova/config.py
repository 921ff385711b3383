"""
Command-line options that fall back to environment variables.

Each command declares its settings once, as typed L{Setting}s (name, typed
default, parser, help; the variable and the label C{"--x / NOVAX_X"} are
derived), in the manner of yamux's C{DefaultConfig()}: the same table drives
parsing, the environment fallback and C{--help}, and is the only place a
default is written.  A command's C{build_config} is its C{VerifyConfig()}:
it checks the typed values against each other.  Bad input becomes one
L{ConfigError} line, never a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

from twisted.logger import Logger
from twisted.python import usage

import nova
from nova.errors import ConfigError as ConfigError  # re-exported: where settings code has always found it
from nova.errors import StartupError
from nova.mux.core import DEFAULT_MAX_WINDOW
from nova.mux.lifecycle import DEFAULT_DEAD_TIMEOUT, DEFAULT_KEEPALIVE

# Re-exported: the settings below parse with them, and callers import them from here.
from nova.values import parse_port as parse_port
from nova.values import parse_tags as parse_tags
from nova.wire.frames import DEFAULT_INITIAL_WINDOW, MAX_WINDOW, MIN_INITIAL_WINDOW

log = Logger()


T = TypeVar("T")

# A parser turns the text of one setting into its typed value; the second
# argument is the setting's label ("--x / NOVAX_X") for the error message.
Parser = Callable[[str, str], T]


def text(value: str, label: str) -> str:
    """The value as given (paths, addresses, secrets checked by C{build})."""
    return value


@dataclass(frozen=True)
class Setting(Generic[T]):
    """
    One setting of a command: its option C{--name}, its variable (the
    command's prefix and the name, unless C{var} says otherwise), its typed
    default and the parser that turns given text into that type.  The label
    that error messages use (C{"--name / PREFIX_NAME"}) is derived, never
    typed by hand.

    C{derive}, when set, computes the default from the other settings'
    values (a coupling made visible: C{doc} says what it follows).
    """

    prefix: str
    name: str
    initial: T | None
    help: str
    parse: Parser[T] | None = None
    var: str | None = None
    flag: bool = False
    repeat: bool = False
    env_separator: str = ","
    secret: bool = False
    derive: Callable[[Mapping[str, Any]], T] | None = None
    derived_doc: str = ""

    @property
    def env(self) -> str:
        return f"{self.prefix}_{self.var or self.name.upper().replace('-', '_')}"

    @property
    def label(self) -> str:
        """How messages name the setting: C{--name / PREFIX_NAME}."""
        return f"--{self.name} / {self.env}"

    @property
    def default(self) -> str | None:
        """The default as the documentation writes it (None: no default)."""
        return show(self.initial)

    def read(self, raw: str) -> T:
        """The typed value of C{raw} (text given on the command line or in the environment)."""
        if self.parse is None:
            return raw  # type: ignore[return-value]  # an unparsed setting is text
        return self.parse(raw, self.label)

    def doc(self) -> str:
        if self.flag:
            where = f"[env {self.env}]"
        elif self.secret:
            # Never the value: only whether the environment sets it.
            where = f"[env {self.env}; {'set' if os.environ.get(self.env) else 'unset'}]"
        elif self.derive is not None:
            where = f"[env {self.env}; default {self.derived_doc}]"
        else:
            shown = "none" if self.default is None else (self.default or '""')
            where = f"[env {self.env}; default {shown}]"
        return f"{self.help} {where}"


def show(value: object) -> str | None:
    """A typed default as text: C{15.0} as C{15}, C{None} as None."""
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:g}"
    if value == ():
        return ""
    return str(value)


def typed(settings: Sequence[Setting[Any]], values: Mapping[str, Any]) -> dict[str, Any]:
    """
    C{values} with any text still given for a parsed setting read by its
    parser (L{resolve} gives typed values; a caller may pass text).
    """
    out = dict(values)
    for s in settings:
        if s.parse is not None and isinstance(out.get(s.name), str):
            out[s.name] = s.read(out[s.name])
    return out


def labels(settings: Sequence[Setting[Any]]) -> dict[str, str]:
    """Each setting's label by its name, for the messages of a C{build}."""
    return {s.name: s.label for s in settings}


def together(a: Setting[Any], b: Setting[Any]) -> str:
    """C{--a and --b (A, B) go together}: two settings that are given both or neither."""
    return f"--{a.name} and --{b.name} ({a.env}, {b.env}) go together"


def by_name(settings: Sequence[Setting[Any]], name: str) -> Setting[Any]:
    for s in settings:
        if s.name == name:
            return s
    raise KeyError(name)


_TRUE = frozenset({"on", "true", "1", "yes"})
_FALSE = frozenset({"off", "false", "0", "no"})


def resolve(settings: Sequence[Setting[Any]], given: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """
    Merge command line (C{given}), environment and defaults, in that order
    of precedence, into typed values: each given text goes through its
    setting's parser (a L{ConfigError} names the setting).  Flags come back
    as bools; repeatable settings as lists of text.
    """
    values: dict[str, Any] = {}
    derived: list[Setting[Any]] = []
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
            if value is not None:
                values[s.name] = s.read(value)
            elif s.derive is not None:
                derived.append(s)
            else:
                values[s.name] = s.initial
    for s in derived:
        values[s.name] = s.derive(values)  # type: ignore[misc]  # derived is only settings with derive
    return values


def unknown_variables(settings: Sequence[Setting[Any]], env: Mapping[str, str]) -> list[str]:
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

    settings: ClassVar[Sequence[Setting[Any]]] = ()
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
        raise StartupError(f"{self.command}: error: {message} (--help lists the options)")

    def opt_version(self) -> NoReturn:
        """Print NOVA's version and exit."""
        print(f"{self.command} (NOVA) {nova.__version__}")
        raise StartupError(0)

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
            raise StartupError(f"{self.command}: error: {e}") from None

    def postOptions(self) -> None:
        self._choose_log_format()
        self.warnings = unknown_variables(self.settings, self.env)
        try:
            self.config = self.build(resolve(self.settings, self, self.env))
        except ConfigError as e:
            # The warnings first: a misspelt variable is often why a setting is missing.
            lines = [f"{self.command}: warning: {w}" for w in self.warnings]
            raise StartupError("\n".join([*lines, f"{self.command}: error: {e}"])) from None
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


def _repeatable(s: Setting[Any]) -> Any:
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


def port(allow_zero: bool = False, optional: bool = False) -> Parser[int | None]:
    """A port number; with C{optional}, empty text means none (the listener is off)."""

    def parse(value: str, label: str) -> int | None:
        if optional and not value.strip():
            return None
        return parse_port(value, label, allow_zero)

    return parse


def port_or_off(value: str, label: str) -> int | None:
    """A port, or C{off}/C{none}/empty for no listener at all."""
    if value.strip().lower() in ("off", "none", ""):
        return None
    return parse_port(value, label, True)


def integer(low: int, high: int) -> Parser[int]:
    def parse(value: str, label: str) -> int:
        return parse_int(value, label, low, high)

    return parse


def seconds(value: str, label: str) -> float:
    return parse_seconds(value, label)


def seconds_or_off(value: str, label: str) -> float:
    """Seconds, or C{0}/C{off}: the feature is off (0.0)."""
    if value.strip().lower() in ("0", "off"):
        return 0.0
    return parse_seconds(value, label)


def read_secret(value: str | None, setting: Setting[Any], minimum: int = 8) -> bytes:
    """A token from its setting; refuses a missing, empty or short one by name."""
    if value is None or not value.strip():
        raise ConfigError(f"{setting.label} is required")
    if is_placeholder(value):
        raise placeholder_error(setting.label)
    token = value.strip().encode("utf-8")
    if len(token) < minimum:
        raise ConfigError(f"{setting.label} must be at least {minimum} characters")
    return token


def check_timing(v: Mapping[str, Any], label: Mapping[str, str]) -> tuple[float, float, float]:
    """Keepalive, dead timeout and drain timeout, checked against each other."""
    keepalive, dead, drain = v["keepalive"], v["dead-timeout"], v["drain-timeout"]
    if dead <= keepalive:
        raise ConfigError(
            f"{label['dead-timeout']} ({dead:g}s) must be longer than {label['keepalive']} ({keepalive:g}s)"
        )
    return keepalive, dead, drain


def check_max_window(v: Mapping[str, Any], label: Mapping[str, str]) -> int:
    """C{--max-window}: at least the initial window (an auto-tuned window never shrinks below it)."""
    window, value = v["window"], v["max-window"]
    if value < window:
        raise ConfigError(
            f"{label['max-window']} ({value}) must be at least {label['window']} ({window});"
            " raise it or lower the window"
        )
    return int(value)


def window_settings(prefix: str) -> tuple[Setting[Any], ...]:
    """A stream's initial and largest receive windows (checked against each other by L{check_max_window})."""
    sizes = integer(MIN_INITIAL_WINDOW, MAX_WINDOW)
    return (
        Setting(prefix, "window", DEFAULT_INITIAL_WINDOW, "Per-stream receive window in bytes.", sizes),
        Setting(
            prefix,
            "max-window",
            DEFAULT_MAX_WINDOW,
            "Most a stream's receive window grows to on a fast, distant link (bytes).",
            sizes,
        ),
    )


# How long a draining tunnel's open streams may run (seconds).
DEFAULT_DRAIN = 30.0


def timing_settings(prefix: str) -> tuple[Setting[Any], ...]:
    return (
        Setting(prefix, "keepalive", DEFAULT_KEEPALIVE, "Seconds between pings on an idle tunnel.", seconds),
        Setting(
            prefix, "dead-timeout", DEFAULT_DEAD_TIMEOUT, "Drop a tunnel that sent nothing for this long.", seconds
        ),
        Setting(prefix, "drain-timeout", DEFAULT_DRAIN, "On SIGTERM, how long open streams may run.", seconds),
    )
