"""
C{twist novac} options: every setting is an option and an environment
variable (see README.md).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova.config import (
    ConfigError,
    EnvOptions,
    Setting,
    by_name,
    check_max_window,
    check_timing,
    integer,
    labels,
    parse_tags,
    port,
    read_secret,
    seconds,
    seconds_or_off,
    separator_hint,
    split_host_port,
    timing_settings,
    together,
    typed,
    window_settings,
)
from nova.mux.defaults import DEFAULT_MAX_STREAMS
from nova.rules.destinations import Policy, PolicyError, parse_policy
from nova.tls import parse_fingerprint
from nova.transport.tunnel import Timing
from nova.wire.handshake import name_problem, tags_problem

from .reconnect import DEFAULT_INITIAL_DELAY, DEFAULT_MAX_DELAY

P = "NOVAC"

# OPENs per second a server may ask of an agent (see AgentContext.max_open_rate).
DEFAULT_MAX_OPEN_RATE = 5000

# A PING unanswered this long (seconds) on a 50 ms link is a stalled tunnel,
# not a slow one; well under the dead timeout (45 s) so the fresh tunnel is
# up long before the stalled one would be dropped (docs/faults.md).
DEFAULT_STALL_TIMEOUT = 5.0

SETTINGS: tuple[Setting[Any], ...] = (
    Setting(P, "server", None, "HOST:PORT[,HOST:PORT...]: register with every one (required)."),
    Setting(P, "token", None, "Shared secret (NOVAS's agent token).", secret=True),
    Setting(P, "name", None, "Tunnel name (default: this host's name, i.e. the pod name)."),
    Setting(P, "tags", (), "Tags as Key=Value;Key=Value.", parse_tags),
    Setting(P, "ca", None, "CA bundle (PEM) that verifies the server's certificate and name.", var="TLS_CA"),
    Setting(P, "server-fingerprint", None, "Pinned server certificate, sha256:HEX.", var="TLS_FINGERPRINT"),
    Setting(P, "server-name", None, "Name to verify and send as SNI (default: HOST).", var="TLS_SERVER_NAME"),
    Setting(P, "no-tls", None, "Plaintext tunnel (NOVAC_TLS=off); only for trusted networks.", var="TLS", flag=True),
    *window_settings(P),
    Setting(P, "connect-timeout", 10.0, "Seconds to connect to a server or a target.", seconds),
    Setting(
        P,
        "handshake-timeout",
        None,
        "Seconds a server has to complete the registration once connected.",
        seconds,
        derive=lambda v: v["connect-timeout"],
        derived_doc="--connect-timeout's value",
    ),
    Setting(P, "max-streams", DEFAULT_MAX_STREAMS, "Streams open at once per tunnel.", integer(1, 65536)),
    Setting(
        P, "max-open-rate", DEFAULT_MAX_OPEN_RATE, "Stream opens per second a server may ask for.", integer(1, 10**6)
    ),
    Setting(P, "tls-cert", None, "Client certificate (PEM) for servers that require one."),
    Setting(P, "tls-key", None, "Client certificate's private key (PEM)."),
    Setting(
        P, "health-port", None, "Port for /healthz and /readyz probes (off unless set).", port(True, optional=True)
    ),
    Setting(P, "health-bind", "0.0.0.0", "Address the probe port listens on."),
    Setting(
        P,
        "no-metrics",
        None,
        "No Prometheus /metrics on the probe port (NOVAC_METRICS=off); it is served there, without a credential.",
        var="METRICS",
        flag=True,
    ),
    Setting(
        P,
        "allow",
        None,
        "Targets this agent may dial: CIDR, IP, host-name pattern (*.internal) or *, with optional"
        " :PORT or :LOW-HIGH; repeatable (variable: ,-separated). Without it, anything but"
        " link-local/metadata addresses.",
        repeat=True,
    ),
    *timing_settings(P),
    Setting(
        P,
        "stall-timeout",
        None,
        "Seconds a ping may go unanswered before a fresh tunnel is opened beside the stalled one"
        " (0 or off: never); under the dead timeout.",
        seconds_or_off,
        derive=lambda v: min(DEFAULT_STALL_TIMEOUT, v["dead-timeout"] / 3),
        derived_doc=f"{DEFAULT_STALL_TIMEOUT:g}, or a third of --dead-timeout if that is shorter",
    ),
    Setting(P, "reconnect-initial", DEFAULT_INITIAL_DELAY, "Seconds: the first reconnect waits up to this.", seconds),
    Setting(P, "reconnect-max", DEFAULT_MAX_DELAY, "Seconds: no reconnect waits longer than this.", seconds),
)
LABEL = labels(SETTINGS)
TLS_OFF = f"{LABEL['no-tls']}=off"  # the negative flag as its variable is set
TOKEN = by_name(SETTINGS, "token")


@dataclass(frozen=True)
class AgentConfig:
    """
    Everything NOVAC runs with, typed and checked.  No field has a default:
    the defaults are the settings' (L{SETTINGS}), written once.
    """

    servers: tuple[tuple[str, int], ...]
    token: bytes
    name: str
    tags: tuple[tuple[str, str], ...]
    tls: bool
    ca: Path | None
    fingerprint: bytes | None
    server_name: str | None
    window: int
    max_window: int
    connect_timeout: float
    handshake_timeout: float
    max_streams: int
    max_open_rate: int
    keepalive: float
    dead_timeout: float
    stall_timeout: float
    drain_timeout: float
    reconnect_initial: float
    reconnect_max: float
    policy: Policy
    client_cert: tuple[Path, Path] | None
    health_port: int | None
    health_bind: str
    metrics: bool

    def __repr__(self) -> str:
        return f"<AgentConfig {self.name} -> {len(self.servers)} server(s), tls={self.tls}>"

    def timing(self) -> Timing:
        return Timing(self.handshake_timeout, self.keepalive, self.dead_timeout, self.stall_timeout)


def build_config(v: dict[str, Any]) -> AgentConfig:
    """
    The typed values of L{resolve} checked against each other (a value alone
    is checked by its setting's parser).
    """
    v = typed(SETTINGS, v)
    if not v["server"]:
        raise ConfigError(f"{LABEL['server']} is required (HOST:PORT[,HOST:PORT...])")
    servers = tuple(split_host_port(s, LABEL["server"]) for s in v["server"].split(",") if s.strip())
    if not servers:
        raise ConfigError(f"{LABEL['server']} names no server")
    name = v["name"] or socket.gethostname().split(".")[0]
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{LABEL['name']} {name!r}: {problem}")
    tags = v["tags"]
    problem = tags_problem(tags)
    if problem:
        raise ConfigError(f"{LABEL['tags']}: {problem}")
    tls = not v["no-tls"]
    fingerprint = None
    if v["server-fingerprint"]:
        try:
            fingerprint = parse_fingerprint(v["server-fingerprint"])
        except ValueError as e:
            raise ConfigError(f"{LABEL['server-fingerprint']}: {e}") from None
    ca = Path(v["ca"]) if v["ca"] else None
    if tls and ca is None and fingerprint is None:
        raise ConfigError(
            f"cannot verify the server: give {LABEL['ca']} or {LABEL['server-fingerprint']}"
            f" (NOVAS logs its fingerprint at start), or {TLS_OFF} for plaintext"
        )
    if ca is not None and fingerprint is not None:
        raise ConfigError(f"give either {LABEL['ca']} or {LABEL['server-fingerprint']}, not both")
    if ca is not None and not ca.is_file():
        raise ConfigError(f"{LABEL['ca']}: {ca} is not a readable file")
    if not tls and (ca is not None or fingerprint is not None):
        raise ConfigError(f"{TLS_OFF} contradicts --ca / --server-fingerprint")
    try:
        policy = parse_policy(v.get("allow") or [])
    except PolicyError as e:
        raise ConfigError(f"{LABEL['allow']}: {e}{separator_hint(v.get('allow') or [], 'NOVAC_ALLOW')}") from None
    keepalive, dead, drain = check_timing(v, LABEL)
    stall = v["stall-timeout"]
    if stall >= dead:
        raise ConfigError(
            f"{LABEL['stall-timeout']} ({stall:g}s) must be shorter than {LABEL['dead-timeout']} ({dead:g}s),"
            " or 0 to turn it off"
        )
    if bool(v["tls-cert"]) != bool(v["tls-key"]):
        raise ConfigError(together(by_name(SETTINGS, "tls-cert"), by_name(SETTINGS, "tls-key")))
    client_cert = (Path(v["tls-cert"]), Path(v["tls-key"])) if v["tls-cert"] else None
    if client_cert is not None and not tls:
        raise ConfigError(f"{LABEL['tls-cert']} needs TLS")
    initial, cap = v["reconnect-initial"], v["reconnect-max"]
    if cap < initial:
        raise ConfigError(f"{LABEL['reconnect-max']} must not be below --reconnect-initial")
    return AgentConfig(
        servers=servers,
        token=read_secret(v["token"], TOKEN, minimum=16),  # what NOVAS accepts (nova.rules.admission)
        name=name,
        tags=tags,
        tls=tls,
        ca=ca,
        fingerprint=fingerprint,
        server_name=v["server-name"] or None,
        window=v["window"],
        max_window=check_max_window(v, LABEL),
        connect_timeout=v["connect-timeout"],
        handshake_timeout=v["handshake-timeout"],
        max_streams=v["max-streams"],
        max_open_rate=v["max-open-rate"],
        keepalive=keepalive,
        dead_timeout=dead,
        stall_timeout=stall,
        drain_timeout=drain,
        reconnect_initial=initial,
        reconnect_max=cap,
        policy=policy,
        client_cert=client_cert,
        health_port=v["health-port"],
        health_bind=v["health-bind"],
        metrics=not v["no-metrics"],
    )


class Options(EnvOptions):
    """twist novac [options]: the NOVA tunnel agent."""

    command = "novac"
    settings = SETTINGS
    config: AgentConfig

    def build(self, values: dict[str, Any]) -> AgentConfig:
        return build_config(values)

    def opt_check(self) -> None:
        """Check every server (DNS, TCP, TLS, registration, round trip), one line per step; exit 0 if all pass."""
        # Read by nova.agent.tap.makeService, which runs the check instead of the service.
        self["check"] = True
