"""
NOVA's benchmark suite: NOVA beside OpenSSH C{ssh -R}, measured in the same
run on loopback, printed as one table (see bench/README.md).

    python bench/suite.py [--quick] [--json PATH] [--strict] [--keep]

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
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from harness import BenchError, Proc, log, profiled, raise_nofile
from loadgen import iperf, latency_under_bulk, redis_benchmark
from report import NO_BAR, Bar, BarKind, Row, table
from scale import agents_and_storm, idle_streams
from tunnels import Tunnel, local_targets, nova_pair, ssh_pair


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
    streams: int
    scale_timeout: float


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
    streams=10_000,
    scale_timeout=300,
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
    streams=500,
    scale_timeout=60,
)
GROUPS = ("traffic", "streams", "agents")


def make_rows(p: Params) -> dict[str, Row]:
    kib, ram = "KiB", "RSS per idle stream"
    rows = [
        Row("bulk", "bulk, 1 iperf3 stream", "Gbit/s", Bar(BarKind.RATIO_AT_LEAST, 0.5)),
        Row("rps", f"GET requests/s, {p.rps_clients} conns", "req/s", Bar(BarKind.RATIO_AT_LEAST, 1.0)),
        Row("p50", "GET latency p50, 1 conn", "ms", Bar(BarKind.RATIO_AT_MOST, 1.3)),
        Row("p99", "GET latency p99, 1 conn", "ms", NO_BAR),
        Row("churn", f"new conns/s, {p.churn_clients} clients -k 0", "conn/s", Bar(BarKind.RATIO_AT_LEAST, 10.0)),
        Row("bulk_p50", "p50 under bulk, 1 conn", "ms", NO_BAR),
        Row("bulk_p99", "p99 under bulk, 1 conn", "ms", Bar(BarKind.AT_MOST, 1.0, "ms")),
        Row("bulk_during", "bulk rate during the above", "Gbit/s", NO_BAR),
        Row("agent_rss", f"NOVAS RSS per agent ({p.agents:,} agents)", kib, Bar(BarKind.AT_MOST, 100, kib), False),
        Row("stream_rss_novas", f"NOVAS {ram} ({p.streams:,})", kib, Bar(BarKind.AT_MOST, 10, kib), False),
        Row("stream_rss_novac", f"NOVAC {ram} ({p.streams:,})", kib, Bar(BarKind.AT_MOST, 10, kib), False),
        Row("storm", f"reconnect storm ({p.agents:,} agents)", "s", Bar(BarKind.AT_MOST, 10, "s"), False),
    ]
    return {row.key: row for row in rows}


class Suite:
    def __init__(self, params: Params, work: Path, profile_dir: Path | None = None) -> None:
        self.p = params
        self.work = work
        self.profile_dir = profile_dir
        self.rows = make_rows(params)
        self.raw: dict[str, Any] = {}
        self.errors: list[str] = []

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

    # Traffic: (a)-(e), NOVA beside ssh.

    def traffic(self) -> None:
        keys = ["bulk", "rps", "p50", "p99", "churn", "bulk_p50", "bulk_p99", "bulk_during"]
        with ExitStack() as stack:
            try:
                targets = stack.enter_context(local_targets(self.work))
            except BenchError as e:
                self.fail(keys, "target setup", e)
                return
            ports = [targets.iperf_port, targets.redis_port]
            for kind, pair in (("ssh", ssh_pair), ("nova", nova_pair)):
                try:
                    tunnel = stack.enter_context(pair(self.work, ports))
                except BenchError as e:
                    self.fail(keys, f"{kind}: tunnel setup", e)
                    continue
                self._traffic_through(tunnel, targets.iperf_port, targets.redis_port)

    def _traffic_through(self, t: Tunnel, iperf_target: int, redis_target: int) -> None:
        p = self.p
        side = t.kind
        raw: dict[str, Any] = self.raw.setdefault(side, {})
        bulk_route, redis_route = t.routes[iperf_target], t.routes[redis_target]

        def run(keys: list[str], what: str, measure: Callable[[], None]) -> None:
            def checked() -> None:
                t.check_alive()
                if self.profile_dir is not None and side == "nova":
                    with profiled({"novas": t.server, "novac": t.agent}, self.profile_dir, keys[0]):
                        measure()
                else:
                    measure()
                t.check_alive()

            self.attempt(keys, f"{side}: {what}", checked)

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
        if side == "nova":
            self.rows[key].nova = value
        else:
            self.rows[key].ssh = value

    # Scale: (f) and (g), NOVA only.

    def streams(self) -> None:
        def measure() -> None:
            r = idle_streams(self.work, self.p.streams, self.p.scale_timeout)
            self.raw["idle_streams"] = r.as_dict()
            self.rows["stream_rss_novas"].nova = r.novas_per_stream_kib
            self.rows["stream_rss_novac"].nova = r.novac_per_stream_kib

        self.attempt(["stream_rss_novas", "stream_rss_novac"], "idle streams", measure)

    def agents(self) -> None:
        def measure() -> None:
            r = agents_and_storm(self.work, self.p.agents, self.p.agent_workers, self.p.scale_timeout)
            self.raw["agents"] = r.as_dict()
            self.rows["agent_rss"].nova = r.per_agent_kib
            if r.storm is not None:
                self.rows["storm"].nova = r.storm.seconds

        self.attempt(["agent_rss", "storm"], "agents and reconnect storm", measure)


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
        "--only", default=",".join(GROUPS), help=f"comma-separated groups to run (default: all of {','.join(GROUPS)})"
    )
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
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
    finally:
        Proc.stop_all()
    elapsed = time.monotonic() - t0
    rows = [row for row in suite.rows.values() if _in_groups(row.key, groups)]
    print(table(rows), flush=True)
    failed = [row.key for row in rows if row.passed is False]
    broken = bool(suite.errors)
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
    if key in ("stream_rss_novas", "stream_rss_novac"):
        return "streams" in groups
    if key in ("agent_rss", "storm"):
        return "agents" in groups
    return "traffic" in groups


if __name__ == "__main__":
    sys.exit(main())
