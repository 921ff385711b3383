"""
NOVA's benchmark suite: NOVA beside OpenSSH C{ssh -R} and a Go TLS 1.3 +
hashicorp/yamux tunnel (C{bench/goyamux}), measured in the same run on
loopback and over a shaped link, printed as one table (see bench/README.md).

    python bench/suite.py [--quick] [--json PATH] [--strict] [--keep] [--only GROUPS]

Exit status: 0 when every figure was measured (whether or not it meets its
bar), 1 when something is broken (a tunnel did not come up, a process died, a
client failed), 2 with --strict when a bar is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from cluster import cluster_figures
from faults import BASE, FAULTS, measure_fault
from harness import (
    BenchError,
    Proc,
    Side,
    Unavailable,
    free_port,
    listening_ports,
    log,
    profiled,
    raise_nofile,
    wait_until,
)
from loadgen import iperf, latency_under_bulk, redis_benchmark
from report import Bar, BarKind, Row, table
from scale import Fleet, agents_and_storm, idle_streams
from shaped import ADDR_A, PROFILES, Profile, shaped_link
from tunnels import LOCAL, Placement, Tunnel, build_goyamux, go_pair, local_targets, nova_pair, ssh_pair


@dataclass(frozen=True)
class Params:
    iperf_seconds: float
    rps_clients: int
    rps_requests: int
    latency_requests: int
    churn_clients: int
    churn_requests: int
    under_bulk_requests: int
    agents: int
    agent_workers: int
    agent_sources: int  # source addresses per fleet process (see scale.Fleet)
    big_agents: int  # the agents10k group
    big_agent_workers: int
    big_agent_sources: int
    streams: int
    scale_timeout: float
    cluster_timeout: float  # per cluster figure: discovery through a balancer waits out NOVAC's backoff
    shaped_iperf_seconds: float
    shaped_request_seconds: float  # requests per latency figure: this long at the link's round trip
    shaped_warmup: float
    novas_env: tuple[tuple[str, str], ...] = ()  # NOVAS settings for the agents groups (--novas-env)
    fleet_concurrent: int = 64  # see fleet.py --concurrent


FULL = Params(
    iperf_seconds=10,
    rps_clients=50,
    rps_requests=100_000,
    latency_requests=20_000,
    churn_clients=10,
    churn_requests=10_000,
    under_bulk_requests=20_000,
    agents=1000,
    agent_workers=4,
    agent_sources=4,
    # 8 processes of 1,250 agents, 10 source addresses each: 125 agents per
    # address, under NOVAS's 128 unfinished handshakes per source.
    big_agents=10_000,
    big_agent_workers=8,
    big_agent_sources=10,
    streams=10_000,
    scale_timeout=300,
    cluster_timeout=900,
    shaped_iperf_seconds=10,
    shaped_request_seconds=10,
    shaped_warmup=2,
)
QUICK = Params(
    iperf_seconds=1,
    rps_clients=50,
    rps_requests=2000,
    latency_requests=2000,
    churn_clients=10,
    churn_requests=2000,
    under_bulk_requests=2000,
    agents=50,
    agent_workers=1,
    agent_sources=4,
    big_agents=10_000,  # not run by --quick unless asked for with --only agents10k
    big_agent_workers=8,
    big_agent_sources=10,
    streams=500,
    scale_timeout=60,
    cluster_timeout=180,
    shaped_iperf_seconds=2,
    shaped_request_seconds=2,
    shaped_warmup=1,
)
GROUPS = ("traffic", "streams", "agents", "agents10k", "cluster", "shaped", "faults")
QUICK_GROUPS = ("traffic", "streams", "agents")  # the others take minutes even when short
# The fault profiles (bench/faults.py) last minutes per tunnel: NOVA beside ssh -R only.
FAULT_TUNNELS = ("ssh", "nova")
TUNNELS = ("ssh", "go", "nova")  # measured in this order


def _at_least(limit: float, peer: str) -> Bar:
    return Bar(BarKind.RATIO_AT_LEAST, limit, peer=peer)


def _at_most(limit: float, peer: str) -> Bar:
    return Bar(BarKind.RATIO_AT_MOST, limit, peer=peer)


def make_rows(p: Params) -> dict[str, Row]:
    kib, ram, big = "KiB", "RSS per idle stream", f"{p.big_agents:,} agents"
    rows = [
        # The bars are the brief's (issue 18): loopback figures against the Go
        # peer; new connections also against ssh -R.
        Row("bulk", "bulk, 1 iperf3 stream", "Gbit/s", (_at_least(1.2, "go"),)),
        Row("rps", f"GET requests/s, {p.rps_clients} conns", "req/s", (_at_least(1.2, "go"),)),
        Row("p50", "GET latency p50, 1 conn", "ms", (_at_most(0.9, "go"),)),
        Row("p99", "GET latency p99, 1 conn", "ms"),
        Row(
            "churn",
            f"new conns/s, {p.churn_clients} clients -k 0",
            "conn/s",
            (_at_least(20.0, "ssh"), _at_least(1.0, "go")),
        ),
        Row("bulk_p50", "p50 under bulk, 1 conn", "ms"),
        Row("bulk_p99", "p99 under bulk, 1 conn", "ms", (Bar(BarKind.AT_MOST, 1.0, "ms"),)),
        Row("bulk_during", "bulk rate during the above", "Gbit/s"),
        Row("agent_rss", f"NOVAS RSS per agent ({p.agents:,} agents)", kib, (Bar(BarKind.AT_MOST, 100, kib),), ()),
        Row("stream_rss_novas", f"NOVAS {ram} ({p.streams:,})", kib, (Bar(BarKind.AT_MOST, 10, kib),), ()),
        Row("stream_rss_novac", f"NOVAC {ram} ({p.streams:,})", kib, (Bar(BarKind.AT_MOST, 10, kib),), ()),
        Row("storm", f"reconnect storm ({p.agents:,} agents)", "s", (Bar(BarKind.AT_MOST, 10, "s"),), ()),
        Row("register", f"registration of {p.agents:,} agents", "s", (), ()),
        Row("agent_rss_big", f"NOVAS RSS per agent ({big})", kib, (Bar(BarKind.AT_MOST, 64, kib),), ()),
        Row("storm_big", f"reconnect storm ({big})", "s", (Bar(BarKind.AT_MOST, 20, "s"),), ()),
        Row("register_big", f"registration of {big}", "s", (), ()),
        Row("cluster_start", f"cluster: {p.agents:,} agents on all 3 servers, from start", "s", (), ()),
        Row("cluster_restart", f"cluster: {p.agents:,} agents back on a restarted server", "s", (), ()),
        Row("cluster_rss", "cluster: NOVAS RSS per agent, worst of 3", kib, (Bar(BarKind.AT_MOST, 100, kib),), ()),
    ]
    for profile in PROFILES:
        k, name = profile.key, profile.label
        budget = profile.rtt_ms + 2
        rows += [
            Row(f"{k}_bulk1", f"{name}: bulk, 1 stream", "Mbit/s", (_at_least(profile.bulk1_bar, "ssh"),)),
            Row(
                f"{k}_bulk1_up",
                f"{name}: bulk, 1 stream, upload",
                "Mbit/s",
                (_at_least(profile.bulk1_bar, "ssh"),),
            ),
            Row(f"{k}_bulk4", f"{name}: bulk, 4 streams", "Mbit/s", (_at_least(1.0, "ssh"),)),
            Row(f"{k}_p50", f"{name}: GET p50, 1 conn", "ms"),
            Row(f"{k}_p99", f"{name}: GET p99, 1 conn", "ms"),
            Row(
                f"{k}_bulk_p99",
                f"{name}: p99 under bulk, 1 conn",
                "ms",
                (Bar(BarKind.AT_MOST, budget, "ms"),) if profile.p99_bar else (),
            ),
            Row(f"{k}_bulk_during", f"{name}: bulk rate during the above", "Mbit/s"),
        ]
    for fault in FAULTS:
        rows += [
            Row(f"fault_{fault.key}_survived", f"50 ms, {fault.label}: open conn kept (1 = yes)", "", (), ("ssh",)),
            Row(f"fault_{fault.key}_recover", f"50 ms, {fault.label}: next request after it", "s", (), ("ssh",)),
        ]
    return {row.key: row for row in rows}


SHAPED_KEYS = ("bulk1", "bulk1_up", "bulk4", "p50", "p99", "bulk_p99", "bulk_during")


class Suite:
    def __init__(self, params: Params, work: Path, profile_dir: Path | None = None) -> None:
        self.p = params
        self.work = work
        self.profile_dir = profile_dir
        self.rows = make_rows(params)
        self.raw: dict[str, Any] = {}
        self.errors: list[str] = []
        self.skipped: dict[str, str] = {}  # what was not measured here -> why
        self._go: Path | Unavailable | None = None
        self.notes: list[str] = []  # printed under the table

    def fail(self, keys: list[str], what: str, error: Exception) -> None:
        message = f"{what}: {error}"
        log(f"BROKEN: {message}")
        self.errors.append(message)
        for key in keys:
            row = self.rows[key]
            row.error = (row.error + "; " if row.error else "") + message.splitlines()[0][:300]

    def attempt(self, keys: list[str], what: str, measure: Callable[[], None]) -> None:
        try:
            measure()
        except BenchError as e:
            self.fail(keys, what, e)

    # The Go peer: built once per run.

    def go_binary(self, keys: list[str]) -> Path | None:
        """The Go peer's binary, or None (and its rows marked skipped, the reason printed) when it cannot be built."""
        if self._go is None:
            try:
                self._go = build_goyamux(self.work)
                log(f"Go peer built: {self._go}")
            except Unavailable as e:
                self._go = e
                log(f"Go peer skipped: {e}")
                self.skipped["go"] = str(e)
            except BenchError as e:
                self._go = Unavailable(f"build failed: {e}")
                self.fail(keys, "go: build", e)
        if isinstance(self._go, Unavailable):
            for key in keys:
                self.rows[key].skipped.setdefault("go", str(self._go))
            return None
        return self._go

    def _pair(
        self, kind: str, ports: list[int], keys: list[str], where: Placement = LOCAL, label: str = ""
    ) -> AbstractContextManager[Tunnel] | None:
        if kind == "ssh":
            return ssh_pair(self.work, ports, where=where, label=label)
        if kind == "nova":
            return nova_pair(self.work, ports, where=where, label=label)
        binary = self.go_binary(keys)
        return None if binary is None else go_pair(self.work, binary, ports, where=where, label=label)

    # Traffic: (a)-(e), NOVA beside ssh -R and the Go peer.

    def traffic(self) -> None:
        keys = ["bulk", "rps", "p50", "p99", "churn", "bulk_p50", "bulk_p99", "bulk_during"]
        with ExitStack() as stack:
            try:
                targets = stack.enter_context(local_targets(self.work))
            except BenchError as e:
                self.fail(keys, "target setup", e)
                return
            ports = [targets.iperf_port, targets.redis_port]
            for kind in TUNNELS:
                try:
                    pair = self._pair(kind, ports, keys)
                    if pair is None:
                        continue
                    tunnel = stack.enter_context(pair)
                except BenchError as e:
                    self.fail(keys, f"{kind}: tunnel setup", e)
                    continue
                self._traffic_through(tunnel, targets.iperf_port, targets.redis_port)

    def _runner(self, t: Tunnel, prefix: str = "") -> Callable[[list[str], str, Callable[[], None]], None]:
        side = t.kind

        def run(keys: list[str], what: str, measure: Callable[[], None]) -> None:
            def checked() -> None:
                t.check_alive()
                if self.profile_dir is not None and side == "nova":
                    with profiled({"novas": t.server, "novac": t.agent}, self.profile_dir, prefix + keys[0]):
                        measure()
                else:
                    measure()
                t.check_alive()

            self.attempt(keys, f"{side}: {prefix}{what}", checked)

        return run

    def _traffic_through(self, t: Tunnel, iperf_target: int, redis_target: int) -> None:
        p = self.p
        side = t.kind
        raw: dict[str, Any] = self.raw.setdefault(side, {})
        bulk_route, redis_route = t.routes[iperf_target], t.routes[redis_target]
        run = self._runner(t)

        def bulk() -> None:
            r = iperf(bulk_route, p.iperf_seconds)
            raw["bulk"] = r.as_dict()
            self._set("bulk", side, r.gbit_s)
            log(f"{side}: bulk {r.gbit_s:.2f} Gbit/s")

        def rps() -> None:
            r = redis_benchmark(redis_route, p.rps_clients, p.rps_requests)
            raw["rps"] = r.as_dict()
            self._set("rps", side, r.rps)
            log(f"{side}: {r.rps:,.0f} GET/s with {p.rps_clients} connections")

        def latency() -> None:
            r = redis_benchmark(redis_route, 1, p.latency_requests)
            raw["latency"] = r.as_dict()
            self._set("p50", side, r.p50_ms)
            self._set("p99", side, r.p99_ms)
            log(f"{side}: latency p50 {r.p50_ms} ms, p99 {r.p99_ms} ms")

        def churn() -> None:
            r = redis_benchmark(redis_route, p.churn_clients, p.churn_requests, keepalive=False)
            raw["churn"] = r.as_dict()
            self._set("churn", side, r.rps)
            log(f"{side}: churn {r.rps:,.0f} new connections/s")

        def under_bulk() -> None:
            r = latency_under_bulk(bulk_route, redis_route, p.under_bulk_requests)
            raw["under_bulk"] = r.as_dict()
            self._set("bulk_p50", side, r.latency.p50_ms)
            self._set("bulk_p99", side, r.latency.p99_ms)
            self._set("bulk_during", side, r.bulk_gbit_s)
            rate = "?" if r.bulk_gbit_s is None else f"{r.bulk_gbit_s:.2f}"
            log(f"{side}: under bulk ({rate} Gbit/s) p50 {r.latency.p50_ms} ms, p99 {r.latency.p99_ms} ms")

        run(["bulk"], "bulk (iperf3)", bulk)
        run(["rps"], "requests/s (redis-benchmark)", rps)
        run(["p50", "p99"], "latency (redis-benchmark -c 1)", latency)
        run(["churn"], "connection churn (redis-benchmark -k 0)", churn)
        run(["bulk_p50", "bulk_p99", "bulk_during"], "latency under bulk", under_bulk)

    def _set(self, key: str, side: str, value: float | None) -> None:
        setattr(self.rows[key], side, value)

    # Shaped link: the same tunnels across two network namespaces joined by shaped-link.

    def shaped(self) -> None:
        keys = [f"{profile.key}_{k}" for profile in PROFILES for k in SHAPED_KEYS]
        try:
            with shaped_link(self.work) as link:
                where = link.placement
                with ExitStack() as stack:
                    try:
                        targets = stack.enter_context(local_targets(self.work, where, label="-shaped"))
                        raw_port = self._raw_iperf_server(stack, where.agent)
                    except BenchError as e:
                        self.fail(keys, "shaped: target setup", e)
                        return
                    for profile in PROFILES:
                        try:
                            link.set(profile)
                        except BenchError as e:
                            self.fail([k for k in keys if k.startswith(profile.key + "_")], "shaped: link", e)
                            continue
                        self._shaped_profile(profile, where, targets.iperf_port, targets.redis_port, raw_port)
                        self.raw.setdefault("shaped", {}).setdefault(profile.key, {})["link_stats"] = link.stats()
        except Unavailable as e:
            log(f"shaped-link profiles skipped: {e}")
            self.skipped["shaped"] = str(e)
            for key in keys:
                self.rows[key].skipped["all"] = str(e)
        except BenchError as e:
            self.fail(keys, "shaped: link setup", e)

    # Faults on the shaped link (bench/faults.py): a fresh tunnel per fault.

    def faults(self) -> None:
        keys = [f"fault_{f.key}_{m}" for f in FAULTS for m in ("survived", "recover")]
        raw: dict[str, Any] = self.raw.setdefault("faults", {})
        try:
            with shaped_link(self.work) as link:
                where = link.placement
                with ExitStack() as stack:
                    try:
                        targets = stack.enter_context(local_targets(self.work, where, label="-faults"))
                        link.set(BASE)
                    except BenchError as e:
                        self.fail(keys, "faults: setup", e)
                        return
                    # NOVA_BENCH_FAULTS=bh5,flap: only these (a shorter run while working on them).
                    only = {k for k in os.environ.get("NOVA_BENCH_FAULTS", "").split(",") if k}
                    # NOVA_BENCH_FAULT_TUNNELS=nova: only these tunnels.
                    kinds = [k for k in os.environ.get("NOVA_BENCH_FAULT_TUNNELS", "").split(",") if k] or FAULT_TUNNELS
                    for kind in kinds:
                        for fault in FAULTS:
                            if only and fault.key not in only:
                                continue
                            self._fault_through(kind, fault, link, where, targets.redis_port, raw)
        except Unavailable as e:
            log(f"fault profiles skipped: {e}")
            self.skipped["faults"] = str(e)
            for key in keys:
                self.rows[key].skipped["all"] = str(e)
        except BenchError as e:
            self.fail(keys, "faults: link setup", e)

    def _fault_through(
        self, kind: str, fault: Any, link: Any, where: Placement, redis_target: int, raw: dict[str, Any]
    ) -> None:
        keys = [f"fault_{fault.key}_survived", f"fault_{fault.key}_recover"]
        try:
            link.set(BASE)
            pair = self._pair(kind, [redis_target], keys, where, label=f"-fault-{fault.key}")
            if pair is None:
                return
            with pair as t:
                tag = f"{kind}-{fault.key}"
                result = measure_fault(link, fault, where.server, t.routes[redis_target], self.work, tag)
        except BenchError as e:
            self.fail(keys, f"{kind}: {fault.label}", e)
            return
        raw.setdefault(kind, {})[fault.key] = result
        self._set(keys[0], kind, result["survived"])
        self._set(keys[1], kind, result["recover_s"])

    def _raw_iperf_server(self, stack: ExitStack, side: Side) -> int:
        """An C{iperf3 -s} on the agent side's link address, for raw TCP across the link (no tunnel)."""
        port = free_port()
        proc = Proc(
            "iperf3-server-raw",
            side.argv(["iperf3", "-s", "-B", ADDR_A, "-p", str(port)]),
            self.work / "iperf3-server-raw.log",
        )
        stack.callback(proc.stop)

        def listening() -> bool:
            proc.check_alive()
            return port in listening_ports(proc.pid)

        wait_until(listening, 20, "iperf3 -s on the link address to listen")
        return port

    def _shaped_profile(
        self, profile: Profile, where: Placement, iperf_target: int, redis_target: int, raw_port: int
    ) -> None:
        p = self.p
        k = profile.key
        keys = [f"{k}_{name}" for name in SHAPED_KEYS]
        raw: dict[str, Any] = self.raw.setdefault("shaped", {}).setdefault(k, {})
        clients = where.server
        secs = p.shaped_iperf_seconds
        requests = max(20, int(p.shaped_request_seconds * 1000 / profile.rtt_ms))
        raw["requests"] = requests

        # The link itself, no tunnel: iperf3 from the server side to the agent side's address.
        def raw_tcp() -> None:
            one = iperf(raw_port, secs, side=clients, host=ADDR_A, reverse=True)
            four = iperf(raw_port, secs, side=clients, host=ADDR_A, streams=4, reverse=True)
            up = iperf(raw_port, secs, side=clients, host=ADDR_A)
            raw["raw_tcp"] = {"bulk1": one.as_dict(), "bulk4": four.as_dict(), "bulk1_up": up.as_dict()}
            log(f"{profile.label}: raw TCP {one.gbit_s * 1000:,.0f} Mbit/s (1 stream), {four.gbit_s * 1000:,.0f} (4)")

        self.attempt([], f"{profile.label}: raw TCP (iperf3)", raw_tcp)

        for kind in TUNNELS:
            try:
                pair = self._pair(kind, [iperf_target, redis_target], keys, where, label=f"-{k}")
                if pair is None:
                    continue
                with pair as t:
                    self._shaped_through(t, profile, where.server, iperf_target, redis_target, requests, raw)
            except BenchError as e:
                self.fail(keys, f"{kind}: {profile.label}: tunnel", e)

    def _shaped_through(
        self,
        t: Tunnel,
        profile: Profile,
        clients: Side,
        iperf_target: int,
        redis_target: int,
        requests: int,
        raw: dict[str, Any],
    ) -> None:
        p = self.p
        k, side = profile.key, t.kind
        mine: dict[str, Any] = raw.setdefault(side, {})
        bulk_route, redis_route = t.routes[iperf_target], t.routes[redis_target]
        run = self._runner(t, prefix=f"{profile.label}: ")
        secs = p.shaped_iperf_seconds

        def bulk(streams: int, download: bool = True) -> Callable[[], None]:
            key = f"bulk{streams}" if download else f"bulk{streams}_up"

            def measure() -> None:
                r = iperf(bulk_route, secs, side=clients, streams=streams, reverse=download)
                mine[key] = r.as_dict()
                self._set(f"{k}_{key}", side, r.gbit_s * 1000)
                way = "target to user" if download else "user to target"
                log(f"{side}: {profile.label}: bulk {r.gbit_s * 1000:,.0f} Mbit/s with {streams} stream(s), {way}")

            return measure

        def latency() -> None:
            r = redis_benchmark(redis_route, 1, requests, side=clients)
            mine["latency"] = r.as_dict()
            self._set(f"{k}_p50", side, r.p50_ms)
            self._set(f"{k}_p99", side, r.p99_ms)
            log(f"{side}: {profile.label}: latency p50 {r.p50_ms} ms, p99 {r.p99_ms} ms")

        def under_bulk() -> None:
            r = latency_under_bulk(bulk_route, redis_route, requests, p.shaped_warmup, side=clients, reverse=True)
            mine["under_bulk"] = r.as_dict()
            self._set(f"{k}_bulk_p99", side, r.latency.p99_ms)
            rate = None if r.bulk_gbit_s is None else r.bulk_gbit_s * 1000
            self._set(f"{k}_bulk_during", side, rate)
            shown = "?" if rate is None else f"{rate:,.0f}"
            log(f"{side}: {profile.label}: under bulk ({shown} Mbit/s) p99 {r.latency.p99_ms} ms")

        run([f"{k}_bulk1"], "bulk, 1 stream (iperf3 -R)", bulk(1))
        run([f"{k}_bulk1_up"], "bulk, 1 stream, upload (iperf3)", bulk(1, download=False))
        run([f"{k}_bulk4"], "bulk, 4 streams (iperf3 -R -P 4)", bulk(4))
        run([f"{k}_p50", f"{k}_p99"], "latency (redis-benchmark -c 1)", latency)
        run([f"{k}_bulk_p99", f"{k}_bulk_during"], "latency under bulk", under_bulk)

    def raw_tcp_lines(self) -> list[str]:
        """The shaped link's own rate (no tunnel), for the shaped rows' context."""
        parts = []
        for profile in PROFILES:
            got = self.raw.get("shaped", {}).get(profile.key, {}).get("raw_tcp")
            if got:
                one, four = got["bulk1"]["gbit_s"] * 1000, got["bulk4"]["gbit_s"] * 1000
                up = got["bulk1_up"]["gbit_s"] * 1000
                parts.append(f"{profile.label}: {one:,.0f} Mbit/s with 1 stream, {four:,.0f} with 4, {up:,.0f} upload")
        if not parts:
            return []
        return ["", "Raw TCP across the shaped link, no tunnel (iperf3 -R): " + "; ".join(parts) + "."]

    # Scale: (f) and (g), NOVA only.

    def streams(self) -> None:
        def measure() -> None:
            r = idle_streams(self.work, self.p.streams, self.p.scale_timeout)
            self.raw["idle_streams"] = r.as_dict()
            self.rows["stream_rss_novas"].nova = r.novas_per_stream_kib
            self.rows["stream_rss_novac"].nova = r.novac_per_stream_kib

        self.attempt(["stream_rss_novas", "stream_rss_novac"], "idle streams", measure)

    def agents(self) -> None:
        p = self.p
        spec = Fleet(p.agents, p.agent_workers, p.agent_sources, p.novas_env, p.fleet_concurrent)
        self._agents(spec, "agents", "")

    def agents10k(self) -> None:
        p = self.p
        spec = Fleet(p.big_agents, p.big_agent_workers, p.big_agent_sources, p.novas_env, p.fleet_concurrent)
        self._agents(spec, "agents10k", "_big")

    def _agents(self, spec: Fleet, raw_key: str, suffix: str) -> None:
        keys = [f"agent_rss{suffix}", f"storm{suffix}", f"register{suffix}"]
        # Registrations take longer than the handshakes themselves when
        # thousands of agents start at once on two cores: give each
        # thousand agents the group's timeout.
        timeout = self.p.scale_timeout * max(1, spec.agents // 1000)

        def measure() -> None:
            r = agents_and_storm(self.work, spec, timeout)
            self.raw[raw_key] = r.as_dict()
            self.rows[keys[0]].nova = r.per_agent_kib
            self.rows[keys[2]].nova = r.register_seconds
            if r.storm is not None:
                self.rows[keys[1]].nova = r.storm.seconds

        self.attempt(keys, f"{spec.agents:,} agents and reconnect storm", measure)

    def cluster(self) -> None:
        def measure() -> None:
            try:
                r = cluster_figures(self.work, self.p.agents, self.p.agent_workers, self.p.cluster_timeout)
            except AssertionError as e:  # from the tests' process helpers (no haproxy, PostgreSQL failed)
                raise BenchError(str(e)) from None
            self.raw["cluster"] = r.as_dict()
            self.rows["cluster_start"].nova = r.start_seconds
            self.rows["cluster_restart"].nova = r.restart_seconds
            self.rows["cluster_rss"].nova = max(r.per_agent_kib.values())

        self.attempt(["cluster_start", "cluster_restart", "cluster_rss"], "cluster behind HAProxy", measure)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    return {
        "nproc": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),  # how busy the shared machine was
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": version(["ssh", "-V"]),
        "iperf3": version(["iperf3", "--version"]),
        "redis_benchmark": version(["redis-benchmark", "--version"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny durations and counts (CI smoke test)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers to PATH")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a figure misses its bar")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even on success")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="record py-spy flame graphs of NOVAS and NOVAC during each NOVA traffic figure into DIR"
        " (needs py-spy; perturbs the NOVA figures a little)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated groups to run (default: all of {','.join(GROUPS)};"
        f" with --quick, {','.join(QUICK_GROUPS)})",
    )
    parser.add_argument(
        "--agents",
        metavar="N",
        type=int,
        help="simulated agents in the 'agents' group (default 1,000; 50 with --quick);"
        " the 'agents10k' group always has 10,000",
    )
    parser.add_argument(
        "--novas-env",
        metavar="NOVAS_X=V",
        action="append",
        default=[],
        help="a NOVAS setting for the agents groups (repeatable), to find what limits them",
    )
    parser.add_argument(
        "--fleet-concurrent",
        metavar="N",
        type=int,
        default=64,
        help="simulated agents per fleet process handshaking at once (default 64; see bench/fleet.py)",
    )
    args = parser.parse_args(argv)
    only = args.only if args.only is not None else ",".join(QUICK_GROUPS if args.quick else GROUPS)
    groups = [g.strip() for g in only.split(",") if g.strip()]
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {GROUPS}")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    params = QUICK if args.quick else FULL
    if args.novas_env:
        if not all(e.startswith("NOVAS_") and "=" in e for e in args.novas_env):
            parser.error("--novas-env takes NOVAS_NAME=VALUE")
        params = replace(params, novas_env=tuple(tuple(e.split("=", 1)) for e in args.novas_env))
    params = replace(params, fleet_concurrent=args.fleet_concurrent)
    if args.agents is not None:
        workers = max(params.agent_workers, min(8, -(-args.agents // 1250)))  # at most 1,250 agents a process
        params = replace(params, agents=args.agents, agent_workers=workers)
    nofile = raise_nofile(65536)
    work = Path(tempfile.mkdtemp(prefix="nova-bench-"))
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    log(f"{'quick' if args.quick else 'full'} run; work directory {work}; open-file limit {nofile}")
    suite = Suite(params, work, args.profile)
    try:
        if "traffic" in groups:
            suite.traffic()
        if "streams" in groups:
            suite.streams()
        if "agents" in groups:
            suite.agents()
        if "agents10k" in groups:
            suite.agents10k()
        if "cluster" in groups:
            suite.cluster()
        if "shaped" in groups:
            suite.shaped()
        if "faults" in groups:
            suite.faults()
    finally:
        Proc.stop_all()
    elapsed = time.monotonic() - t0
    rows = [row for row in suite.rows.values() if _in_groups(row.key, groups)]
    shown = [row for row in rows if "all" not in row.skipped]
    print(table(shown), flush=True)
    failed = [row.key for row in rows if row.passed is False]
    broken = bool(suite.errors)
    for line in suite.raw_tcp_lines():
        print(line)
    for what, why in suite.skipped.items():
        print(f"\nSKIPPED {'the Go peer' if what == 'go' else 'the shaped-link profiles'}: {why}")
    print(
        f"\n{'quick' if args.quick else 'full'} run, {elapsed:.0f}s; bars missed: {', '.join(failed) or 'none'};"
        f" broken: {len(suite.errors)}"
    )
    for error in suite.errors:
        print(f"BROKEN: {error}", file=sys.stderr)
    if args.json:
        report = {
            "date": started.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "command": " ".join(sys.argv),
            "seconds": round(elapsed, 1),
            "machine": machine(),
            "params": asdict(params),
            "rows": {row.key: row.as_dict() for row in rows},
            "raw": suite.raw,
            "errors": suite.errors,
            "skipped": suite.skipped,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    if broken or args.keep:
        log(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if broken:
        return 1
    if args.strict and failed:
        return 2
    return 0


def _in_groups(key: str, groups: list[str]) -> bool:
    if key.startswith("fault_"):
        return "faults" in groups
    if any(key.startswith(profile.key + "_") for profile in PROFILES):
        return "shaped" in groups
    if key in ("stream_rss_novas", "stream_rss_novac"):
        return "streams" in groups
    if key in ("agent_rss", "storm", "register"):
        return "agents" in groups
    if key.startswith("cluster_"):
        return "cluster" in groups
    if key in ("agent_rss_big", "storm_big", "register_big"):
        return "agents10k" in groups
    return "traffic" in groups


if __name__ == "__main__":
    sys.exit(main())
