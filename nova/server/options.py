"""
C{twist novas} options: every setting is an option and an environment
variable (see README.md).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nova.admin.metrics import DEFAULT_AGENT_LABELS
from nova.config import (
    ConfigError,
    EnvOptions,
    Setting,
    is_placeholder,
    parse_int,
    parse_max_window,
    parse_port,
    parse_seconds,
    parse_timing,
    placeholder_error,
    separator_hint,
    timing_settings,
)
from nova.mux.core import DEFAULT_MAX_WINDOW
from nova.wire.frames import DEFAULT_INITIAL_WINDOW, MAX_WINDOW, MIN_INITIAL_WINDOW

from .routes import Route, parse_route
from .security import MIN_TOKEN_LENGTH, AgentToken, Limits, ScopeError, parse_tokens, read_token_file

TOKEN = Setting(
    "agent-token",
    "NOVAS_AGENT_TOKEN",
    None,
    f"Secret(s) agents prove, ','-separated for rotation; at least {MIN_TOKEN_LENGTH} characters each"
    " (guessing is throttled per address, not across many: the length is what keeps a token safe).",
    secret=True,
)
TOKEN_FILE = Setting(
    "agent-token-file",
    "NOVAS_AGENT_TOKEN_FILE",
    None,
    "File of agent tokens, one per line: TOKEN [id=LABEL] [name=GLOB] [tags=K=V;K=V] (scope); re-read on SIGHUP.",
)

# The SOCKS password is all that stands between the SOCKS port and the
# private networks behind the agents: long enough that guessing it over the
# network, at the throttled rate, is hopeless.
MIN_SOCKS_PASSWORD = 16

SETTINGS = (
    Setting("agent-port", "NOVAS_AGENT_PORT", "9022", "Port agents dial."),
    Setting("agent-bind", "NOVAS_AGENT_BIND", "0.0.0.0", "Address the agent port listens on."),
    TOKEN,
    TOKEN_FILE,
    Setting("tls-cert", "NOVAS_TLS_CERT", None, "Server certificate (PEM, may include the chain)."),
    Setting("tls-key", "NOVAS_TLS_KEY", None, "Server private key (PEM)."),
    Setting("tls-client-ca", "NOVAS_TLS_CLIENT_CA", None, "Require agent certificates from this CA; name = cert name."),
    Setting("no-tls", "NOVAS_TLS", None, "Plaintext agent port (NOVAS_TLS=off); only for trusted networks.", flag=True),
    Setting("state-dir", "NOVAS_STATE_DIR", "/var/lib/nova", "Directory for the generated certificate."),
    Setting(
        "route",
        "NOVAS_ROUTES",
        None,
        "[BIND:]PORT:HOST:HOSTPORT[@SELECTOR], repeatable (env: ','-separated).",
        repeat=True,
    ),
    Setting("window", "NOVAS_WINDOW", str(DEFAULT_INITIAL_WINDOW), "Per-stream receive window in bytes."),
    Setting(
        "max-window",
        "NOVAS_MAX_WINDOW",
        str(DEFAULT_MAX_WINDOW),
        "Most a stream's receive window grows to on a fast, distant link (bytes).",
    ),
    Setting("handshake-timeout", "NOVAS_HANDSHAKE_TIMEOUT", "10", "Seconds an agent has to register."),
    Setting("open-timeout", "NOVAS_OPEN_TIMEOUT", "30", "Seconds to wait for an agent to open a stream."),
    *timing_settings("NOVAS"),
    Setting("socks-port", "NOVAS_SOCKS_PORT", None, "SOCKS5 entry port (off unless set); username = SELECTOR."),
    Setting("socks-bind", "NOVAS_SOCKS_BIND", "127.0.0.1", "Address the SOCKS5 port listens on."),
    Setting(
        "socks-password",
        "NOVAS_SOCKS_PASSWORD",
        None,
        "SOCKS5 password, 16+ characters (required beyond loopback).",
        secret=True,
    ),
    Setting("admin-port", "NOVAS_ADMIN_PORT", "9023", "Admin API and page, /metrics, /healthz, /readyz ('off': none)."),
    Setting("admin-bind", "NOVAS_ADMIN_BIND", "127.0.0.1", "Address the admin port listens on."),
    Setting(
        "admin-token", "NOVAS_ADMIN_TOKEN", None, "Bearer token for the admin API and page (off if unset).", secret=True
    ),
    Setting(
        "metrics-token",
        "NOVAS_METRICS_TOKEN",
        None,
        "Read-only bearer token for /metrics alone (Prometheus); the admin token works there too.",
        secret=True,
    ),
    Setting(
        "metrics-agents",
        "NOVAS_METRICS_AGENTS",
        str(DEFAULT_AGENT_LABELS),
        "Agents with their own 'agent' label value in /metrics at once; the rest share '(other)'.",
    ),
    Setting("audit-db", "NOVAS_AUDIT_DB", None, "Audit store: postgresql://... (default: SQLite in the state dir)."),
    Setting("audit-retention-days", "NOVAS_AUDIT_RETENTION_DAYS", "30", "Days of audit history to keep."),
    Setting("max-tunnels", "NOVAS_MAX_TUNNELS", "10000", "Registered tunnels at most."),
    Setting("max-pending-handshakes", "NOVAS_MAX_PENDING_HANDSHAKES", "1000", "Unfinished handshakes at most."),
    Setting(
        "max-pending-per-source",
        "NOVAS_MAX_PENDING_PER_SOURCE",
        "128",
        "Unfinished handshakes at most from one address (IPv6: one /64).",
    ),
    Setting("max-streams-per-tunnel", "NOVAS_MAX_STREAMS_PER_TUNNEL", "4096", "Streams open at once per tunnel."),
    Setting(
        "auth-block-after", "NOVAS_AUTH_BLOCK_AFTER", "20", "Failed handshakes per address before a block; 0: off."
    ),
    Setting("auth-block-seconds", "NOVAS_AUTH_BLOCK_SECONDS", "300", "How long a blocked address stays blocked."),
)


@dataclass(frozen=True)
class ServerConfig:
    agent_port: int
    agent_bind: str
    tokens: tuple[AgentToken, ...]
    tls: bool
    tls_cert: Path | None
    tls_key: Path | None
    state_dir: Path
    routes: tuple[Route, ...]
    window: int
    handshake_timeout: float
    open_timeout: float
    keepalive: float = 15.0
    dead_timeout: float = 45.0
    drain_timeout: float = 30.0
    socks_port: int | None = None
    socks_bind: str = "127.0.0.1"
    socks_password: bytes | None = None
    admin_port: int | None = 9023
    admin_bind: str = "127.0.0.1"
    admin_token: bytes | None = None
    metrics_token: bytes | None = None
    metrics_agents: int = DEFAULT_AGENT_LABELS
    audit_db: str | None = None
    audit_retention_days: float = 30.0
    token_file: Path | None = None
    env_tokens: tuple[bytes, ...] = ()  # from --agent-token itself; the file's are re-read on SIGHUP
    client_ca: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_window: int = DEFAULT_MAX_WINDOW

    def __repr__(self) -> str:
        # Never show the token.
        return f"<ServerConfig agent port {self.agent_port}, {len(self.routes)} routes, tls={self.tls}>"


def build_config(v: dict[str, Any]) -> ServerConfig:
    cert, key = v["tls-cert"], v["tls-key"]
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key (NOVAS_TLS_CERT, NOVAS_TLS_KEY) go together")
    if v["no-tls"] and cert:
        raise ConfigError("--no-tls / NOVAS_TLS=off contradicts --tls-cert")
    try:
        routes = tuple(parse_route(r) for r in v["route"])
    except ConfigError as e:
        raise ConfigError(f"--route / NOVAS_ROUTES: {e}{separator_hint(v['route'], 'NOVAS_ROUTES')}") from None
    seen: dict[tuple[str, int], Route] = {}
    for r in routes:
        if r.port and (r.bind, r.port) in seen:
            raise ConfigError(f"routes {seen[(r.bind, r.port)]} and {r} listen on the same port")
        seen[(r.bind, r.port)] = r
    keepalive, dead, drain = parse_timing(v, "NOVAS")
    env_tokens = tuple(parse_tokens(v["agent-token"] or ""))
    token_file = Path(v["agent-token-file"]) if v["agent-token-file"] else None
    tokens = load_tokens(env_tokens, token_file)
    if v["tls-client-ca"] and v["no-tls"]:
        raise ConfigError("--tls-client-ca / NOVAS_TLS_CLIENT_CA needs TLS")
    if v["tls-client-ca"] and not Path(v["tls-client-ca"]).is_file():
        raise ConfigError(f"--tls-client-ca / NOVAS_TLS_CLIENT_CA: {v['tls-client-ca']} is not a readable file")
    block_after = parse_int(v["auth-block-after"], "--auth-block-after / NOVAS_AUTH_BLOCK_AFTER", 0, 10**6)
    socks_port = parse_port(v["socks-port"], "--socks-port / NOVAS_SOCKS_PORT", True) if v["socks-port"] else None
    if v["socks-password"] and is_placeholder(v["socks-password"]):
        raise placeholder_error("--socks-password / NOVAS_SOCKS_PASSWORD")
    socks_password = v["socks-password"].encode("utf-8") if v["socks-password"] else None
    if v["socks-password"] and len(v["socks-password"]) < MIN_SOCKS_PASSWORD:
        raise ConfigError(
            f"--socks-password / NOVAS_SOCKS_PASSWORD must be at least {MIN_SOCKS_PASSWORD} characters"
            " (it can be guessed over the network): use a random one, like `openssl rand -hex 16`"
        )
    if socks_port is not None and socks_password is None and not is_loopback(v["socks-bind"]):
        raise ConfigError(
            f"--socks-bind / NOVAS_SOCKS_BIND {v['socks-bind']} is beyond loopback:"
            " set --socks-password / NOVAS_SOCKS_PASSWORD"
        )
    admin_port = (
        None
        if v["admin-port"].strip().lower() in ("off", "none", "")
        else parse_port(v["admin-port"], "--admin-port / NOVAS_ADMIN_PORT", True)
    )
    if v["admin-token"] and is_placeholder(v["admin-token"]):
        raise placeholder_error("--admin-token / NOVAS_ADMIN_TOKEN")
    admin_token = v["admin-token"].strip().encode("utf-8") if v["admin-token"] else None
    if admin_token is not None and len(admin_token) < 8:
        raise ConfigError("--admin-token / NOVAS_ADMIN_TOKEN must be at least 8 characters")
    metrics_token = v["metrics-token"].strip().encode("utf-8") if v["metrics-token"] else None
    if metrics_token is not None and len(metrics_token) < 8:
        raise ConfigError("--metrics-token / NOVAS_METRICS_TOKEN must be at least 8 characters")
    if metrics_token is not None and metrics_token == admin_token:
        raise ConfigError(
            "--metrics-token / NOVAS_METRICS_TOKEN must differ from --admin-token / NOVAS_ADMIN_TOKEN"
            " (it is handed to Prometheus and opens /metrics only)"
        )
    audit_db = v["audit-db"] or None
    if audit_db is not None and not audit_db.startswith(("postgresql://", "postgres://", "sqlite:///")):
        raise ConfigError("--audit-db / NOVAS_AUDIT_DB must be postgresql://... or sqlite:///PATH")
    retention = parse_seconds(v["audit-retention-days"], "--audit-retention-days / NOVAS_AUDIT_RETENTION_DAYS")
    return ServerConfig(
        agent_port=parse_port(v["agent-port"], "--agent-port / NOVAS_AGENT_PORT", allow_zero=True),
        agent_bind=v["agent-bind"],
        tokens=tokens,
        token_file=token_file,
        env_tokens=env_tokens,
        client_ca=Path(v["tls-client-ca"]) if v["tls-client-ca"] else None,
        limits=Limits(
            max_tunnels=parse_int(v["max-tunnels"], "--max-tunnels / NOVAS_MAX_TUNNELS", 1, 10**7),
            max_pending_handshakes=parse_int(
                v["max-pending-handshakes"], "--max-pending-handshakes / NOVAS_MAX_PENDING_HANDSHAKES", 1, 10**6
            ),
            max_pending_per_source=parse_int(
                v["max-pending-per-source"], "--max-pending-per-source / NOVAS_MAX_PENDING_PER_SOURCE", 1, 10**6
            ),
            max_streams_per_tunnel=parse_int(
                v["max-streams-per-tunnel"], "--max-streams-per-tunnel / NOVAS_MAX_STREAMS_PER_TUNNEL", 1, 10**6
            ),
            failures_before_block=block_after,
            failures_before_delay=max(1, block_after // 4),
            block_seconds=parse_seconds(v["auth-block-seconds"], "--auth-block-seconds / NOVAS_AUTH_BLOCK_SECONDS"),
        ),
        tls=not v["no-tls"],
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        state_dir=Path(v["state-dir"]),
        routes=routes,
        window=parse_int(v["window"], "--window / NOVAS_WINDOW", MIN_INITIAL_WINDOW, MAX_WINDOW),
        max_window=parse_max_window(v, "NOVAS", MIN_INITIAL_WINDOW, MAX_WINDOW),
        handshake_timeout=parse_seconds(v["handshake-timeout"], "--handshake-timeout / NOVAS_HANDSHAKE_TIMEOUT"),
        open_timeout=parse_seconds(v["open-timeout"], "--open-timeout / NOVAS_OPEN_TIMEOUT"),
        keepalive=keepalive,
        dead_timeout=dead,
        drain_timeout=drain,
        socks_port=socks_port,
        socks_bind=v["socks-bind"],
        socks_password=socks_password,
        admin_port=admin_port,
        admin_bind=v["admin-bind"],
        admin_token=admin_token,
        metrics_token=metrics_token,
        metrics_agents=parse_int(v["metrics-agents"], "--metrics-agents / NOVAS_METRICS_AGENTS", 0, 10_000),
        audit_db=audit_db,
        audit_retention_days=retention,
    )


def load_tokens(env_tokens: tuple[bytes, ...], path: Path | None) -> tuple[AgentToken, ...]:
    """
    The agent tokens: those of the setting (no scope), then those of the
    token file (each with its scope words, if any).
    """
    tokens = [AgentToken(t) for t in env_tokens]
    if any(is_placeholder(t.decode("utf-8", "replace")) for t in env_tokens):
        raise placeholder_error("--agent-token / NOVAS_AGENT_TOKEN")
    if any(len(t.secret) < MIN_TOKEN_LENGTH for t in tokens):
        raise ConfigError(
            f"--agent-token / NOVAS_AGENT_TOKEN: every token must be at least {MIN_TOKEN_LENGTH} characters"
        )
    if path is not None:
        what = "--agent-token-file / NOVAS_AGENT_TOKEN_FILE"
        try:
            from_file = read_token_file(path)
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
        raise ConfigError("--agent-token / NOVAS_AGENT_TOKEN (or --agent-token-file) is required")
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
