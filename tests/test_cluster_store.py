"""
The cluster store on SQLite and on a real PostgreSQL (started by the test,
marked integration): the same tests against both, since the schema is one.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nova.cluster.store import (
    ClusterStoreError,
    DuplicateRoute,
    PostgresClusterStore,
    SQLiteClusterStore,
    _SQLStore,
    cluster_store_for,
)
from nova.rules.membership import Beat
from nova.rules.records import DrainRequest, RouteRecord, ServerRecord, TunnelRecord
from nova.rules.routetable import RouteRejected

from .processes import postgres_server

Factory = Callable[[], _SQLStore]


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as (port, _bindir):
        yield f"postgresql://nova@127.0.0.1:{port}/postgres"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens stores on one fresh database: call it once per server."""
    made: list[_SQLStore] = []
    if request.param == "sqlite":

        def make() -> _SQLStore:
            made.append(SQLiteClusterStore(tmp_path / "cluster.sqlite3"))
            return made[-1]
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:  # a fresh schema for each test
            for table in ("nova_servers", "nova_tunnels", "nova_routes", "nova_cluster_version", "nova_drains"):
                conn.execute(f"DROP TABLE IF EXISTS {table}")

        def make() -> _SQLStore:
            made.append(PostgresClusterStore(dsn))
            return made[-1]

    yield make
    for store in made:
        store.close()


def opened(new_store: Factory) -> _SQLStore:
    store = new_store()
    store.open()
    return store


def beat(server: str, at: float, tunnels: list[TunnelRecord] = [], expire_before: float = 0.0) -> Beat:  # noqa: B006
    return Beat(ServerRecord(server, f"{server}:9023", 1.0, "0.1.0", at), tuple(tunnels), expire_before)


def test_the_schema_is_created_idempotently_by_every_server(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    a.open()
    b.open()
    assert a.routes() == (0, [])
    assert b.members() == ([], [])


def test_a_heartbeat_upserts_the_server_and_replaces_its_tunnels(new_store: Factory) -> None:
    store = opened(new_store)
    store.heartbeat(beat("a", 10, [TunnelRecord("a", "db1", {"env": "prod"}, "tok", 5.0, 2, 100, 200, False)]))
    store.heartbeat(beat("a", 20, [TunnelRecord("a", "db2", {}, "tok", 6.0, 0, 0, 0, True)]))
    servers, tunnels = store.members()
    assert servers == [ServerRecord("a", "a:9023", 1.0, "0.1.0", 20)]
    assert tunnels == [TunnelRecord("a", "db2", {}, "tok", 6.0, 0, 0, 0, True)]


def test_two_servers_upserting_the_same_tunnel_name_each_keep_their_own_row(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    a.heartbeat(beat("a", 10, [TunnelRecord("a", "db", {"env": "prod"}, streams=1)]))
    b.heartbeat(beat("b", 10, [TunnelRecord("b", "db", {"env": "dev"}, streams=7)]))
    a.heartbeat(beat("a", 11, [TunnelRecord("a", "db", {"env": "prod"}, streams=3)]))
    _, tunnels = b.members()
    assert [(t.server, t.agent, t.tags, t.streams) for t in tunnels] == [
        ("a", "db", {"env": "prod"}, 3),
        ("b", "db", {"env": "dev"}, 7),
    ]


def test_a_silent_servers_rows_expire_at_the_next_heartbeat_of_any_member(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    b.heartbeat(beat("b", 10, [TunnelRecord("b", "db")]))
    a.heartbeat(beat("a", 40, [TunnelRecord("a", "web")], expire_before=10))  # b is exactly at the horizon: kept
    assert [s.id for s in a.members()[0]] == ["a", "b"]
    a.heartbeat(beat("a", 41, [TunnelRecord("a", "web")], expire_before=10.5))
    servers, tunnels = a.members()
    assert [s.id for s in servers] == ["a"]
    assert [t.key for t in tunnels] == [("a", "web")]


def test_leaving_removes_our_rows_at_once(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    a.heartbeat(beat("a", 10, [TunnelRecord("a", "db")]))
    b.heartbeat(beat("b", 10, [TunnelRecord("b", "db")]))
    a.leave("a")
    servers, tunnels = b.members()
    assert [s.id for s in servers] == ["b"] and [t.key for t in tunnels] == [("b", "db")]


def test_routes_are_added_and_removed_and_each_change_moves_the_version(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    assert a.add_route(RouteRecord("r-1", " 16000:web:80@env=prod ", "alice", 5.0)) == 1
    assert b.routes_version() == 1
    assert b.routes() == (1, [RouteRecord("r-1", "16000:web:80@env=prod", "alice", 5.0)])
    assert b.add_route(RouteRecord("r-2", "16001:db:5432", "bob", 6.0)) == 2
    assert a.remove_route("r-1") == 3
    assert a.remove_route("r-1") is None
    assert b.routes() == (3, [RouteRecord("r-2", "16001:db:5432", "bob", 6.0)])


def test_drain_requests_are_shared_until_they_expire(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    first = DrainRequest("d-1", "db", "admin", 10.0, "a", 70.0)
    second = DrainRequest("d-2", "odd name \u00e9'; --", "admin", 11.0, "a", 100.0)
    a.add_drain(first)
    a.add_drain(second)
    assert b.drains(20.0) == [first, second]
    assert b.drains(80.0) == [second]  # expired requests are not read...
    b.heartbeat(beat("b", 80.0))
    assert a.drains(0.0) == [second]  # ...and any member's heartbeat deletes them


def test_an_existing_database_gains_the_drain_table(new_store: Factory) -> None:
    store = opened(new_store)
    with store._tx() as conn:  # a database made before drains were shared
        store._run(conn, "DROP TABLE nova_drains")
    again = opened(new_store)
    again.add_drain(DrainRequest("d-1", "db", "admin", 10.0, "a", 70.0))
    assert [r.id for r in store.drains(0.0)] == ["d-1"]


def test_duplicate_route_ids_and_listening_addresses_are_refused(new_store: Factory) -> None:
    a, b = opened(new_store), opened(new_store)
    a.add_route(RouteRecord("r-1", "16000:web:80", "alice", 5.0))
    with pytest.raises(DuplicateRoute, match="route id 'r-1' exists already"):
        b.add_route(RouteRecord("r-1", "16001:web:80", "bob", 6.0))
    with pytest.raises(DuplicateRoute, match=r"127.0.0.1:16000 is already the listening address of route 'r-1'"):
        b.add_route(RouteRecord("r-2", "127.0.0.1:16000:db:5432", "bob", 6.0))
    # Port 0 takes a fresh port each time: never a clash.
    b.add_route(RouteRecord("r-3", "0:db:5432", "bob", 7.0))
    b.add_route(RouteRecord("r-4", "0:db:5432", "bob", 8.0))
    assert [r.id for r in a.routes()[1]] == ["r-1", "r-3", "r-4"]
    assert a.routes_version() == 3


def test_invalid_specs_and_ids_are_refused_before_the_database_is_touched(new_store: Factory) -> None:
    store = new_store()  # not even opened: validation comes first
    with pytest.raises(RouteRejected, match="is not \\[BIND:\\]PORT:HOST:HOSTPORT"):
        store.add_route(RouteRecord("r-1", "16000:web", "alice", 5.0))
    with pytest.raises(RouteRejected, match="HOSTPORT"):
        store.add_route(RouteRecord("r-1", "16000:web:0", "alice", 5.0))
    with pytest.raises(RouteRejected, match="command line"):
        store.add_route(RouteRecord("static-0", "16000:web:80", "alice", 5.0))


def test_servers_adding_the_same_route_at_once_one_wins(new_store: Factory) -> None:
    stores = [opened(new_store) for _ in range(6)]
    outcomes: list[str] = []
    start = threading.Barrier(len(stores))

    def add(i: int) -> None:
        start.wait()
        try:
            stores[i].add_route(RouteRecord(f"r-{i}", "16000:web:80", f"server{i}", float(i)))
            outcomes.append("added")
        except DuplicateRoute:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["added"] + ["duplicate"] * (len(stores) - 1)
    assert stores[0].routes_version() == 1


def test_an_unreachable_store_is_a_clear_error_and_the_next_call_reconnects(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    store = SQLiteClusterStore(blocked / "cluster.sqlite3")
    with pytest.raises(ClusterStoreError):
        store.heartbeat(beat("a", 1))
    blocked.unlink()
    store.open()
    store.heartbeat(beat("a", 2))
    assert [s.id for s in store.members()[0]] == ["a"]
    store.close()


def test_a_heartbeat_cut_half_way_writes_nothing(tmp_path: Path) -> None:
    class CutAfterOurRow(SQLiteClusterStore):
        cut = False

        def _run(self, conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
            if self.cut and sql.startswith("INSERT INTO nova_tunnels"):
                raise sqlite3.OperationalError("disk I/O error")
            return super()._run(conn, sql, args)

    store = CutAfterOurRow(tmp_path / "cluster.sqlite3")
    store.open()
    store.heartbeat(beat("a", 1, [TunnelRecord("a", "db1")]))
    store.cut = True
    with pytest.raises(ClusterStoreError, match="disk I/O error"):
        store.heartbeat(beat("a", 2, [TunnelRecord("a", "db2")]))
    store.cut = False
    servers, tunnels = store.members()  # the connection was dropped and is opened again
    assert [s.heartbeat for s in servers] == [1] and [t.agent for t in tunnels] == ["db1"]
    store.close()


@pytest.mark.integration
def test_a_postgresql_connection_cut_mid_heartbeat_is_an_error_then_reconnects(postgres_dsn: str) -> None:
    import psycopg

    store = PostgresClusterStore(postgres_dsn)
    store.open()
    store.heartbeat(beat("cut", 1))
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND datname = current_database() AND backend_type = 'client backend'"
        )
    with pytest.raises(ClusterStoreError) as caught:
        store.heartbeat(beat("cut", 2))
    assert str(caught.value)
    store.heartbeat(beat("cut", 3))
    assert [s.heartbeat for s in store.members()[0] if s.id == "cut"] == [3]
    store.leave("cut")
    store.close()


@pytest.mark.integration  # connects to a port nothing listens on
def test_a_postgresql_error_never_carries_the_password() -> None:
    from .processes import free_port

    store = PostgresClusterStore(f"postgresql://nova:s3cret-pw@127.0.0.1:{free_port()}/nova", connect_timeout=2)
    with pytest.raises(ClusterStoreError) as caught:
        store.open()
    assert "s3cret-pw" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)


def test_the_store_is_chosen_like_the_audit_store(tmp_path: Path) -> None:
    default = cluster_store_for(None, tmp_path)
    assert isinstance(default, SQLiteClusterStore) and default.path == tmp_path / "cluster.sqlite3"
    given = cluster_store_for("sqlite:///var/lib/nova/audit.db", tmp_path)
    assert isinstance(given, SQLiteClusterStore) and given.path == Path("/var/lib/nova/audit.db")
    shared = cluster_store_for("postgresql://nova:secret@db/nova", tmp_path)
    assert isinstance(shared, PostgresClusterStore)
    with pytest.raises(ValueError, match="postgresql"):
        cluster_store_for("mysql://x", tmp_path)
