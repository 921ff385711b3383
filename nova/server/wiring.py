"""
How NOVAS's tunnel context is put together from its configuration: written
once, for the service (L{nova.server.tap}) and for the tests, which build it
from the settings' defaults (tests/contexts.py) instead of keeping defaults
of their own.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from nova.admin.audit import Audit
from nova.rules.admission import TokenSet

from .options import ServerConfig
from .tunnel import ServerContext


def server_context(
    config: ServerConfig,
    clock: IReactorTime,
    audit: Audit,
) -> ServerContext:
    """The context of the server's tunnels (the members provider is set once the cluster is built)."""
    return ServerContext(
        token=None,
        tokens=TokenSet(config.tokens),
        tls=config.tls,
        clock=clock,
        window=config.window,
        max_window=config.max_window,
        timing=config.timing(),
        server_id=config.server_id,
        limits=config.limits,
        client_ca=config.client_ca is not None,
        audit=audit,
    )
