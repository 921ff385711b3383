"""
Tunnel contexts for tests, as NOVAS and NOVAC build them: from a
configuration whose every value is its setting's typed default (the
settings table is the one place a default is written), through the same
wiring the services use; a test names only the fields it varies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.interfaces import IReactorTime

from nova.admin.audit import Audit
from nova.agent import options as agent_options
from nova.agent.events import AgentEvents
from nova.agent.tunnel import AgentContext, TargetConnector
from nova.agent.wiring import agent_context as wire_agent_context
from nova.config import resolve
from nova.rules.admission import Limits
from nova.server import options as server_options
from nova.server.registry import Registry
from nova.server.socks import SocksFactory
from nova.server.tunnel import ServerContext
from nova.server.wiring import server_context as wire_server_context

SERVER_CONFIG = server_options.build_config(
    resolve(server_options.SETTINGS, {}, {"NOVAS_AGENT_TOKEN": "config-default-token"})
)
AGENT_CONFIG = agent_options.build_config(
    resolve(
        agent_options.SETTINGS,
        {},
        {"NOVAC_SERVER": "novas.test:9022", "NOVAC_TOKEN": "config-default-token", "NOVAC_TLS": "off"},
    )
)


def server_context(clock: IReactorTime, **given: Any) -> ServerContext:
    """
    NOVAS's context with every setting at its default, the server id
    C{novas}, and C{given} fields instead.  A test's C{token} replaces the
    configuration's tokens (as one token given alone does).
    """
    fields: dict[str, Any] = {"server_id": "novas", "throttle": None, **given}  # throttle: rebuilt from the limits
    if "token" in given and "tokens" not in given:
        fields["tokens"] = None
    base = wire_server_context(SERVER_CONFIG, clock, fields.pop("audit", None) or Audit())
    return dataclasses.replace(base, **fields)


def agent_context(clock: IReactorTime, connect_target: TargetConnector, **given: Any) -> AgentContext:
    """
    NOVAC's context with every setting at its default, counted for Prometheus
    (tests read the registry), and C{given} fields instead.
    """
    from nova.agent.metrics import AgentMetrics

    metrics: AgentEvents = given.pop("metrics", None) or AgentMetrics()
    base = wire_agent_context(AGENT_CONFIG, clock, connect_target, metrics)
    return dataclasses.replace(base, **given)


def socks_factory(
    registry: Registry, clock: IReactorTime, password: bytes | None, limits: Limits | None = None
) -> SocksFactory:
    """NOVAS's SOCKS5 entry with its settings at their defaults (and C{limits} instead, if given)."""
    c = SERVER_CONFIG
    return SocksFactory(
        registry, clock, password, c.open_timeout, Audit(), c.socks_timeout, c.limits if limits is None else limits
    )
