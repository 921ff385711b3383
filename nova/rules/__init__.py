"""
Decisions, with no I/O (a pure core): what is allowed, and who is chosen.

L{nova.rules.destinations}: the agent's destination rule language.
L{nova.rules.admission}: agent tokens and their scopes, the failure
throttle and the handshake limits.  L{nova.rules.routes}: route specs and
agent selectors.  L{nova.rules.records}, L{nova.rules.membership},
L{nova.rules.selection}, L{nova.rules.routetable}: the cluster's rows,
who is alive, the least-loaded agent across the cluster and the wanted set of
routes, with time passed in.  The adapters that act on these decisions live
in L{nova.agent}, L{nova.server} and L{nova.cluster}.
"""
