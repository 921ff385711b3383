"""
The NOVAS cluster (adapters): servers that share one store see each other,
each other's tunnels and one set of routes.

L{nova.cluster.store}: the blocking SQLite and PostgreSQL schema;
L{nova.cluster.heartbeat}: the Twisted service that runs the store off the
reactor; L{nova.cluster.listeners}: route listeners started and stopped at
run time.  The decisions they act on (membership, expiry, selection, the
wanted routes) are pure and live in L{nova.rules}.  See C{docs/cluster.md}.
"""
