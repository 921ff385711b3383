"""
C{twist novas}: build the server's service tree from its options.
"""

from __future__ import annotations

import signal

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from nova.admin.audit import Audit
from nova.admin.metrics import Metrics
from nova.admin.store import AuditStore, AuditStoreError, backend_for
from nova.admin.web import admin_resource
from nova.cluster.store import cluster_store_for
from nova.config import ConfigError
from nova.prometheus import MetricsPage
from nova.rules.routes import Route
from nova.service import ListenerService, StartupError, exit_zero_on_sigterm, on_signal, versions
from nova.site import BoundedSite
from nova.tls import STATE_DIR, TLSConfigError, ensure_server_certificate, server_options
from nova.transport import epoll
from nova.wire.errors import ErrorCode

from .cluster import ServerCluster
from .listener import RouteFactory
from .members import announcer, cluster_members
from .options import LABEL, Options, ServerConfig, load_tokens
from .socks import SocksFactory
from .tunnel import ServerTunnel, ServerTunnelFactory
from .wiring import server_context

log = Logger()

# Listen backlog: a burst of new connections (or of agents reconnecting after
# a restart) must queue, not be dropped while the reactor is busy.
BACKLOG = 1024

# At shutdown an idle tunnel (no stream open) is dropped this long after its
# GOAWAY went out if the agent has not closed it by then: an honest agent
# closes within a round trip, and waiting the full close timeout for every
# slow one held a restart of a server with 10,000 agents for 25-63 s
# (bench/HISTORY.md).  The GOAWAY is written before the drop, so the agent
# still learns that the server is restarting.
SHUTDOWN_IDLE_GRACE = 1.0


class NovasService(MultiService):
    """
    The agent listener, the route listeners (command-line routes and the
    cluster store's), the admin and SOCKS listeners, and this server's
    membership of the cluster.
    """

    def __init__(self, config: ServerConfig, reactor: IReactorCore) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.metrics = Metrics(config.metrics_agents)
        self.store = AuditStore(
            backend_for(config.audit_db, config.state_dir),
            retention=config.audit_retention_days * 86400,
            on_dropped=self.metrics.audit_dropped.inc,
        )
        self.context = server_context(
            config,
            reactor,  # type: ignore[arg-type]  # the reactor is every IReactor* at once
            Audit(self.store, self.metrics, server=config.server_id),
        )
        self.metrics.watch_routes(self.route_agents)
        self.reactor = reactor
        self._fingerprint_note: str | None = None
        self.agent_listener = ListenerService(
            "novas",
            f"agents on port {config.agent_port}",
            self._agent_endpoint(reactor),
            ServerTunnelFactory(self.context),
        )
        self.agent_listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        try:
            store = cluster_store_for(config.audit_db, config.state_dir)
        except ImportError as e:
            raise StartupError(f"novas: error: {LABEL['audit-db']} postgresql:// needs psycopg: {e}") from None
        self.cluster = ServerCluster(
            config.server_id,
            config.advertise_address,
            config.routes,
            store,
            config.cluster_dead_timeout,
            self.context.registry,
            self.tunnels,
            self._listen_for,
            self.context.audit,
            reactor,  # type: ignore[arg-type]
            config.drain_timeout,
        )
        # A child: route listeners start with the others and stop first on the
        # way out.  The membership is started by hand once the command-line
        # routes are known to listen (a server that cannot start never joins).
        self.cluster.listeners.setServiceParent(self)  # type: ignore[no-untyped-call]
        # Version-2 agents learn the cluster's members (docs/cluster.md, "Discovery").
        view = self.cluster.membership.view
        self.context.members = cluster_members(config.server_id, lambda: [s.id for s in view().servers])
        announcer(self.context.registry, self.context.members).setServiceParent(self)
        self.admin_listener: ListenerService | None = None
        if config.admin_port is not None:
            admin = admin_resource(
                config.admin_token,
                self.tunnels,
                config.server_id,
                self.store,
                lambda: self.agent_listener.port is not None,
                self.cluster,
            )
            # /metrics takes the read-only metrics token as well as the admin
            # token: a static child, which twisted.web looks up before the
            # admin root's own /metrics.
            tokens = tuple(t for t in (config.admin_token, config.metrics_token) if t is not None)
            hint = "NOVAS_METRICS_TOKEN or NOVAS_ADMIN_TOKEN"
            admin.putChild(b"metrics", MetricsPage(self.metrics.registry, tokens, hint))
            self.admin_listener = ListenerService(
                "novas",
                f"admin on {config.admin_bind}:{config.admin_port}",
                _tcp_endpoint(reactor, config.admin_bind, config.admin_port),
                BoundedSite(admin),
            )
            self.admin_listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.socks_listener: ListenerService | None = None
        if config.socks_port is not None:
            self.socks_listener = ListenerService(
                "novas",
                f"SOCKS5 on {config.socks_bind}:{config.socks_port}",
                _tcp_endpoint(reactor, config.socks_bind, config.socks_port),
                SocksFactory(
                    self.context.registry,
                    reactor,  # type: ignore[arg-type]
                    config.socks_password,
                    config.open_timeout,
                    self.context.audit,
                    config.socks_timeout,
                    limits=config.limits,
                ),
            )
            self.socks_listener.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _agent_endpoint(self, reactor: IReactorCore) -> IStreamServerEndpoint:
        c = self.config
        if not c.tls:
            return _tcp_endpoint(reactor, c.agent_bind, c.agent_port)
        try:
            if c.tls_cert is not None and c.tls_key is not None:
                options = server_options(c.tls_cert, c.tls_key, c.client_ca)
                self._fingerprint_note = None
            else:
                made = ensure_server_certificate(c.state_dir)
                options = server_options(made.cert_path, made.key_path, c.client_ca, STATE_DIR, STATE_DIR)
                self._fingerprint_note = (
                    f"{'generated' if made.generated else 'using'} self-signed certificate {made.cert_path};"
                    f" pin it on agents with NOVAC_TLS_FINGERPRINT={made.fingerprint}"
                    f" (or --server-fingerprint {made.fingerprint})"
                )
        except TLSConfigError as e:
            raise StartupError(f"novas: error: {e}") from None
        endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
            reactor,
            c.agent_port,
            options,
            backlog=BACKLOG,
            interface=c.agent_bind,
        )
        return endpoint

    def _listen_for(self, route: Route) -> tuple[IStreamServerEndpoint, RouteFactory]:
        """Where and how one route listens: the same for a command-line route and one from the store."""
        c = self.config
        factory = RouteFactory(route, self.context.registry, self.reactor, c.open_timeout, self.context.audit)  # type: ignore[arg-type]
        return _tcp_endpoint(self.reactor, route.bind, route.port), factory

    @property
    def agent_port(self) -> int:
        """The agent port actually listened on (useful with port 0)."""
        port = self.agent_listener.port
        return port.getHost().port if port is not None else self.config.agent_port  # type: ignore[attr-defined]

    def route_agents(self) -> list[tuple[str, int]]:
        """For C{nova_route_agents}: each route and the agents that could carry its streams now."""
        registry = self.context.registry
        routes = self.cluster.in_force().values()
        return [(str(r), sum(not t.draining for t in registry.matching(r.selector))) for r in routes]

    def tunnels(self) -> list[dict[str, object]]:
        return [t.describe() for t in self.context.registry if isinstance(t, ServerTunnel)]

    def startService(self) -> None:
        c = self.config
        log.info("{versions}", versions=versions("novas"))
        epoll.install(self.reactor)  # docs/datapath.md, "The reactor's per-event cost"
        try:
            self.store.start()
        except AuditStoreError as e:
            raise StartupError(f"novas: error: {e}") from None
        if not c.tls:
            log.warn("TLS is OFF on the agent port (--no-tls): tunnel traffic is readable on the network")
        if self._fingerprint_note:
            log.info("{note}", note=self._fingerprint_note)
        super().startService()  # type: ignore[no-untyped-call]
        for route, why in self.cluster.static_failures().items():
            raise StartupError(f"novas: error: cannot listen for route {route}: {why}")
        self.cluster.membership.startService()
        log.info(
            "NOVAS listening for agents on {bind}:{port} ({tls}); {n} route(s); server {id} of the cluster in {store}",
            bind=c.agent_bind,
            port=self.agent_port,
            tls="TLS" if c.tls else "plaintext",
            n=len(c.routes),
            id=c.server_id,
            store=self.cluster.store_name,
        )
        if self.admin_listener is not None:
            log.info(
                "{what} listening ({auth}; {metrics})",
                what=self.admin_listener.what,
                auth="bearer token set" if c.admin_token else "API and page off: set NOVAS_ADMIN_TOKEN",
                metrics="/metrics also takes NOVAS_METRICS_TOKEN" if c.metrics_token else "/metrics: admin token",
            )
        if self.socks_listener is not None:
            log.info(
                "{what} listening ({auth})",
                what=self.socks_listener.what,
                auth="password required" if c.socks_password else "no password: loopback only",
            )
        exit_zero_on_sigterm(self.reactor, log)
        if c.token_file is not None:
            on_signal(self.reactor, signal.SIGHUP, self.reload_tokens)

    def reload_tokens(self) -> None:
        """Re-read the token file; close tunnels whose token is gone."""
        c = self.config
        assert c.token_file is not None and self.context.tokens is not None
        try:
            tokens = load_tokens(c.env_tokens, c.token_file)
        except ConfigError as e:
            log.error("token reload failed, keeping the current tokens: {error}", error=str(e))
            return
        self.context.tokens.replace(tokens)
        closing: list[tuple[ServerTunnel, str]] = []
        for tunnel in self.context.registry:
            if not isinstance(tunnel, ServerTunnel):
                continue
            token = self.context.tokens.get(tunnel.token_key)
            problem = (
                "its token was revoked" if token is None else token.scope.problem(tunnel.name, tunnel.tags.items())
            )
            if problem is None:
                assert token is not None
                tunnel.token_id = token.id  # the label may have changed
            else:
                closing.append((tunnel, problem))
        log.info(
            "reloaded {n} agent token(s) from {path}; closing {m} tunnel(s) whose token was removed"
            " or whose token's scope no longer admits them",
            n=len(tokens),
            path=str(c.token_file),
            m=len(closing),
        )
        for tunnel, why in closing:
            tunnel.revoke(why)

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, tell every agent we are going away (they reconnect
        promptly, to us once we are back or to another server), let open
        streams finish within the drain timeout, then close.
        """
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        waits = [stopped]
        if self.cluster.membership.running:
            waits.append(self.cluster.membership.stopService())
        tunnels = [t for t in self.context.registry if isinstance(t, ServerTunnel)]
        if tunnels:
            busy = sum(t.open_streams() > 0 for t in tunnels)
            log.info(
                "shutting down: draining {busy} agent tunnel(s) with open streams for up to {timeout}s;"
                " {idle} idle tunnel(s) get GOAWAY and {grace:g}s to close",
                busy=busy,
                idle=len(tunnels) - busy,
                timeout=self.config.drain_timeout,
                grace=SHUTDOWN_IDLE_GRACE,
            )
        drains = [
            t.drain(self.config.drain_timeout, ErrorCode.SHUTDOWN, "server shutting down", SHUTDOWN_IDLE_GRACE)
            for t in tunnels
        ]
        self.context.refusals.stop()  # what is still only counted goes to the log and the store now
        d: Deferred[None] = gatherResults([*waits, *drains]).addCallback(lambda _: deferToThread(self.store.stop))
        return d


def _tcp_endpoint(reactor: IReactorCore, bind: str, port: int) -> IStreamServerEndpoint:
    endpoint: IStreamServerEndpoint
    if ":" in bind:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=BACKLOG, interface=bind)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=BACKLOG, interface=bind)
    return endpoint


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return NovasService(options.config, reactor)
