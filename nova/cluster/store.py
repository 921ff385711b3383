"""
The cluster's store: servers, their tunnels, the routes added at run time
and a change counter for them, in SQLite (one server, zero setup) or
PostgreSQL (a cluster: the servers that share C{--audit-db postgresql://}).

Blocking: every method runs on one worker thread (see
L{nova.cluster.heartbeat}), never on the reactor.  One schema for both
databases, created idempotently; every write is an upsert or a guarded
insert, so any number of servers may write at once.  A connection that
fails is dropped and opened again on the next call: a database that restarts
is used again as soon as it is back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from nova.rules.membership import Beat
from nova.rules.records import DrainRequest, RouteRecord, ServerRecord, TunnelRecord
from nova.rules.routetable import RouteRejected, listen_key, validate, validate_id

# The schema, in SQL both databases read; '?' placeholders (rewritten for psycopg).
SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS nova_servers (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        version TEXT NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS nova_tunnels (
        server TEXT NOT NULL,
        agent TEXT NOT NULL,
        tags TEXT NOT NULL,
        token_id TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        streams BIGINT NOT NULL,
        bytes_to_agent BIGINT NOT NULL,
        bytes_from_agent BIGINT NOT NULL,
        draining BOOLEAN NOT NULL,
        PRIMARY KEY (server, agent)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS nova_routes (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        listen TEXT UNIQUE,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS nova_cluster_version (
        name TEXT PRIMARY KEY,
        version BIGINT NOT NULL
    )
    """,
    "INSERT INTO nova_cluster_version (name, version) VALUES ('routes', 0) ON CONFLICT (name) DO NOTHING",
    # Drain requests (POST /api/v1/tunnels/{name}/drain): every member reads
    # them at its route poll and drains its own tunnel of the agent.  A new
    # table, so an existing database gains it at the next start (IF NOT EXISTS).
    """
    CREATE TABLE IF NOT EXISTS nova_drains (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at DOUBLE PRECISION NOT NULL,
        server TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    )
    """,
)


class ClusterStoreError(Exception):
    """The store cannot be reached or refused a write; the message never carries the database password."""


class DuplicateRoute(RouteRejected):
    """A route with this id, or listening on this address, exists already."""


class ClusterStore(Protocol):
    """What the heartbeat service and (later) the admin API call, on the worker thread."""

    def open(self) -> None: ...

    def heartbeat(self, beat: Beat) -> None: ...

    def members(self) -> tuple[list[ServerRecord], list[TunnelRecord]]: ...

    def leave(self, server: str) -> None: ...

    def routes_version(self) -> int: ...

    def routes(self) -> tuple[int, list[RouteRecord]]: ...

    def add_route(self, record: RouteRecord, default_bind: str = "127.0.0.1") -> int: ...

    def remove_route(self, route_id: str) -> int | None: ...

    def add_drain(self, request: DrainRequest) -> None: ...

    def drains(self, now: float) -> list[DrainRequest]: ...

    def close(self) -> None: ...


class _SQLStore:
    """The one implementation; subclasses say how to connect and what a unique violation is."""

    _integrity: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self._conn: Any = None

    # -- what subclasses provide

    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        raise NotImplementedError
        yield

    def _describe(self, error: Exception) -> str:
        return str(error)

    # -- the operations

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A transaction on the (re)opened connection; a failure drops the connection."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            with self._transaction(conn):
                yield conn
        except RouteRejected:
            raise
        except Exception as e:
            if not isinstance(e, self._integrity):
                self.close()
            raise ClusterStoreError(self._describe(e)) from e

    def _run(self, conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        return conn.execute(self._sql(sql), tuple(args))

    def open(self) -> None:
        with self._tx() as conn:
            for statement in SCHEMA:
                self._run(conn, statement)

    def heartbeat(self, beat: Beat) -> None:
        """Our row, our tunnels (replacing the last set) and the expiry of dead members, in one transaction."""
        s = beat.server
        with self._tx() as conn:
            self._run(
                conn,
                "INSERT INTO nova_servers (id, address, started, version, heartbeat) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET address = excluded.address, started = excluded.started,"
                " version = excluded.version, heartbeat = excluded.heartbeat",
                (s.id, s.address, s.started, s.version, s.heartbeat),
            )
            self._run(conn, "DELETE FROM nova_tunnels WHERE server = ?", (s.id,))
            for t in beat.tunnels:
                self._run(
                    conn,
                    "INSERT INTO nova_tunnels (server, agent, tags, token_id, since, streams, bytes_to_agent,"
                    " bytes_from_agent, draining) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (server, agent) DO UPDATE SET tags = excluded.tags, token_id = excluded.token_id,"
                    " since = excluded.since, streams = excluded.streams, bytes_to_agent = excluded.bytes_to_agent,"
                    " bytes_from_agent = excluded.bytes_from_agent, draining = excluded.draining",
                    (
                        s.id,
                        t.agent,
                        json.dumps(dict(t.tags), sort_keys=True),
                        t.token_id,
                        t.since,
                        t.streams,
                        t.bytes_to_agent,
                        t.bytes_from_agent,
                        bool(t.draining),
                    ),
                )
            self._run(
                conn,
                "DELETE FROM nova_tunnels WHERE server IN (SELECT id FROM nova_servers WHERE heartbeat < ?)",
                (beat.expire_before,),
            )
            self._run(conn, "DELETE FROM nova_servers WHERE heartbeat < ?", (beat.expire_before,))
            self._run(conn, "DELETE FROM nova_drains WHERE expires < ?", (s.heartbeat,))

    def members(self) -> tuple[list[ServerRecord], list[TunnelRecord]]:
        with self._tx() as conn:
            servers = [
                ServerRecord(i, a, float(st), v, float(h))
                for i, a, st, v, h in self._run(
                    conn, "SELECT id, address, started, version, heartbeat FROM nova_servers ORDER BY id"
                ).fetchall()
            ]
            tunnels = [
                TunnelRecord(srv, agent, json.loads(tags), tok, float(since), int(n), int(up), int(down), bool(dr))
                for srv, agent, tags, tok, since, n, up, down, dr in self._run(
                    conn,
                    "SELECT server, agent, tags, token_id, since, streams, bytes_to_agent, bytes_from_agent, draining"
                    " FROM nova_tunnels ORDER BY server, agent",
                ).fetchall()
            ]
        return servers, tunnels

    def leave(self, server: str) -> None:
        """An orderly stop: our rows go at once rather than at expiry."""
        with self._tx() as conn:
            self._run(conn, "DELETE FROM nova_tunnels WHERE server = ?", (server,))
            self._run(conn, "DELETE FROM nova_servers WHERE id = ?", (server,))

    def routes_version(self) -> int:
        """The change counter: cheap to poll; it moves whenever a route is added or removed."""
        with self._tx() as conn:
            row = self._run(conn, "SELECT version FROM nova_cluster_version WHERE name = 'routes'").fetchone()
        return int(row[0]) if row else 0

    def routes(self) -> tuple[int, list[RouteRecord]]:
        """Every dynamic route and the version they are as of, read in one transaction."""
        with self._tx() as conn:
            row = self._run(conn, "SELECT version FROM nova_cluster_version WHERE name = 'routes'").fetchone()
            rows = self._run(
                conn, "SELECT id, spec, created_by, created_at FROM nova_routes ORDER BY created_at, id"
            ).fetchall()
        return (int(row[0]) if row else 0), [RouteRecord(i, s, b, float(at)) for i, s, b, at in rows]

    def add_route(self, record: RouteRecord, default_bind: str = "127.0.0.1") -> int:
        """
        Add a route; returns the new version.  L{RouteRejected} when its
        spec or id is not valid, L{DuplicateRoute} when its id or its
        listening address is taken (also when another server took it a
        moment before: the unique constraints decide).
        """
        validate_id(record.id)
        key = listen_key(validate(record.spec, default_bind))
        try:
            with self._tx() as conn:
                clash = self._run(
                    conn, "SELECT id, listen FROM nova_routes WHERE id = ? OR listen = ?", (record.id, key)
                ).fetchone()
                if clash is not None:
                    raise _duplicate(record.id, key, clash[0])
                self._run(
                    conn,
                    "INSERT INTO nova_routes (id, spec, listen, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
                    (record.id, record.spec.strip(), key, record.created_by, record.created_at),
                )
                return self._bump(conn)
        except ClusterStoreError as e:
            if isinstance(e.__cause__, self._integrity):
                raise DuplicateRoute(
                    f"route {record.id!r} or the address {key} was added at the same time by another server"
                ) from None
            raise

    def remove_route(self, route_id: str) -> int | None:
        """Remove a route; the new version, or None if there was no such route."""
        with self._tx() as conn:
            gone = self._run(conn, "DELETE FROM nova_routes WHERE id = ?", (route_id,)).rowcount
            if not gone:
                return None
            return self._bump(conn)

    def add_drain(self, request: DrainRequest) -> None:
        """Record a drain request for every member to apply."""
        r = request
        with self._tx() as conn:
            self._run(
                conn,
                "INSERT INTO nova_drains (id, agent, requested_by, requested_at, server, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (r.id, r.agent, r.requested_by, r.requested_at, r.server, r.expires),
            )

    def drains(self, now: float) -> list[DrainRequest]:
        """The drain requests that have not expired at C{now}, oldest first."""
        with self._tx() as conn:
            rows = self._run(
                conn,
                "SELECT id, agent, requested_by, requested_at, server, expires FROM nova_drains"
                " WHERE expires >= ? ORDER BY requested_at, id",
                (now,),
            ).fetchall()
        return [DrainRequest(i, a, b, float(at), srv, float(ex)) for i, a, b, at, srv, ex in rows]

    def _bump(self, conn: Any) -> int:
        self._run(conn, "UPDATE nova_cluster_version SET version = version + 1 WHERE name = 'routes'")
        row = self._run(conn, "SELECT version FROM nova_cluster_version WHERE name = 'routes'").fetchone()
        return int(row[0])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is gone either way
                pass


def _duplicate(route_id: str, key: str | None, other: str) -> DuplicateRoute:
    if other == route_id:
        return DuplicateRoute(f"route id {route_id!r} exists already")
    return DuplicateRoute(f"{key} is already the listening address of route {other!r}")


class SQLiteClusterStore(_SQLStore):
    """One server's store, in a file of its state directory."""

    _integrity = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are begun explicitly below.
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        # IMMEDIATE: the write lock is taken at the start, so two writers
        # never both read "no such route" and then insert.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class PostgresClusterStore(_SQLStore):
    """The cluster's shared store (psycopg 3), beside the audit history."""

    def __init__(self, dsn: str, connect_timeout: int = 5) -> None:
        super().__init__()
        import psycopg

        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._integrity = (psycopg.IntegrityError,)

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, connect_timeout=self.connect_timeout, autocommit=True)

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def _describe(self, error: Exception) -> str:
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        password = urlsplit(self.dsn).password
        for secret in (self.dsn, password):
            if secret:
                detail = detail.replace(secret, "***")
        return detail


def cluster_store_for(url: str | None, state_dir: Path) -> ClusterStore:
    """
    The store beside the audit history of C{--audit-db}: the same
    PostgreSQL database, or (SQLite) the same file, or C{cluster.sqlite3}
    in the state directory when there is no C{--audit-db}.
    """
    if url is None or url == "":
        return SQLiteClusterStore(state_dir / "cluster.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresClusterStore(url)
    if url.startswith("sqlite:///"):
        return SQLiteClusterStore(Path(url[len("sqlite:///") - 1 :]))
    raise ValueError("the cluster store is postgresql://... or sqlite:///PATH")
