"""
How the agent is put together from its configuration: the endpoint it
dials a server with and the context its tunnels share.  Written once, for
the service (L{nova.agent.tap}) and for C{--check} (L{nova.agent.check}),
so the check dials exactly as the agent does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from nova.tls import client_creator

from .events import AgentEvents
from .options import AgentConfig
from .tunnel import AgentContext, TargetConnector


def server_label(host: str, port: int) -> str:
    """C{HOST:PORT}, with an IPv6 address in brackets: how logs, metrics and the check name a server."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_endpoint(reactor: Any, config: AgentConfig, host: str, port: int) -> IStreamClientEndpoint:
    """
    The endpoint the agent dials C{host:port} with: TCP within the connect
    timeout, then TLS verified as configured (unless TLS is off).  Raises
    L{nova.tls.TLSConfigError} when the certificate files are unusable.
    """
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=config.connect_timeout)
    if config.tls:
        creator = client_creator(config.server_name or host, config.ca, config.fingerprint, config.client_cert)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


def agent_context(
    config: AgentConfig,
    reactor: Any,
    connect_target: TargetConnector,
    metrics: AgentEvents,
    *,
    name: str | None = None,
    tags: tuple[tuple[str, str], ...] | None = None,
    max_streams: int | None = None,
) -> AgentContext:
    """The context of the agent's tunnels; C{name}, C{tags} and C{max_streams} override the configuration's."""
    return AgentContext(
        name=config.name if name is None else name,
        tags=config.tags if tags is None else tags,
        token=config.token,
        tls=config.tls,
        clock=reactor,
        connect_target=connect_target,
        window=config.window,
        max_window=config.max_window,
        timing=config.timing(),
        max_streams=config.max_streams if max_streams is None else max_streams,
        max_open_rate=float(config.max_open_rate),
        policy=config.policy,
        metrics=metrics,
    )
