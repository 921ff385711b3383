"""
NOVAC (adapters and assembly): dials out to every NOVAS, registers, and
connects the streams NOVAS opens to targets inside its own network.

L{nova.agent.dialer} (resolves and dials as the destination rules in
L{nova.rules.destinations} allow), L{nova.agent.tunnel} (the agent's end of
a tunnel), L{nova.agent.reconnect} (one reconnecting tunnel per server),
L{nova.agent.events} (the events the agent reports; a no-op base),
L{nova.agent.metrics} (the same events counted for Prometheus),
L{nova.agent.health} (the probe port).  Assembly: L{nova.agent.options}
(settings), L{nova.agent.wiring} (endpoint and tunnel context from the
settings), L{nova.agent.tap} (the service), L{nova.agent.check}
(C{--check}: a runner over the connection steps).
"""
