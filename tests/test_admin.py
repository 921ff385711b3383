"""
The admin interface: the API, audit history, metrics and probes with real
processes; the audit store's queue; PostgreSQL; the page in a real browser.

The tests that start processes or open real sockets are in
tests/test_admin_integration.py.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nova.admin.audit import Audit
from nova.admin.metrics import Metrics
from nova.admin.store import AuditStore, Query, Record, SQLiteBackend

from .processes import ADMIN_TOKEN, wait_for


def get(port: int, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class StoreTests(SynchronousTestCase):
    def test_records_round_trip_with_filters_and_pages(self) -> None:
        path = Path(self.mktemp()) / "audit.sqlite3"
        store = AuditStore(SQLiteBackend(path), retention=None)
        store.start()
        for i in range(25):
            store.record(
                Record("stream_closed" if i % 2 else "stream_opened", 1000.0 + i, f"agent-{i % 3}", "s1", {"i": i})
            )
        store.stop()
        total, events = store.query(Query(limit=10))
        self.assertEqual((total, len(events)), (25, 10))
        self.assertEqual(events[0]["i"], 24)  # newest first
        total, events = store.query(Query(agent="agent-1", kind="stream_closed"))
        self.assertEqual({e["agent"] for e in events}, {"agent-1"})
        self.assertEqual({e["kind"] for e in events}, {"stream_closed"})
        self.assertEqual(total, len([i for i in range(25) if i % 3 == 1 and i % 2]))
        total, events = store.query(Query(since=1010, until=1015, limit=100, offset=2))
        self.assertEqual(total, 5)
        self.assertEqual([e["i"] for e in events], [12, 11, 10])

    def test_a_blocked_store_never_blocks_the_caller(self) -> None:
        release = threading.Event()

        class Stuck(SQLiteBackend):
            def insert(self, records: Any) -> None:
                release.wait(30)

        metrics = Metrics()
        store = AuditStore(Stuck(Path(self.mktemp()) / "a.db"), max_queue=10, on_dropped=metrics.audit_dropped.inc)
        store.start()
        started = time.monotonic()
        for i in range(5000):
            store.record(Record("stream_opened", float(i)))
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertGreater(store.dropped, 4900)
        self.assertEqual(metrics.audit_dropped._value.get(), store.dropped)
        release.set()
        store.stop()

    def test_a_burst_of_records_is_written_in_one_transaction(self) -> None:
        inserts: list[int] = []

        class Counting(SQLiteBackend):
            def insert(self, records: Any) -> None:
                inserts.append(len(records))
                super().insert(records)

        store = AuditStore(Counting(Path(self.mktemp()) / "a.db"), retention=None, linger=1.0)
        store.start()
        store.record(Record("stream_opened", 1.0))
        # The writer has taken the first record and lingers for more.
        wait_for(store._queue.empty, 10, "the writer to take the first record")
        for i in range(99):
            store.record(Record("stream_closed", 2.0 + i))
        store.stop()
        self.assertEqual(inserts, [100])
        self.assertEqual(store.query(Query())[0], 100)

    def test_retention_prunes_old_records(self) -> None:
        now = 10_000_000.0
        store = AuditStore(SQLiteBackend(Path(self.mktemp()) / "a.db"), retention=86400, clock=lambda: now)
        store.start()
        store.record(Record("stream_opened", now - 2 * 86400))
        store.record(Record("stream_opened", now - 10))
        store.stop()
        store2 = AuditStore(store.backend, retention=86400, clock=lambda: now)
        store2.start()
        store2.record(Record("stream_opened", now))
        store2.stop()
        total, _ = store2.query(Query())
        self.assertEqual(total, 2)


class BlockedStoreTunnelTests(SynchronousTestCase):
    def test_transfer_through_the_tunnel_with_a_stuck_store(self) -> None:
        from .test_tunnel import Harness

        release = threading.Event()

        class Stuck(SQLiteBackend):
            def insert(self, records: Any) -> None:
                release.wait(30)

        store = AuditStore(Stuck(Path(self.mktemp()) / "a.db"), max_queue=2)
        store.start()
        self.addCleanup(store.stop)
        self.addCleanup(release.set)  # cleanups run last-in first-out: release, then stop
        h = Harness()
        h.server_context.audit = Audit(store)
        for _ in range(20):
            h.server_context.audit.stream_opened("db-agent", "route x", "127.0.0.1:1", "db:5432", 0.001)
        stream, _user, target_transport, _ = h.open()
        payload = os.urandom(512 * 1024)
        stream.write(payload)
        for _ in range(100):
            h.flush()
            if len(target_transport.value()) == len(payload):
                break
        self.assertEqual(target_transport.value(), payload)
        self.assertGreater(store.dropped, 0)
