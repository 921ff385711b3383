"""
NOVA at scale: NOVAS memory per connected agent, each side's memory per idle
stream, and the reconnect storm after a NOVAS restart.  There is no ssh
counterpart for these.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import LOOPBACK, BenchError, Proc, clean_env, free_port, log, wait_until
from tunnels import REGISTERED, TOKEN, Novas, start_novac

BENCH = Path(__file__).resolve().parent
SETTLE = 2.0  # seconds to let a process settle before reading its RSS
# NOVAS drains for up to 30 s (NOVAS_DRAIN_TIMEOUT) and gives each closing
# tunnel 10 s more to read what was sent; with 10,000 tunnels on two busy
# cores its loop runs late as well (measured: 49 s from SIGTERM to exit).
EXIT_WAIT = 90.0


@dataclass(frozen=True)
class Fleet:
    """How many simulated agents, in how many processes, from how many source addresses."""

    agents: int
    workers: int
    # Source addresses per worker (0: the kernel's choice, 127.0.0.1 for
    # all).  Each worker uses 127.0.W.1 ... 127.0.W.N (W = 1 + its index),
    # so no one address carries more than NOVAS_MAX_PENDING_PER_SOURCE
    # handshakes at once or runs out of ephemeral ports: real agents come
    # from many addresses.
    sources_per_worker: int = 0
    novas_env: tuple[tuple[str, str], ...] = ()  # NOVAS settings for this run (NOVAS_...=...)
    concurrent: int = 64  # agents of one process between dialling and registered at once (fleet.py --concurrent)

    def sources(self, worker: int) -> list[str]:
        return [f"127.0.{worker + 1}.{i + 1}" for i in range(self.sources_per_worker)]

    def per_worker(self) -> list[int]:
        n, w = self.agents, self.workers
        return [n // w + (1 if i < n % w else 0) for i in range(w)]


@dataclass
class AgentsResult:
    agents: int
    workers: int
    sources: int  # distinct source addresses the agents connected from (1: all from 127.0.0.1)
    rss_before_kib: int
    rss_after_kib: int
    register_seconds: float  # from starting the fleet until NOVAS logged every registration
    per_agent_kib: float
    # CPU seconds spent during the registrations: NOVAS's, and the fleet's
    # (all processes): on two shared cores their sum bounds the rate.
    register_cpu_novas: float = 0.0
    register_cpu_fleet: float = 0.0
    storm: StormResult | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["storm"] = self.storm.as_dict() if self.storm else None
        return d


@dataclass
class StormResult:
    agents: int
    seconds: float  # SIGTERM to the old NOVAS -> every agent registered with the new one
    old_exit_seconds: float  # SIGTERM -> old NOVAS exited
    listen_seconds: float  # SIGTERM -> new NOVAS listening
    after_listen_seconds: float  # new NOVAS listening -> every agent registered
    cpu_novas: float = 0.0  # CPU seconds of the new NOVAS, from its start until every agent is back
    # CPU seconds the old NOVAS spent from SIGTERM to its exit (the last
    # reading before it exited, every 0.1 s): with the exit's wall time, how
    # much of the machine it got.
    old_exit_cpu: float = 0.0
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds after SIGTERM, agents registered)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RegistrationCounter:
    """Distinct agent names that NOVAS logged as registered, read incrementally."""

    def __init__(self, proc: Proc, prefix: str) -> None:
        self.proc = proc
        self.prefix = prefix
        self.names: set[str] = set()

    def count(self) -> int:
        for line in self.proc.new_lines():
            m = REGISTERED.search(line)
            if m and m.group(1).startswith(self.prefix):
                self.names.add(m.group(1))
        return len(self.names)


def agents_and_storm(work: Path, spec: Fleet, register_timeout: float) -> AgentsResult:
    """
    C{spec.agents} simulated agents (NOVAC's code, real TLS connections with
    distinct names) in C{spec.workers} processes register with one NOVAS: its
    RSS before and after.  Then NOVAS is restarted on the same port and state
    directory and the time until all of them registered again is measured.
    """
    agents = spec.agents
    state = work / "novas-scale-state"
    port = free_port()
    novas = Novas(work, port, state, label="novas-agents", extra_env=dict(spec.novas_env))
    fleet: list[Proc] = []
    try:
        novas.wait_listening()
        fingerprint = novas.fingerprint()
        time.sleep(SETTLE)
        before = novas.proc.rss_kib()
        prefix = "sim-"
        counter = RegistrationCounter(novas.proc, prefix)
        start = time.monotonic()
        cpu_before = cpu_seconds(novas.proc.pid)
        for w, count in enumerate(spec.per_worker()):
            if count:
                fleet.append(
                    _start_fleet(work, port, fingerprint, f"{prefix}{w}-", count, w, spec.sources(w), spec.concurrent)
                )

        def all_registered() -> bool:
            for proc in fleet:
                proc.check_alive()
            novas.proc.check_alive()
            return counter.count() >= agents

        wait_until(all_registered, register_timeout, f"{agents} agents to register", interval=0.1)
        register_seconds = time.monotonic() - start
        novas_cpu = cpu_seconds(novas.proc.pid) - cpu_before
        fleet_cpu = sum(cpu_seconds(proc.pid) for proc in fleet)
        log(
            f"{agents} simulated agents registered in {register_seconds:.2f}s;"
            f" CPU seconds meanwhile: NOVAS {novas_cpu:.1f}, fleet {fleet_cpu:.1f}"
        )
        time.sleep(SETTLE)
        after = novas.proc.rss_kib()
        result = AgentsResult(
            agents=agents,
            workers=len(fleet),
            sources=max(1, len(fleet) * spec.sources_per_worker),
            rss_before_kib=before,
            rss_after_kib=after,
            register_seconds=register_seconds,
            per_agent_kib=(after - before) / agents,
            register_cpu_novas=novas_cpu,
            register_cpu_fleet=fleet_cpu,
        )
        log(f"NOVAS RSS {before} KiB -> {after} KiB with {agents} agents: {result.per_agent_kib:.1f} KiB/agent")
        novas, result.storm = _storm(work, novas, port, state, fleet, spec, prefix, register_timeout)
        return result
    finally:
        for proc in fleet:
            proc.stop()
        novas.stop()


def _start_fleet(
    work: Path, port: int, fingerprint: str, prefix: str, count: int, index: int, sources: list[str], concurrent: int
) -> Proc:
    return Proc(
        f"fleet-{index}",
        [
            sys.executable, str(BENCH / "fleet.py"),
            "--server", f"{LOOPBACK}:{port}",
            "--fingerprint", fingerprint,
            "--prefix", prefix,
            "--count", str(count),
            "--concurrent", str(concurrent),
            *(["--sources", ",".join(sources)] if sources else []),
        ],
        work / f"fleet-{index}.log",
        env=clean_env({"NOVAC_TOKEN": TOKEN}),
        cwd=work,
    )  # fmt: skip


def _storm(
    work: Path, old: Novas, port: int, state: Path, fleet: list[Proc], spec: Fleet, prefix: str, timeout: float
) -> tuple[Novas, StormResult]:
    """Restart NOVAS; returns the new NOVAS (for the caller to stop) and the timings."""
    agents = spec.agents
    log(f"restarting NOVAS (SIGTERM) with {agents} agents registered")
    cpu_before = cpu_seconds(old.proc.pid)
    t0 = time.monotonic()
    old.proc.signal(signal.SIGTERM)
    exit_cpu = _wait_exit(old, t0 + EXIT_WAIT) - cpu_before
    old_exit = time.monotonic() - t0
    old.stop()
    new = Novas(work, port, state, label="novas-restarted", extra_env=dict(spec.novas_env))
    counter = RegistrationCounter(new.proc, prefix)
    new.wait_listening(60)
    listen = time.monotonic()
    progress: list[tuple[float, int]] = []
    last = -1

    def all_back() -> bool:
        nonlocal last
        for proc in fleet:
            proc.check_alive()
        new.proc.check_alive()
        n = counter.count()
        if n != last:
            progress.append((round(time.monotonic() - t0, 3), n))
            last = n
        return n >= agents

    try:
        wait_until(all_back, timeout, f"{agents} agents to register again after the restart", interval=0.02)
    except BenchError as e:
        raise BenchError(f"{e} (registered: {counter.count()}; progress {progress[-5:]})") from None
    done = time.monotonic()
    result = StormResult(
        agents=agents,
        seconds=done - t0,
        old_exit_seconds=old_exit,
        listen_seconds=listen - t0,
        after_listen_seconds=done - listen,
        cpu_novas=cpu_seconds(new.proc.pid),
        progress=_thin(progress, 40),
        old_exit_cpu=exit_cpu,
    )
    log(
        f"storm: old NOVAS exited after {old_exit:.2f}s ({exit_cpu:.1f} CPU seconds),"
        f" new one listening at {result.listen_seconds:.2f}s,"
        f" all {agents} agents back at {result.seconds:.2f}s (new NOVAS: {result.cpu_novas:.1f} CPU seconds)"
    )
    return new, result


def _wait_exit(novas: Novas, deadline: float) -> float:
    """Wait for NOVAS to exit; its CPU seconds when last seen running."""
    cpu = cpu_seconds(novas.proc.pid)
    while True:
        try:
            novas.proc.popen.wait(0.1)
            return cpu
        except subprocess.TimeoutExpired:
            cpu = cpu_seconds(novas.proc.pid) or cpu
        if time.monotonic() > deadline:
            raise BenchError(f"NOVAS did not exit within {EXIT_WAIT:g}s of SIGTERM:\n{novas.proc.tail()}")


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds of process C{pid} so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thin(points: list[tuple[float, int]], most: int) -> list[tuple[float, int]]:
    if len(points) <= most:
        return points
    step = len(points) / most
    kept = [points[int(i * step)] for i in range(most)]
    return [*kept, points[-1]] if kept[-1] != points[-1] else kept


@dataclass
class StreamsResult:
    streams: int
    open_seconds: float
    novas_before_kib: int
    novas_after_kib: int
    novac_before_kib: int
    novac_after_kib: int
    novas_per_stream_kib: float
    novac_per_stream_kib: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_OPENED = re.compile(r"opened (\d+)")


def idle_streams(work: Path, streams: int, timeout: float) -> StreamsResult:
    """
    F{streams} TCP connections held open through one route and one NOVAC to
    a local server that holds them: NOVAS's and NOVAC's RSS before and after.
    """
    holder = Proc("holder", [sys.executable, str(BENCH / "holder.py"), "serve"], work / "holder.log", cwd=work)
    novas: Novas | None = None
    novac: Proc | None = None
    opener: Proc | None = None
    try:
        holder.wait_log("listening ", 20)
        target = int(holder.text().split("listening ", 1)[1].split()[0])
        route = free_port()
        # NOVAS allows 4,096 streams per tunnel and NOVAC 1,024 by default;
        # this test needs more on both.
        novas = Novas(
            work, free_port(), work / "novas-streams-state", [f"{route}:{LOOPBACK}:{target}@name:idle-agent"],
            label="novas-streams", extra_env={"NOVAS_MAX_STREAMS_PER_TUNNEL": str(streams + 64)},
        )  # fmt: skip
        novas.wait_listening()
        novac = start_novac(
            work, novas.agent_port, novas.fingerprint(), "idle-agent", {"NOVAC_MAX_STREAMS": str(streams + 64)}
        )
        novas.proc.wait_log("agent idle-agent registered", 60)
        time.sleep(SETTLE)
        novas_before, novac_before = novas.proc.rss_kib(), novac.rss_kib()
        opener = Proc(
            "opener",
            [sys.executable, str(BENCH / "holder.py"), "open", "--port", str(route), "--count", str(streams)],
            work / "opener.log",
            cwd=work,
        )

        def opened() -> bool:
            text = opener.text() if opener is not None else ""
            if "failed:" in text or (opener is not None and not opener.alive()):
                raise BenchError(f"opening {streams} streams failed:\n{text[-2000:]}\nNOVAS log:\n{novas_tail()}")
            assert novas is not None and novac is not None
            novas.proc.check_alive()
            novac.check_alive()
            return _OPENED.search(text) is not None

        def novas_tail() -> str:
            return novas.proc.tail(10) if novas is not None else ""

        open_seconds = wait_until(opened, timeout, f"{streams} idle streams to open", interval=0.1)
        log(f"{streams} idle streams open in {open_seconds:.2f}s")
        time.sleep(SETTLE)
        novas_after, novac_after = novas.proc.rss_kib(), novac.rss_kib()
        result = StreamsResult(
            streams=streams,
            open_seconds=open_seconds,
            novas_before_kib=novas_before,
            novas_after_kib=novas_after,
            novac_before_kib=novac_before,
            novac_after_kib=novac_after,
            novas_per_stream_kib=(novas_after - novas_before) / streams,
            novac_per_stream_kib=(novac_after - novac_before) / streams,
        )
        log(
            f"RSS per idle stream: NOVAS {novas_before}->{novas_after} KiB ({result.novas_per_stream_kib:.2f} KiB),"
            f" NOVAC {novac_before}->{novac_after} KiB ({result.novac_per_stream_kib:.2f} KiB)"
        )
        return result
    finally:
        if opener is not None:
            opener.stop()
        if novac is not None:
            novac.stop()
        if novas is not None:
            novas.stop()
        holder.stop()
