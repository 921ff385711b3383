"""
The audit store: records written off the reactor thread, in batches,
through a bounded queue, to SQLite (default, in the state dir) or
PostgreSQL (several servers sharing one history).

A slow or failing disk never stalls a tunnel: when the queue is full a
record is dropped, counted and logged, and the tunnel carries on.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import Logger

from nova.errors import NovaError

log = Logger()


@dataclass(frozen=True)
class Record:
    """One audit event."""

    kind: str
    ts: float
    agent: str = ""
    server: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self, id: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "time": self.ts, "agent": self.agent, "server": self.server}
        if id is not None:
            out["id"] = id
        out.update(self.data)
        return out


@dataclass(frozen=True)
class Query:
    since: float | None = None
    until: float | None = None
    agent: str | None = None
    kind: str | None = None
    limit: int = 100
    offset: int = 0


class Backend(Protocol):
    """A database the writer thread appends to and queries read from."""

    def open(self) -> None: ...

    def insert(self, records: Sequence[Record]) -> None: ...

    def prune(self, before: float) -> int: ...

    def query(self, q: Query) -> tuple[int, list[dict[str, Any]]]: ...

    def close(self) -> None: ...


def _where(q: Query, placeholder: str) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if q.since is not None:
        clauses.append(f"ts >= {placeholder}")
        args.append(q.since)
    if q.until is not None:
        clauses.append(f"ts < {placeholder}")
        args.append(q.until)
    if q.agent:
        clauses.append(f"agent = {placeholder}")
        args.append(q.agent)
    if q.kind:
        clauses.append(f"kind = {placeholder}")
        args.append(q.kind)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SQLiteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect()
        self._conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                ts REAL NOT NULL, kind TEXT NOT NULL, agent TEXT NOT NULL, server TEXT NOT NULL, data TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
            CREATE INDEX IF NOT EXISTS events_agent ON events (agent, ts);
            CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ts);
            """
        )

    def insert(self, records: Sequence[Record]) -> None:
        assert self._conn is not None
        with self._conn:
            self._conn.executemany(
                "INSERT INTO events (ts, kind, agent, server, data) VALUES (?, ?, ?, ?, ?)",
                [(r.ts, r.kind, r.agent, r.server, json.dumps(r.data)) for r in records],
            )

    def prune(self, before: float) -> int:
        assert self._conn is not None
        with self._conn:
            return self._conn.execute("DELETE FROM events WHERE ts < ?", (before,)).rowcount

    def query(self, q: Query) -> tuple[int, list[dict[str, Any]]]:
        conn = self._connect()
        try:
            where, args = _where(q, "?")
            (total,) = conn.execute(f"SELECT COUNT(*) FROM events{where}", args).fetchone()
            rows = conn.execute(
                f"SELECT id, ts, kind, agent, server, data FROM events{where}"
                " ORDER BY ts DESC, id DESC LIMIT ? OFFSET ?",
                [*args, q.limit, q.offset],
            ).fetchall()
        finally:
            conn.close()
        return total, [Record(k, ts, a, s, json.loads(d)).as_json(i) for i, ts, k, a, s, d in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresBackend:
    """The same records in PostgreSQL (psycopg 3)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: Any = None

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, connect_timeout=10)

    def open(self) -> None:
        self._conn = self._connect()
        with self._conn.transaction():
            self._conn.execute(
                """
                CREATE TABLE IF NOT EXISTS nova_events (
                    id BIGSERIAL PRIMARY KEY,
                    ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, agent TEXT NOT NULL, server TEXT NOT NULL,
                    data JSONB NOT NULL
                )
                """
            )
            self._conn.execute("CREATE INDEX IF NOT EXISTS nova_events_ts ON nova_events (ts)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS nova_events_agent ON nova_events (agent, ts)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS nova_events_kind ON nova_events (kind, ts)")

    def _live(self) -> Any:
        """
        The writer's connection, opened again after a failure: a database
        that restarted is written to again as soon as it is back (before,
        every record after a restart was lost until NOVAS restarted).
        """
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _dropped_on_error(self, error: BaseException) -> None:
        import psycopg

        if not isinstance(error, psycopg.IntegrityError):
            self.close()

    def insert(self, records: Sequence[Record]) -> None:
        # A connection the database closed (it restarted) is found dead only
        # when used: then the batch is tried once more on a fresh one, so the
        # first records after a restart are not lost with the old connection.
        for last in (False, True):
            reused = self._conn is not None and not self._conn.closed
            conn = self._live()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO nova_events (ts, kind, agent, server, data) VALUES (%s, %s, %s, %s, %s)",
                        [(r.ts, r.kind, r.agent, r.server, json.dumps(r.data)) for r in records],
                    )
                return
            except Exception as e:
                self._dropped_on_error(e)
                if last or not reused or self._conn is not None:
                    raise

    def prune(self, before: float) -> int:
        conn = self._live()
        try:
            with conn.transaction():
                cur = conn.execute("DELETE FROM nova_events WHERE ts < %s", (before,))
                return int(cur.rowcount)
        except Exception as e:
            self._dropped_on_error(e)
            raise

    def query(self, q: Query) -> tuple[int, list[dict[str, Any]]]:
        with self._connect() as conn:
            where, args = _where(q, "%s")
            (total,) = conn.execute(f"SELECT COUNT(*) FROM nova_events{where}", args).fetchone()
            rows = conn.execute(
                f"SELECT id, ts, kind, agent, server, data::text FROM nova_events{where}"
                " ORDER BY ts DESC, id DESC LIMIT %s OFFSET %s",
                [*args, q.limit, q.offset],
            ).fetchall()
        return int(total), [Record(k, ts, a, s, json.loads(d)).as_json(i) for i, ts, k, a, s, d in rows]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is gone either way
                pass


class AuditStoreError(NovaError):
    """The audit store cannot be opened; the message names its setting, never the database password."""


def _open_error(backend: Backend, error: Exception) -> AuditStoreError:
    if isinstance(backend, PostgresBackend):
        where, detail = _redacted(backend.dsn), str(error)
        password = urlsplit(backend.dsn).password
        for secret in (backend.dsn, password):
            if secret:
                detail = detail.replace(secret, "***")
    else:
        where, detail = str(getattr(backend, "path", "the audit database")), str(error)
    detail = "; ".join(line.strip() for line in detail.splitlines() if line.strip()) or type(error).__name__
    return AuditStoreError(f"--audit-db / NOVAS_AUDIT_DB: cannot open the audit store {where}: {detail}")


def _redacted(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
    except ValueError:
        return "(unparsable URL)"


def backend_for(url: str | None, state_dir: Path) -> Backend:
    """C{None} or C{sqlite:///path} for SQLite, C{postgresql://...} for PostgreSQL."""
    if url is None or url == "":
        return SQLiteBackend(state_dir / "audit.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url)
    if url.startswith("sqlite:///"):
        return SQLiteBackend(Path(url[len("sqlite:///") - 1 :]))
    raise ValueError("the audit database is postgresql://... or sqlite:///PATH")


_STOP = object()


class AuditStore:
    """
    A bounded queue in front of a writer thread.  L{record} never blocks;
    L{query} runs in a thread and returns a Deferred from the caller's side
    (see L{nova.admin.web}).

    The writer waits C{linger} seconds after the first record of a batch
    before writing it, so that a busy server (thousands of streams opened a
    second, two records each) writes one transaction per batch rather than
    one per record; a record reaches the store at most that much later.
    """

    def __init__(
        self,
        backend: Backend,
        max_queue: int = 10_000,
        batch: int = 500,
        linger: float = 0.05,
        retention: float | None = 30 * 86400.0,
        on_dropped: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.batch = batch
        self.linger = linger
        self.retention = retention
        self.on_dropped = on_dropped
        self.clock = clock
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._last_drop_log = 0.0

    def start(self) -> None:
        try:
            self.backend.open()
        except Exception as e:
            raise _open_error(self.backend, e) from None
        self._thread = threading.Thread(target=self._run, name="nova-audit", daemon=True)
        self._thread.start()

    def record(self, record: Record) -> None:
        """Queue a record; if the queue is full, drop and count it."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self.on_dropped(1)
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warn(
                    "audit store is not keeping up: {dropped} record(s) dropped so far",
                    dropped=self.dropped,
                )

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what is queued (within C{timeout}) and stop the writer."""
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def query(self, q: Query) -> tuple[int, list[dict[str, Any]]]:
        """Blocking: call from a thread."""
        return self.backend.query(q)

    def _run(self) -> None:
        last_prune = 0.0
        while True:
            item = self._queue.get()
            batch: list[Record] = []
            stopping = item is _STOP
            if not stopping:
                batch.append(item)  # type: ignore[arg-type]
                if self.linger > 0:
                    time.sleep(self.linger)  # let the rest of the batch arrive
            while len(batch) < self.batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            if batch:
                try:
                    self.backend.insert(batch)
                    self.written += len(batch)
                except Exception as e:
                    self.dropped += len(batch)
                    self.on_dropped(len(batch))
                    log.error("audit store write failed, {n} record(s) lost: {error}", n=len(batch), error=str(e))
                    time.sleep(1)
            now = self.clock()
            if self.retention is not None and now - last_prune > 3600:
                last_prune = now
                try:
                    pruned = self.backend.prune(now - self.retention)
                    if pruned:
                        log.info("audit store: pruned {n} record(s) past retention", n=pruned)
                except Exception as e:
                    log.error("audit store prune failed: {error}", error=str(e))
            if stopping:
                self.backend.close()
                return
