"""
Decisions, with no I/O (a pure core): what is allowed, and who is chosen.

L{nova.rules.destinations}: the agent's destination rule language.
L{nova.rules.admission}: agent tokens and their scopes, the failure
throttle and the handshake limits.  L{nova.rules.routes}: route specs and
agent selectors.  L{nova.rules.records}, L{nova.rules.membership},
L{nova.rules.selection}, L{nova.rules.routetable}, L{nova.rules.drains}:
the cluster's rows, who is alive, the agent least loaded across the cluster,
the wanted set of routes and which tunnels a drain request drains, with
time passed in.  The adapters that act on these decisions live
in L{nova.agent}, L{nova.server} and L{nova.cluster}.
"""
