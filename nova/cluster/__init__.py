"""
The NOVAS cluster (issue 16): servers that share one store see each other,
each other's tunnels and one set of routes.

Pure cores (no I/O, time passed in): L{records} (the rows), L{membership}
(heartbeats, expiry, the cluster view and its staleness), L{selection}
(least-loaded agent across the cluster), L{routetable} (routes as data:
validation and the desired set).  Adapters: L{store} (the blocking SQLite and
PostgreSQL schema), L{heartbeat} (the Twisted service that runs the store off
the reactor), L{listeners} (route listeners started and stopped at run time).
See C{docs/cluster.md}.
"""
