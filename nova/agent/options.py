"""
C{twist novac} options: every setting is an option and an environment
variable (see README.md).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nova.config import (
    ConfigError,
    EnvOptions,
    Setting,
    parse_int,
    parse_max_window,
    parse_port,
    parse_seconds,
    parse_tags,
    parse_timing,
    read_secret,
    separator_hint,
    split_host_port,
    timing_settings,
)
from nova.mux.core import DEFAULT_MAX_WINDOW
from nova.tls import parse_fingerprint
from nova.wire.frames import DEFAULT_INITIAL_WINDOW, MAX_WINDOW, MIN_INITIAL_WINDOW
from nova.wire.handshake import name_problem, tags_problem

from .policy import Policy, PolicyError, parse_policy

TOKEN = Setting("token", "NOVAC_TOKEN", None, "Shared secret (NOVAS's agent token).", secret=True)

SETTINGS = (
    Setting("server", "NOVAC_SERVER", None, "HOST:PORT[,HOST:PORT...]: register with every one (required)."),
    TOKEN,
    Setting("name", "NOVAC_NAME", None, "Tunnel name (default: this host's name, i.e. the pod name)."),
    Setting("tags", "NOVAC_TAGS", "", "Tags as Key=Value;Key=Value."),
    Setting("ca", "NOVAC_TLS_CA", None, "CA bundle (PEM) that verifies the server's certificate and name."),
    Setting("server-fingerprint", "NOVAC_TLS_FINGERPRINT", None, "Pinned server certificate, sha256:HEX."),
    Setting("server-name", "NOVAC_TLS_SERVER_NAME", None, "Name to verify and send as SNI (default: HOST)."),
    Setting("no-tls", "NOVAC_TLS", None, "Plaintext tunnel (NOVAC_TLS=off); only for trusted networks.", flag=True),
    Setting("window", "NOVAC_WINDOW", str(DEFAULT_INITIAL_WINDOW), "Per-stream receive window in bytes."),
    Setting(
        "max-window",
        "NOVAC_MAX_WINDOW",
        str(DEFAULT_MAX_WINDOW),
        "Most a stream's receive window grows to on a fast, distant link (bytes).",
    ),
    Setting("connect-timeout", "NOVAC_CONNECT_TIMEOUT", "10", "Seconds to connect to a server or a target."),
    Setting("max-streams", "NOVAC_MAX_STREAMS", "1024", "Streams open at once per tunnel."),
    Setting("max-open-rate", "NOVAC_MAX_OPEN_RATE", "5000", "Stream opens per second a server may ask for."),
    Setting("tls-cert", "NOVAC_TLS_CERT", None, "Client certificate (PEM) for servers that require one."),
    Setting("tls-key", "NOVAC_TLS_KEY", None, "Client certificate's private key (PEM)."),
    Setting("health-port", "NOVAC_HEALTH_PORT", None, "Port for /healthz and /readyz probes (off unless set)."),
    Setting("health-bind", "NOVAC_HEALTH_BIND", "0.0.0.0", "Address the probe port listens on."),
    Setting(
        "no-metrics",
        "NOVAC_METRICS",
        None,
        "No Prometheus /metrics on the probe port (NOVAC_METRICS=off); it is served there, without a credential.",
        flag=True,
    ),
    Setting(
        "allow",
        "NOVAC_ALLOW",
        None,
        "Targets this agent may dial: CIDR, IP, host-name pattern (*.internal) or *, with optional"
        " :PORT or :LOW-HIGH; repeatable (variable: ,-separated). Without it, anything but"
        " link-local/metadata addresses.",
        repeat=True,
    ),
    *timing_settings("NOVAC"),
    Setting("reconnect-initial", "NOVAC_RECONNECT_INITIAL", "1", "Seconds: the first reconnect waits up to this."),
    Setting("reconnect-max", "NOVAC_RECONNECT_MAX", "30", "Seconds: no reconnect waits longer than this."),
)


@dataclass(frozen=True)
class AgentConfig:
    servers: tuple[tuple[str, int], ...]
    token: bytes
    name: str
    tags: tuple[tuple[str, str], ...]
    tls: bool
    ca: Path | None
    fingerprint: bytes | None
    server_name: str | None
    window: int
    connect_timeout: float
    max_streams: int
    max_open_rate: int = 5000
    keepalive: float = 15.0
    dead_timeout: float = 45.0
    drain_timeout: float = 30.0
    reconnect_initial: float = 1.0
    reconnect_max: float = 30.0
    policy: Policy = field(default_factory=Policy)
    client_cert: tuple[Path, Path] | None = None
    health_port: int | None = None
    health_bind: str = "0.0.0.0"
    metrics: bool = True
    max_window: int = DEFAULT_MAX_WINDOW

    def __repr__(self) -> str:
        return f"<AgentConfig {self.name} -> {len(self.servers)} server(s), tls={self.tls}>"


def build_config(v: dict[str, Any]) -> AgentConfig:
    if not v["server"]:
        raise ConfigError("--server / NOVAC_SERVER is required (HOST:PORT[,HOST:PORT...])")
    servers = tuple(split_host_port(s, "--server / NOVAC_SERVER") for s in v["server"].split(",") if s.strip())
    if not servers:
        raise ConfigError("--server / NOVAC_SERVER names no server")
    name = v["name"] or socket.gethostname().split(".")[0]
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"--name / NOVAC_NAME {name!r}: {problem}")
    tags = parse_tags(v["tags"], "--tags / NOVAC_TAGS")
    problem = tags_problem(tags)
    if problem:
        raise ConfigError(f"--tags / NOVAC_TAGS: {problem}")
    tls = not v["no-tls"]
    fingerprint = None
    if v["server-fingerprint"]:
        try:
            fingerprint = parse_fingerprint(v["server-fingerprint"])
        except ValueError as e:
            raise ConfigError(f"--server-fingerprint / NOVAC_TLS_FINGERPRINT: {e}") from None
    ca = Path(v["ca"]) if v["ca"] else None
    if tls and ca is None and fingerprint is None:
        raise ConfigError(
            "cannot verify the server: give --ca / NOVAC_TLS_CA or --server-fingerprint / NOVAC_TLS_FINGERPRINT"
            " (NOVAS logs its fingerprint at start), or --no-tls / NOVAC_TLS=off for plaintext"
        )
    if ca is not None and fingerprint is not None:
        raise ConfigError("give either --ca / NOVAC_TLS_CA or --server-fingerprint / NOVAC_TLS_FINGERPRINT, not both")
    if ca is not None and not ca.is_file():
        raise ConfigError(f"--ca / NOVAC_TLS_CA: {ca} is not a readable file")
    if not tls and (ca is not None or fingerprint is not None):
        raise ConfigError("--no-tls / NOVAC_TLS=off contradicts --ca / --server-fingerprint")
    try:
        policy = parse_policy(v.get("allow") or [])
    except PolicyError as e:
        raise ConfigError(f"--allow / NOVAC_ALLOW: {e}{separator_hint(v.get('allow') or [], 'NOVAC_ALLOW')}") from None
    keepalive, dead, drain = parse_timing(v, "NOVAC")
    if bool(v["tls-cert"]) != bool(v["tls-key"]):
        raise ConfigError("--tls-cert and --tls-key (NOVAC_TLS_CERT, NOVAC_TLS_KEY) go together")
    client_cert = (Path(v["tls-cert"]), Path(v["tls-key"])) if v["tls-cert"] else None
    if client_cert is not None and not tls:
        raise ConfigError("--tls-cert / NOVAC_TLS_CERT needs TLS")
    initial = parse_seconds(v["reconnect-initial"], "--reconnect-initial / NOVAC_RECONNECT_INITIAL")
    cap = parse_seconds(v["reconnect-max"], "--reconnect-max / NOVAC_RECONNECT_MAX")
    if cap < initial:
        raise ConfigError("--reconnect-max / NOVAC_RECONNECT_MAX must not be below --reconnect-initial")
    return AgentConfig(
        servers=servers,
        token=read_secret(v["token"], TOKEN, minimum=16),  # what NOVAS accepts (nova.server.security)
        name=name,
        tags=tags,
        tls=tls,
        ca=ca,
        fingerprint=fingerprint,
        server_name=v["server-name"] or None,
        window=parse_int(v["window"], "--window / NOVAC_WINDOW", MIN_INITIAL_WINDOW, MAX_WINDOW),
        max_window=parse_max_window(v, "NOVAC", MIN_INITIAL_WINDOW, MAX_WINDOW),
        connect_timeout=parse_seconds(v["connect-timeout"], "--connect-timeout / NOVAC_CONNECT_TIMEOUT"),
        max_streams=parse_int(v["max-streams"], "--max-streams / NOVAC_MAX_STREAMS", 1, 65536),
        max_open_rate=parse_int(v["max-open-rate"], "--max-open-rate / NOVAC_MAX_OPEN_RATE", 1, 10**6),
        keepalive=keepalive,
        dead_timeout=dead,
        drain_timeout=drain,
        reconnect_initial=initial,
        reconnect_max=cap,
        policy=policy,
        client_cert=client_cert,
        health_port=(
            parse_port(v["health-port"], "--health-port / NOVAC_HEALTH_PORT", True) if v["health-port"] else None
        ),
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
