"""
C{twist novas} options: every setting is an option and an environment
variable (see README.md).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova.admin.metrics import DEFAULT_AGENT_LABELS
from nova.config import (
    ConfigError,
    EnvOptions,
    Setting,
    by_name,
    check_max_window,
    check_timing,
    integer,
    is_placeholder,
    labels,
    placeholder_error,
    port,
    port_or_off,
    seconds,
    separator_hint,
    timing_settings,
    together,
    typed,
    window_settings,
)
from nova.rules.admission import MIN_TOKEN_LENGTH, AgentToken, Limits, ScopeError, parse_token_file, parse_tokens
from nova.rules.routes import Route, parse_route
from nova.transport.tunnel import DEFAULT_HANDSHAKE_TIMEOUT, Timing

from .endpoint import DEFAULT_OPEN_TIMEOUT

P = "NOVAS"
# The limits' defaults are L{Limits}' own: written once, there.
_LIMITS = Limits()

# The SOCKS password is all that stands between the SOCKS port and the
# private networks behind the agents: long enough that guessing it over the
# network, at the throttled rate, is hopeless.
MIN_SOCKS_PASSWORD = 16


def _host_name(v: Mapping[str, Any]) -> str:
    return socket.gethostname()


def _advertise(v: Mapping[str, Any]) -> str:
    """The host name and the agent port: what an agent behind no balancer would dial."""
    return f"{socket.gethostname()}:{v['agent-port']}"


def server_id(value: str, label: str) -> str:
    """A server id as the cluster store and the admin API show it: short, printable, no spaces."""
    value = value.strip()
    if not value or len(value) > 64 or not all(ch.isalnum() or ch in "-_.:" for ch in value):
        raise ConfigError(f"{label} must be 1-64 letters, digits, '-', '_', '.' or ':', not {value[:64]!r}")
    return value


def _delay_after(v: Mapping[str, Any]) -> int:
    """Today's coupling, now a visible default: delays start at a quarter of the block threshold."""
    block_after: int = v["auth-block-after"]
    return max(1, block_after // 4)


SETTINGS: tuple[Setting[Any], ...] = (
    Setting(P, "agent-port", 9022, "Port agents dial.", port(allow_zero=True)),
    Setting(P, "agent-bind", "0.0.0.0", "Address the agent port listens on."),
    Setting(
        P,
        "agent-token",
        None,
        f"Secret(s) agents prove, ','-separated for rotation; at least {MIN_TOKEN_LENGTH} characters each"
        " (guessing is throttled per address, not across many: the length is what keeps a token safe).",
        secret=True,
    ),
    Setting(
        P,
        "agent-token-file",
        None,
        "File of agent tokens, one per line: TOKEN [id=LABEL] [name=GLOB] [tags=K=V;K=V] (scope); re-read on SIGHUP.",
    ),
    Setting(P, "tls-cert", None, "Server certificate (PEM, may include the chain)."),
    Setting(P, "tls-key", None, "Server private key (PEM)."),
    Setting(P, "tls-client-ca", None, "Require agent certificates from this CA; name = cert name."),
    Setting(
        P, "no-tls", None, "Plaintext agent port (NOVAS_TLS=off); only for trusted networks.", var="TLS", flag=True
    ),
    Setting(P, "state-dir", "/var/lib/nova", "Directory for the generated certificate."),
    Setting(
        P,
        "route",
        None,
        "[BIND:]PORT:HOST:HOSTPORT[@SELECTOR], repeatable (env: ','-separated).",
        var="ROUTES",
        repeat=True,
    ),
    *window_settings(P),
    Setting(P, "handshake-timeout", DEFAULT_HANDSHAKE_TIMEOUT, "Seconds an agent has to register.", seconds),
    Setting(P, "open-timeout", DEFAULT_OPEN_TIMEOUT, "Seconds to wait for an agent to open a stream.", seconds),
    *timing_settings(P),
    Setting(
        P, "socks-port", None, "SOCKS5 entry port (off unless set); username = SELECTOR.", port(True, optional=True)
    ),
    Setting(P, "socks-bind", "127.0.0.1", "Address the SOCKS5 port listens on."),
    Setting(P, "socks-password", None, "SOCKS5 password, 16+ characters (required beyond loopback).", secret=True),
    Setting(
        P,
        "socks-timeout",
        None,
        "Seconds a SOCKS5 client has to finish its negotiation (greeting, password, CONNECT).",
        seconds,
        derive=lambda v: v["handshake-timeout"],
        derived_doc="--handshake-timeout's value",
    ),
    Setting(P, "admin-port", 9023, "Admin API and page, /metrics, /healthz, /readyz ('off': none).", port_or_off),
    Setting(P, "admin-bind", "127.0.0.1", "Address the admin port listens on."),
    Setting(P, "admin-token", None, "Bearer token for the admin API and page (off if unset).", secret=True),
    Setting(
        P,
        "metrics-token",
        None,
        "Read-only bearer token for /metrics alone (Prometheus); the admin token works there too.",
        secret=True,
    ),
    Setting(
        P,
        "metrics-agents",
        DEFAULT_AGENT_LABELS,
        "Agents with their own 'agent' label value in /metrics at once; the rest share '(other)'.",
        integer(0, 10_000),
    ),
    Setting(P, "audit-db", None, "Audit store: postgresql://... (default: SQLite in the state dir)."),
    Setting(P, "audit-retention-days", 30.0, "Days of audit history to keep.", seconds),
    Setting(
        P,
        "server-id",
        None,
        "This server's id in the cluster (servers sharing --audit-db postgresql://...); unique per server.",
        server_id,
        derive=_host_name,
        derived_doc="the host name",
    ),
    Setting(
        P,
        "advertise-address",
        None,
        "HOST:PORT other members and agents use to reach this server's agent port (shown in /api/v1/servers).",
        derive=_advertise,
        derived_doc="the host name and --agent-port",
    ),
    Setting(
        P,
        "cluster-dead-timeout",
        None,
        "Seconds without a heartbeat before a member and its tunnels leave the cluster view; heartbeats every third.",
        seconds,
        derive=lambda v: v["dead-timeout"],
        derived_doc="--dead-timeout's value",
    ),
    Setting(P, "max-tunnels", _LIMITS.max_tunnels, "Registered tunnels at most.", integer(1, 10**7)),
    Setting(
        P,
        "max-pending-handshakes",
        _LIMITS.max_pending_handshakes,
        "Unfinished handshakes at most.",
        integer(1, 10**6),
    ),
    Setting(
        P,
        "max-pending-per-source",
        _LIMITS.max_pending_per_source,
        "Unfinished handshakes at most from one address (IPv6: one /64).",
        integer(1, 10**6),
    ),
    Setting(
        P,
        "max-streams-per-tunnel",
        _LIMITS.max_streams_per_tunnel,
        "Streams open at once per tunnel.",
        integer(1, 10**6),
    ),
    Setting(
        P,
        "auth-block-after",
        _LIMITS.failures_before_block,
        "Failed handshakes per address before a block; 0: off.",
        integer(0, 10**6),
    ),
    Setting(
        P,
        "auth-delay-after",
        None,
        "Failed handshakes per address before each further one waits (1, 2, then 4 s) before HELLO.",
        integer(1, 10**6),
        derive=_delay_after,
        derived_doc="a quarter of --auth-block-after, at least 1",
    ),
    Setting(P, "auth-block-seconds", _LIMITS.block_seconds, "How long a blocked address stays blocked.", seconds),
)
LABEL = labels(SETTINGS)
TLS_OFF = f"{LABEL['no-tls']}=off"  # the negative flag as its variable is set
TOKEN = by_name(SETTINGS, "agent-token")
TOKEN_FILE = by_name(SETTINGS, "agent-token-file")


@dataclass(frozen=True)
class ServerConfig:
    """
    Everything NOVAS runs with, typed and checked.  No field has a default:
    the defaults are the settings' (L{SETTINGS}), written once.
    """

    agent_port: int
    agent_bind: str
    tokens: tuple[AgentToken, ...]
    tls: bool
    tls_cert: Path | None
    tls_key: Path | None
    state_dir: Path
    routes: tuple[Route, ...]
    window: int
    max_window: int
    handshake_timeout: float
    open_timeout: float
    keepalive: float
    dead_timeout: float
    drain_timeout: float
    socks_port: int | None
    socks_bind: str
    socks_password: bytes | None
    socks_timeout: float
    admin_port: int | None
    admin_bind: str
    admin_token: bytes | None
    metrics_token: bytes | None
    metrics_agents: int
    audit_db: str | None
    audit_retention_days: float
    server_id: str
    advertise_address: str
    cluster_dead_timeout: float
    token_file: Path | None
    env_tokens: tuple[bytes, ...]  # from --agent-token itself; the file's are re-read on SIGHUP
    client_ca: Path | None
    limits: Limits

    def __repr__(self) -> str:
        # Never show the token.
        return f"<ServerConfig agent port {self.agent_port}, {len(self.routes)} routes, tls={self.tls}>"

    def timing(self) -> Timing:
        # Stall detection is NOVAC's (it opens the second tunnel); a server has none.
        return Timing(self.handshake_timeout, self.keepalive, self.dead_timeout, stall_timeout=0.0)


def build_config(v: dict[str, Any]) -> ServerConfig:
    """
    The typed values of L{resolve} checked against each other (a value alone
    is checked by its setting's parser).
    """
    v = typed(SETTINGS, v)
    cert, key = v["tls-cert"], v["tls-key"]
    if bool(cert) != bool(key):
        raise ConfigError(together(by_name(SETTINGS, "tls-cert"), by_name(SETTINGS, "tls-key")))
    if v["no-tls"] and cert:
        raise ConfigError(f"{TLS_OFF} contradicts --tls-cert")
    try:
        routes = tuple(parse_route(r) for r in v["route"])
    except ConfigError as e:
        raise ConfigError(f"{LABEL['route']}: {e}{separator_hint(v['route'], 'NOVAS_ROUTES')}") from None
    seen: dict[tuple[str, int], Route] = {}
    for r in routes:
        if r.port and (r.bind, r.port) in seen:
            raise ConfigError(f"routes {seen[(r.bind, r.port)]} and {r} listen on the same port")
        seen[(r.bind, r.port)] = r
    keepalive, dead, drain = check_timing(v, LABEL)
    env_tokens = tuple(parse_tokens(v["agent-token"] or ""))
    token_file = Path(v["agent-token-file"]) if v["agent-token-file"] else None
    tokens = load_tokens(env_tokens, token_file)
    if v["tls-client-ca"] and v["no-tls"]:
        raise ConfigError(f"{LABEL['tls-client-ca']} needs TLS")
    if v["tls-client-ca"] and not Path(v["tls-client-ca"]).is_file():
        raise ConfigError(f"{LABEL['tls-client-ca']}: {v['tls-client-ca']} is not a readable file")
    socks_port = v["socks-port"]
    if v["socks-password"] and is_placeholder(v["socks-password"]):
        raise placeholder_error(LABEL["socks-password"])
    socks_password = v["socks-password"].encode("utf-8") if v["socks-password"] else None
    if v["socks-password"] and len(v["socks-password"]) < MIN_SOCKS_PASSWORD:
        raise ConfigError(
            f"{LABEL['socks-password']} must be at least {MIN_SOCKS_PASSWORD} characters"
            " (it can be guessed over the network): use a random one, like `openssl rand -hex 16`"
        )
    if socks_port is not None and socks_password is None and not is_loopback(v["socks-bind"]):
        raise ConfigError(f"{LABEL['socks-bind']} {v['socks-bind']} is beyond loopback: set {LABEL['socks-password']}")
    if v["admin-token"] and is_placeholder(v["admin-token"]):
        raise placeholder_error(LABEL["admin-token"])
    admin_token = v["admin-token"].strip().encode("utf-8") if v["admin-token"] else None
    if admin_token is not None and len(admin_token) < 8:
        raise ConfigError(f"{LABEL['admin-token']} must be at least 8 characters")
    metrics_token = v["metrics-token"].strip().encode("utf-8") if v["metrics-token"] else None
    if metrics_token is not None and len(metrics_token) < 8:
        raise ConfigError(f"{LABEL['metrics-token']} must be at least 8 characters")
    if metrics_token is not None and metrics_token == admin_token:
        raise ConfigError(
            f"{LABEL['metrics-token']} must differ from {LABEL['admin-token']}"
            " (it is handed to Prometheus and opens /metrics only)"
        )
    audit_db = v["audit-db"] or None
    if audit_db is not None and not audit_db.startswith(("postgresql://", "postgres://", "sqlite:///")):
        raise ConfigError(f"{LABEL['audit-db']} must be postgresql://... or sqlite:///PATH")
    return ServerConfig(
        agent_port=v["agent-port"],
        agent_bind=v["agent-bind"],
        tokens=tokens,
        token_file=token_file,
        env_tokens=env_tokens,
        client_ca=Path(v["tls-client-ca"]) if v["tls-client-ca"] else None,
        limits=Limits(
            max_tunnels=v["max-tunnels"],
            max_pending_handshakes=v["max-pending-handshakes"],
            max_pending_per_source=v["max-pending-per-source"],
            max_streams_per_tunnel=v["max-streams-per-tunnel"],
            failures_before_block=v["auth-block-after"],
            failures_before_delay=v["auth-delay-after"],
            block_seconds=v["auth-block-seconds"],
        ),
        tls=not v["no-tls"],
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        state_dir=Path(v["state-dir"]),
        routes=routes,
        window=v["window"],
        max_window=check_max_window(v, LABEL),
        handshake_timeout=v["handshake-timeout"],
        open_timeout=v["open-timeout"],
        keepalive=keepalive,
        dead_timeout=dead,
        drain_timeout=drain,
        socks_port=socks_port,
        socks_bind=v["socks-bind"],
        socks_password=socks_password,
        socks_timeout=v["socks-timeout"],
        admin_port=v["admin-port"],
        admin_bind=v["admin-bind"],
        admin_token=admin_token,
        metrics_token=metrics_token,
        metrics_agents=v["metrics-agents"],
        audit_db=audit_db,
        audit_retention_days=v["audit-retention-days"],
        server_id=v["server-id"],
        advertise_address=v["advertise-address"],
        cluster_dead_timeout=v["cluster-dead-timeout"],
    )


def load_tokens(env_tokens: tuple[bytes, ...], path: Path | None) -> tuple[AgentToken, ...]:
    """
    The agent tokens: those of the setting (no scope), then those of the
    token file (each with its scope words, if any).
    """
    tokens = [AgentToken(t) for t in env_tokens]
    if any(is_placeholder(t.decode("utf-8", "replace")) for t in env_tokens):
        raise placeholder_error(TOKEN.label)
    if any(len(t.secret) < MIN_TOKEN_LENGTH for t in tokens):
        raise ConfigError(f"{TOKEN.label}: every token must be at least {MIN_TOKEN_LENGTH} characters")
    if path is not None:
        what = TOKEN_FILE.label
        try:
            from_file = parse_token_file(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: {path} is not UTF-8 text") from None
        except ScopeError as e:
            raise ConfigError(f"{what}: {path}: {e}") from None
        example = [i for i, t in enumerate(from_file, 1) if is_placeholder(t.secret.decode("utf-8", "replace"))]
        if example:
            raise placeholder_error(f"{what}: {path}: token {example[0]} (counting tokens, not lines)")
        short = [i for i, t in enumerate(from_file, 1) if len(t.secret) < MIN_TOKEN_LENGTH]
        if short:
            raise ConfigError(
                f"{what}: {path}: token {short[0]} (counting tokens, not lines) is shorter than"
                f" {MIN_TOKEN_LENGTH} characters"
            )
        by_secret = {t.secret: t for t in tokens}
        for t in from_file:
            other = by_secret.get(t.secret)
            if other is not None and other != t:
                raise ConfigError(f"{what}: {path}: a token is listed twice with different id= or scope words")
            by_secret[t.secret] = t
        tokens += from_file
    if not tokens:
        raise ConfigError(f"{TOKEN.label} (or --{TOKEN_FILE.name}) is required")
    return tuple(tokens)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class Options(EnvOptions):
    """twist novas [options]: the NOVA tunnel server."""

    command = "novas"
    settings = SETTINGS
    config: ServerConfig

    def build(self, values: dict[str, Any]) -> ServerConfig:
        return build_config(values)
