"""
The client tools that push traffic through a route: iperf3 (bulk) and
redis-benchmark (requests/s, latency, connection churn).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from harness import HERE, LOOPBACK, BenchError, Side, run_tool


@dataclass(frozen=True)
class IperfResult:
    gbit_s: float
    seconds: float
    retransmits: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iperf_argv(host: str, port: int, seconds: float, streams: int, reverse: bool) -> list[str]:
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if streams > 1:
        argv += ["-P", str(streams)]
    if reverse:
        argv.append("-R")
    return argv


def iperf(
    port: int, seconds: float, side: Side = HERE, host: str = LOOPBACK, streams: int = 1, reverse: bool = False
) -> IperfResult:
    """
    C{streams} TCP streams for C{seconds} through C{port}: the receiver's
    rate, summed.  C{reverse}: the server (the target) sends, as in a
    download; otherwise the client does.
    """
    argv = side.argv(_iperf_argv(host, port, seconds, streams, reverse))
    data = _iperf_json(_run_iperf(argv, seconds), argv)
    received = data["end"]["sum_received"]
    sent = data["end"].get("sum_sent", {})
    if not received.get("bytes"):
        raise BenchError(f"iperf3 received nothing: {' '.join(argv)}")
    return IperfResult(received["bits_per_second"] / 1e9, received["seconds"], sent.get("retransmits"))


def _run_iperf(argv: list[str], seconds: float, attempts: int = 20) -> str:
    """
    Run an iperf3 client.  C{iperf3 -s} serves one test at a time and may
    still be finishing the previous one (its last connections are closing
    through the tunnel, which takes round trips on a slow link): a "busy"
    answer is retried, every half second, a bounded number of times.
    """
    for _ in range(attempts - 1):
        try:
            out = run_tool(argv, seconds + 60, "iperf3").stdout
        except BenchError as e:
            if "server is busy" not in str(e):
                raise
        else:
            if "server is busy" not in out:
                return out
        time.sleep(0.5)
    return run_tool(argv, seconds + 60, "iperf3").stdout


def _iperf_json(out: str, argv: list[str]) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 printed no JSON: {' '.join(argv)}\n{out[-2000:]}") from None
    if data.get("error"):
        raise BenchError(f"iperf3 failed: {data['error']}: {' '.join(argv)}")
    return data


@dataclass(frozen=True)
class RedisResult:
    """One row of C{redis-benchmark --csv} (latencies in ms)."""

    test: str
    rps: float
    avg_ms: float
    min_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    clients: int
    requests: int
    keepalive: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def redis_benchmark(port: int, clients: int, requests: int, keepalive: bool = True, side: Side = HERE) -> RedisResult:
    """C{redis-benchmark -t get --csv} through C{port}."""
    argv = side.argv([
        "redis-benchmark", "-h", LOOPBACK, "-p", str(port),
        "-c", str(clients), "-n", str(requests), "-t", "get",
        "-k", "1" if keepalive else "0",
        "--csv",
    ])  # fmt: skip
    start = time.monotonic()
    done = run_tool(argv, 120 + requests / 50, "redis-benchmark")
    elapsed = time.monotonic() - start
    return _parse_csv(done.stdout, argv, clients, requests, keepalive, elapsed)


def _parse_csv(out: str, argv: list[str], clients: int, requests: int, keepalive: bool, elapsed: float) -> RedisResult:
    rows = [row for row in csv.DictReader(io.StringIO(out)) if row.get("test") == "GET"]
    if len(rows) != 1:
        raise BenchError(f"redis-benchmark printed no GET row: {' '.join(argv)}\n{out[-2000:]}")
    row = rows[0]
    try:
        result = RedisResult(
            test=row["test"],
            rps=float(row["rps"]),
            avg_ms=float(row["avg_latency_ms"]),
            min_ms=float(row["min_latency_ms"]),
            p50_ms=float(row["p50_latency_ms"]),
            p95_ms=float(row["p95_latency_ms"]),
            p99_ms=float(row["p99_latency_ms"]),
            max_ms=float(row["max_latency_ms"]),
            clients=clients,
            requests=requests,
            keepalive=keepalive,
            seconds=elapsed,
        )
    except (KeyError, ValueError) as e:
        raise BenchError(f"redis-benchmark CSV has unexpected columns ({e}): {out[-2000:]}") from None
    if result.rps <= 0:
        raise BenchError(f"redis-benchmark measured 0 requests/s: {' '.join(argv)}")
    return result


@dataclass(frozen=True)
class UnderBulkResult:
    latency: RedisResult
    bulk_gbit_s: float | None  # the iperf3 rate while the latency was measured

    def as_dict(self) -> dict[str, Any]:
        return {"latency": self.latency.as_dict(), "bulk_gbit_s": self.bulk_gbit_s}


def latency_under_bulk(
    iperf_port: int,
    redis_port: int,
    requests: int,
    warmup: float = 1.0,
    side: Side = HERE,
    reverse: bool = False,
) -> UnderBulkResult:
    """
    C{redis-benchmark -c 1} through one route while an iperf3 stream runs
    through another route of the same tunnel.  iperf3 is started with a long
    duration and interrupted once redis-benchmark is done; it must still be
    running then, or the measurement does not count.
    """
    argv = side.argv(_iperf_argv(LOOPBACK, iperf_port, 600, 1, reverse))
    pipe = subprocess.PIPE
    bulk = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    try:
        time.sleep(warmup)
        if bulk.poll() is not None:
            raise BenchError(f"iperf3 (bulk) exited early ({bulk.returncode}): {bulk.communicate(timeout=10)}")
        latency = redis_benchmark(redis_port, 1, requests, side=side)
        if bulk.poll() is not None:
            raise BenchError(f"iperf3 (bulk) ended before redis-benchmark finished ({bulk.returncode})")
        os.killpg(bulk.pid, signal.SIGINT)
        try:
            out, _err = bulk.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise BenchError("iperf3 (bulk) did not stop after SIGINT") from None
        return UnderBulkResult(latency, _interrupted_rate(out, warmup))
    finally:
        if bulk.poll() is None:
            os.killpg(bulk.pid, signal.SIGKILL)
            bulk.wait(5)


def _interrupted_rate(out: str, skip: float) -> float | None:
    """Mean rate (Gbit/s) over the intervals of an interrupted iperf3 -J run, skipping the warm-up."""
    try:
        data = json.loads(out)
        intervals = [i["sum"] for i in data.get("intervals", [])]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    kept = [i for i in intervals if i["start"] >= skip - 1e-3] or intervals
    total_bits = sum(i["bytes"] * 8 for i in kept)
    total_seconds = sum(i["seconds"] for i in kept)
    return total_bits / total_seconds / 1e9 if total_seconds > 0 else None
