"""
The cluster figure (issue 16): three NOVAS sharing one PostgreSQL behind
Debian's HAProxy (mode tcp, round robin), and simulated agents (bench/fleet.py:
NOVAC's own code, so its agent pool and discovery) whose only server is the
balancer.  Measured: how long until every agent is reachable from all three
servers after the cluster starts, how long after one server restarts, and
each server's RSS per agent.  There is no ssh or Go counterpart.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import BenchError, Proc, free_port, log, wait_until
from scale import SETTLE, Fleet, RegistrationCounter, _start_fleet
from tunnels import Novas

from tests.processes import Postgres, haproxy

IDS = ("novas-a", "novas-b", "novas-c")
DEAD = 6.0  # the cluster dead timeout: a heartbeat every 2 s


@dataclass
class ClusterResult:
    agents: int
    servers: int
    workers: int
    start_seconds: float  # fleet started -> every agent registered with every server
    restart_seconds: float  # SIGTERM to one server -> every agent registered with its successor
    restart_after_listen_seconds: float  # the successor listening -> every agent registered with it
    per_agent_kib: dict[str, float] = field(default_factory=dict)  # server id -> (RSS after - before) / agents
    rss_before_kib: dict[str, int] = field(default_factory=dict)
    rss_after_kib: dict[str, int] = field(default_factory=dict)
    # Seconds until 50 %, 90 %, 99 % and all of the agents were there (the tail is NOVAC's backoff).
    start_quantiles: dict[str, float] = field(default_factory=dict)
    restart_quantiles: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress:
    """How many agents were there when: the first time each count was reached, in seconds from C{t0}."""

    FRACTIONS = (0.5, 0.9, 0.99, 1.0)

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.last = -1
        self.points: list[tuple[float, int]] = []

    def note(self, count: int) -> None:
        if count != self.last:
            self.points.append((time.monotonic() - self.t0, count))
            self.last = count

    def quantiles(self, total: int) -> dict[str, float]:
        out = {}
        for fraction in self.FRACTIONS:
            reached = [t for t, n in self.points if n >= fraction * total]
            if reached:
                out[f"{fraction:.0%}"] = round(reached[0], 2)
        return out


class _Member:
    """One NOVAS of the cluster, restartable on the same port, state and id."""

    def __init__(self, work: Path, sid: str, port: int, dsn: str, tls_from: Path | None) -> None:
        self.work, self.sid, self.port, self.dsn = work, sid, port, dsn
        self.state = work / f"{sid}-state"
        if tls_from is not None:  # one certificate for the cluster, as behind a real balancer
            shutil.copytree(tls_from / "tls", self.state / "tls")
        self.runs = 0
        self.novas = self._start()

    def _start(self) -> Novas:
        self.runs += 1
        env = {
            "NOVAS_AUDIT_DB": self.dsn,
            "NOVAS_SERVER_ID": self.sid,
            "NOVAS_ADVERTISE_ADDRESS": f"127.0.0.1:{self.port}",
            "NOVAS_CLUSTER_DEAD_TIMEOUT": str(DEAD),
        }
        return Novas(self.work, self.port, self.state, label=f"{self.sid}-{self.runs}", extra_env=env)

    def restart(self) -> float:
        """SIGTERM, wait for the exit, start again; returns the monotonic time it listens again."""
        self.novas.proc.signal(signal.SIGTERM)
        try:
            self.novas.proc.popen.wait(60)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{self.sid} did not exit within 60s of SIGTERM:\n{self.novas.proc.tail()}") from e
        self.novas.stop()
        self.novas = self._start()
        self.novas.wait_listening(60)
        return time.monotonic()


def cluster_figures(work: Path, agents: int, workers: int, timeout: float) -> ClusterResult:
    pg = Postgres()
    with ExitStack() as stack:
        stack.callback(pg.remove)
        pg.start()
        ports = {sid: free_port() for sid in IDS}
        _, lb = stack.enter_context(haproxy(list(ports.values())))
        members: dict[str, _Member] = {}
        for sid in IDS:
            first = next(iter(members.values()), None)
            members[sid] = _Member(work, sid, ports[sid], pg.dsn, first.state if first else None)
            stack.callback(lambda m=members[sid]: m.novas.stop())  # type: ignore[misc]
            members[sid].novas.wait_listening()
        fingerprint = members[IDS[0]].novas.fingerprint()
        time.sleep(SETTLE)
        before = {sid: m.novas.proc.rss_kib() for sid, m in members.items()}
        prefix = "sim-"
        counters = {sid: RegistrationCounter(m.novas.proc, prefix) for sid, m in members.items()}
        per_worker = [agents // workers + (1 if i < agents % workers else 0) for i in range(workers)]
        fleet: list[Proc] = []
        start = time.monotonic()
        progress = _Progress(start)
        for w, count in enumerate(per_worker):
            if count:
                fleet.append(_start_fleet(work, lb, fingerprint, f"{prefix}{w}-", count, w, [], Fleet.concurrent))
                stack.callback(fleet[-1].stop)

        def everywhere() -> bool:
            for proc in fleet:
                proc.check_alive()
            for m in members.values():
                m.novas.proc.check_alive()
            for c in counters.values():
                c.count()
            held_by_all = set.intersection(*(c.names for c in counters.values()))
            progress.note(len(held_by_all))
            return len(held_by_all) >= agents

        try:
            wait_until(everywhere, timeout, f"{agents} agents on all {len(IDS)} servers", interval=0.2)
        except BenchError as e:
            counts = {sid: c.count() for sid, c in counters.items()}
            raise BenchError(f"{e} (registered: {counts})") from None
        start_seconds = time.monotonic() - start
        log(f"{agents} simulated agents behind HAProxy registered with all {len(IDS)} servers in {start_seconds:.2f}s")
        log(f"{progress.quantiles(agents)} (share of agents on all servers: seconds after the fleet started)")
        time.sleep(SETTLE)
        after = {sid: m.novas.proc.rss_kib() for sid, m in members.items()}
        per_agent = {sid: (after[sid] - before[sid]) / agents for sid in IDS}
        log("RSS per agent: " + ", ".join(f"{sid} {kib:.1f} KiB" for sid, kib in per_agent.items()))

        # One server restarts: how long until every agent holds a tunnel to it again.
        restart_seconds, after_listen, restart_progress = _restart(members[IDS[-1]], fleet, agents, prefix, timeout)
        return ClusterResult(
            agents=agents,
            servers=len(IDS),
            workers=len(fleet),
            start_seconds=start_seconds,
            restart_seconds=restart_seconds,
            restart_after_listen_seconds=after_listen,
            per_agent_kib=per_agent,
            rss_before_kib=before,
            rss_after_kib=after,
            start_quantiles=progress.quantiles(agents),
            restart_quantiles=restart_progress.quantiles(agents),
        )
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def _restart(
    victim: _Member, fleet: list[Proc], agents: int, prefix: str, timeout: float
) -> tuple[float, float, _Progress]:
    """SIGTERM one member and start it again: seconds until every agent is back, in all and after it listened."""
    log(f"restarting {victim.sid} (SIGTERM) with {agents} agents on every server")
    t0 = time.monotonic()
    progress = _Progress(t0)
    listening = victim.restart()
    counter = RegistrationCounter(victim.novas.proc, prefix)

    def back() -> bool:
        for proc in fleet:
            proc.check_alive()
        victim.novas.proc.check_alive()
        progress.note(counter.count())
        return progress.last >= agents

    try:
        wait_until(back, timeout, f"{agents} agents back on {victim.sid}", interval=0.2)
    except BenchError as e:
        raise BenchError(f"{e} (registered: {counter.count()})") from None
    done = time.monotonic()
    log(f"{victim.sid} restarted: every agent back after {done - t0:.2f}s ({done - listening:.2f}s after it listened)")
    log(f"{victim.sid}: {progress.quantiles(agents)} (share of agents back: seconds after SIGTERM)")
    return done - t0, done - listening, progress
