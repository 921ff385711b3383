"""
The membership service driven by a C{Clock} with store calls made inline:
heartbeats, route polling, and a store that goes away mid-heartbeat (the
view goes stale, nothing raises into the reactor, everything catches up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nova.cluster.heartbeat import ClusterMembership, WorkerThread, inline
from nova.cluster.store import SQLiteClusterStore
from nova.rules.membership import Beat, Membership
from nova.rules.records import RouteRecord, ServerRecord, TunnelRecord

T = TypeVar("T")
DEAD = 30.0


class Flaky(SQLiteClusterStore):
    """A SQLite store that can be made to fail, as a database that went away does."""

    down = False
    calls = 0

    def _connect(self) -> Any:
        self.calls += 1
        if self.down:
            raise OSError("connection refused")
        return super()._connect()

    def heartbeat(self, beat: Beat) -> None:
        if self.down:
            self.close()
        super().heartbeat(beat)


class Held:
    """A runner whose calls wait until released: a store that does not answer."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.waiting.append((call, d))
        return d

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for call, d in waiting:
            try:
                d.callback(call())
            except Exception as e:
                d.errback(e)


def service(
    store: SQLiteClusterStore,
    clock: Clock,
    id: str = "a",
    tunnels: list[TunnelRecord] | None = None,
    routes: list[tuple[int, Sequence[RouteRecord]]] | None = None,
    **kw: Any,
) -> ClusterMembership:
    m = Membership(ServerRecord(id, f"{id}:9023", clock.seconds(), "0.1.0", 0.0), DEAD, clock)
    kw.setdefault("run", inline)
    return ClusterMembership(
        store,
        m,
        lambda: list(tunnels or []),
        clock,
        on_routes=(lambda v, r: routes.append((v, r))) if routes is not None else None,
        **kw,
    )


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "cluster.sqlite3"

    def test_two_servers_see_each_other_and_each_others_tunnels(self) -> None:
        clock = Clock()
        a = service(SQLiteClusterStore(self.path), clock, "a", [TunnelRecord("", "db1", {"env": "prod"}, streams=2)])
        b = service(SQLiteClusterStore(self.path), clock, "b", [TunnelRecord("", "web")])
        a.startService()
        b.startService()
        clock.advance(DEAD / 3)
        view = a.view()
        self.assertFalse(view.stale)
        self.assertEqual([s.id for s in view.servers], ["a", "b"])
        self.assertEqual([(t.server, t.agent) for t in view.tunnels], [("b", "web")])
        self.assertEqual([(t.server, t.agent, t.streams) for t in b.view().tunnels], [("a", "db1", 2)])
        self.successResultOf(a.stopService())
        self.successResultOf(b.stopService())

    def test_a_server_that_stops_beating_leaves_every_view_within_the_dead_timeout(self) -> None:
        clock = Clock()
        a = service(SQLiteClusterStore(self.path), clock, "a")
        b = service(SQLiteClusterStore(self.path), clock, "b", [TunnelRecord("", "web")])
        a.startService()
        b.startService()
        b._beats.stop()  # b dies without leaving (kill -9)
        for _ in range(3):
            clock.advance(DEAD / 3)
        self.assertEqual([s.id for s in a.view().servers], ["a", "b"])  # exactly the dead timeout: alive
        clock.advance(DEAD / 3)  # b's last heartbeat is now older than the dead timeout
        self.assertEqual([s.id for s in a.view().servers], ["a"])
        self.assertEqual(a.view().tunnels, ())
        self.assertEqual([s.id for s in SQLiteClusterStore(self.path).members()[0]], ["a"])  # rows deleted too
        self.successResultOf(a.stopService())

    def test_an_orderly_stop_leaves_at_once(self) -> None:
        clock = Clock()
        a, b = service(SQLiteClusterStore(self.path), clock, "a"), service(SQLiteClusterStore(self.path), clock, "b")
        a.startService()
        b.startService()
        self.successResultOf(b.stopService())
        clock.advance(DEAD / 3)
        self.assertEqual([s.id for s in a.view().servers], ["a"])
        self.successResultOf(a.stopService())

    def test_the_store_going_away_mid_heartbeat_makes_the_view_stale_and_nothing_raises(self) -> None:
        clock = Clock()
        store = Flaky(self.path)
        other = service(SQLiteClusterStore(self.path), clock, "b", [TunnelRecord("", "web")])
        other.startService()
        a = service(store, clock, "a")
        a.startService()
        self.assertFalse(a.view().stale)
        clock.advance(1)
        store.down = True
        clock.advance(DEAD / 3)  # the heartbeat fails
        view = a.view()
        self.assertEqual(view.stale_since, DEAD / 3 + 1)
        self.assertIn("connection refused", a.membership.last_error or "")
        for _ in range(20):  # a long outage: every tick fails, nothing escapes, the view keeps what it knew
            clock.advance(DEAD / 3)
        self.assertEqual([s.id for s in a.view().servers], ["a", "b"])
        self.assertEqual([t.agent for t in a.view().tunnels], ["web"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(a._beats.running)
        store.down = False
        clock.advance(DEAD / 3)
        self.assertFalse(a.view().stale)
        self.successResultOf(a.stopService())
        self.successResultOf(other.stopService())

    def test_a_store_that_does_not_answer_counts_as_failed_at_the_next_tick(self) -> None:
        clock = Clock()
        held = Held()
        a = service(SQLiteClusterStore(self.path), clock, "a", run=held)
        a.startService()
        held.release()
        self.assertFalse(a.view().stale)
        clock.advance(DEAD / 3)  # this heartbeat hangs
        clock.advance(DEAD / 3)
        self.assertEqual(a.view().stale_since, 2 * DEAD / 3)
        self.assertIn("has not answered", a.membership.last_error or "")
        held.release()
        self.assertFalse(a.view().stale)
        a.stopService()
        held.release()

    def test_route_changes_are_seen_within_one_poll_and_only_read_when_the_counter_moves(self) -> None:
        clock = Clock()
        seen: list[tuple[int, Sequence[RouteRecord]]] = []
        store = Flaky(self.path)
        a = service(store, clock, "a", routes=seen, route_poll=2.0)
        a.startService()
        self.assertEqual(seen, [(0, [])])
        SQLiteClusterStore(self.path).add_route(RouteRecord("r-1", "16000:web:80", "bob", 1.0))
        clock.advance(2.0)
        self.assertEqual(seen[-1], (1, [RouteRecord("r-1", "16000:web:80", "bob", 1.0)]))
        clock.advance(2.0)
        clock.advance(2.0)
        self.assertEqual(len(seen), 2)  # no change, no new set
        store.down = True
        store.close()
        clock.advance(2.0)
        self.assertTrue(a.view().stale)  # the routes in force stay; no empty set is handed on
        self.assertEqual(len(seen), 2)
        store.down = False
        SQLiteClusterStore(self.path).remove_route("r-1")
        clock.advance(2.0)
        self.assertEqual(seen[-1], (2, []))
        self.successResultOf(a.stopService())

    def test_an_error_in_the_route_callback_is_logged_not_raised_and_polling_goes_on(self) -> None:
        clock = Clock()
        calls: list[int] = []

        def broken(version: int, routes: Sequence[RouteRecord]) -> None:
            calls.append(version)
            raise RuntimeError("bug")

        m = Membership(ServerRecord("a", "a:9023", 0.0, "0.1.0", 0.0), DEAD, clock)
        a = ClusterMembership(SQLiteClusterStore(self.path), m, list, clock, inline, on_routes=broken)
        a.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        SQLiteClusterStore(self.path).add_route(RouteRecord("r-1", "16000:web:80", "bob", 1.0))
        clock.advance(2.0)
        self.assertEqual(calls, [0, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(a.stopService())


class WorkerThreadTests(TestCase):
    """The real thing: the store on its worker thread, the reactor never blocked."""

    timeout = 30

    @inlineCallbacks
    def test_store_calls_run_on_the_worker_thread_which_stops_with_the_service(self) -> Generator[Any, Any, None]:
        from twisted.internet import reactor

        path = Path(self.mktemp()) / "cluster.sqlite3"
        threads: set[str] = set()

        class Watched(SQLiteClusterStore):
            def heartbeat(self, beat: Beat) -> None:
                threads.add(threading.current_thread().name)
                super().heartbeat(beat)

        worker = WorkerThread(reactor)
        m = Membership(ServerRecord("a", "a:9023", 0.0, "0.1.0", 0.0), DEAD, reactor)
        a = ClusterMembership(Watched(path), m, list, reactor, run=worker)
        a.startService()
        for _ in range(200):
            if not a.view().stale:
                break
            yield deferLater(reactor, 0.05)
        self.assertFalse(a.view().stale)
        self.assertEqual(len(threads), 1)
        self.assertNotIn(threading.current_thread().name, threads)
        yield a.stopService()
        self.assertFalse(worker.pool.started)
        self.assertEqual(SQLiteClusterStore(path).members(), ([], []))  # it left
