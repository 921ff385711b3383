"""
End to end: real clients (psql, pgbench, ssh, scp, curl, nc, redis-cli,
redis-benchmark) against real servers through real NOVAS and NOVAC
processes on loopback, compared with what the same client does when it
talks to the server directly; data integrity under concurrency while a
second agent comes and goes; an idle session across keepalives.  The
bounded soak is in test_soak.py.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import random
import re
import shutil
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .processes import (
    Proc,
    echo_process,
    file_sha256,
    fingerprint,
    free_port,
    http_server,
    metric_total,
    novac,
    novas,
    postgres_server,
    redis_server,
    ssh_options,
    sshd,
    tunnels,
    wait_for,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


def agent_env(server: Proc, port: int, tags: str = "", **extra: str) -> dict[str, str]:
    env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server), "NOVAC_TAGS": tags}
    return env | extra


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run a client with a generous timeout; the caller checks the result."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 180)
    return subprocess.run(args, **kw)  # type: ignore[call-overload,no-any-return]


# 1. PostgreSQL: psql and pgbench.


def test_psql_and_pgbench_through_a_route(tmp_path: Path) -> None:
    route = free_port()
    with postgres_server() as (pg, bindir), novas(tmp_path, [f"{route}:127.0.0.1:{pg}@app=pg"]) as (server, port):
        with novac(tmp_path, agent_env(server, port, "app=pg")):
            server.wait_log("agent agent-1 registered")

            def psql(p: int, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
                cmd = [str(bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                       "-h", "127.0.0.1", "-p", str(p), "-U", "nova", "-d", "postgres", *args]  # fmt: skip
                return run(cmd, input=stdin)

            # Upload through the route with COPY FROM STDIN (a few MiB), read back directly.
            rng = random.Random(9)
            rows = [(i, rng.randbytes(rng.randrange(0, 400)).hex()) for i in range(20000)]
            script = "CREATE TABLE through_nova (id int PRIMARY KEY, payload text);\nCOPY through_nova FROM STDIN;\n"
            script += "".join(f"{i}\t{p}\n" for i, p in rows) + "\\.\n"
            script += "SELECT count(*), md5(string_agg(payload, ',' ORDER BY id)) FROM through_nova;\n"
            up = psql(route, stdin=script.encode())
            assert up.returncode == 0, up.stderr
            expected = f"{len(rows)}|{hashlib.md5(','.join(p for _, p in rows).encode()).hexdigest()}\n"
            assert up.stdout.decode() == expected
            check = "SELECT count(*), md5(string_agg(payload, ',' ORDER BY id)) FROM through_nova"
            assert psql(pg, "-c", check).stdout.decode() == expected

            # The same queries give byte-identical output through the route and directly,
            # including a multi-MiB COPY TO STDOUT and an error.
            queries = [
                "SELECT current_user, current_database(), version()",
                "COPY (SELECT i, md5(i::text), repeat('x', i % 97) FROM generate_series(1, 150000) i) TO STDOUT",
                "BEGIN; DELETE FROM through_nova WHERE id % 2 = 0; SELECT count(*) FROM through_nova; ROLLBACK",
                "SELECT count(*) FROM through_nova",
            ]
            for q in queries:
                via, direct = psql(route, "-c", q), psql(pg, "-c", q)
                assert via.returncode == direct.returncode == 0, via.stderr
                assert via.stdout == direct.stdout, q
            assert len(psql(route, "-c", queries[1]).stdout) > 5 * MiB
            via, direct = psql(route, "-c", "SELECT 1/0"), psql(pg, "-c", "SELECT 1/0")
            assert via.returncode == direct.returncode == 1
            assert via.stderr == direct.stderr and b"division by zero" in via.stderr

            # pgbench: initialised through the route, then runs with persistent
            # connections and with -C (a new connection, so a new stream, per transaction).
            def pgbench(p: int, *args: str) -> subprocess.CompletedProcess[bytes]:
                return run([str(bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(p), "-U", "nova", *args, "postgres"])

            init = pgbench(route, "-i", "-s", "2", "-q")
            assert init.returncode == 0, init.stderr
            assert b"done in" in init.stderr, init.stderr
            assert psql(pg, "-c", "SELECT count(*) FROM pgbench_accounts").stdout == b"200000\n"

            opened_before = metric_total(server, "nova_streams_opened_total")
            for p, args, n in [
                (route, ["-c", "8", "-j", "2", "-t", "100"], 800),
                (route, ["-C", "-c", "8", "-j", "2", "-t", "50"], 400),
                (pg, ["-C", "-c", "8", "-j", "2", "-t", "50"], 400),
            ]:
                bench = pgbench(p, *args)
                out = bench.stdout.decode()
                assert bench.returncode == 0, (out, bench.stderr)
                assert f"number of transactions actually processed: {n}/{n}\n" in out, out
                failed = re.search(r"number of failed transactions: (\d+)", out)
                assert failed is not None and failed.group(1) == "0", out
            # Every -C transaction went through its own stream (8 + 400 at least).
            assert metric_total(server, "nova_streams_opened_total") - opened_before >= 408


# 2. SSH: a command, and scp of 256 MiB both ways.


def test_ssh_command_and_scp_256_mib_both_ways(tmp_path: Path) -> None:
    assert shutil.which("ssh") and shutil.which("scp"), ".ci/run installs openssh-client"
    route = free_port()
    user = getpass.getuser()
    with sshd(tmp_path) as (ssh_port, key), novas(tmp_path, [f"{route}:127.0.0.1:{ssh_port}"]) as (server, port):
        with novac(tmp_path, agent_env(server, port)):
            server.wait_log("agent agent-1 registered")
            command = "echo through-nova; uname -s; echo $((6 * 7)); head -c 100000 /dev/zero | wc -c"
            outs = [
                run(["ssh", *ssh_options(key), "-p", str(p), f"{user}@127.0.0.1", command]) for p in (route, ssh_port)
            ]
            for out in outs:
                assert out.returncode == 0, out.stderr
            assert outs[0].stdout == outs[1].stdout == b"through-nova\nLinux\n42\n100000\n"

            src = tmp_path / "src.bin"
            with open(src, "wb") as f:
                for _ in range(256):
                    f.write(os.urandom(MiB))
            digest = file_sha256(src)
            remote = tmp_path / "remote"
            remote.mkdir()
            scp = ["scp", *ssh_options(key), "-P", str(route)]
            # Up with scp's default (SFTP) protocol, down with the legacy SCP protocol (-O).
            up = run([*scp, str(src), f"{user}@127.0.0.1:{remote / 'up.bin'}"])
            assert up.returncode == 0, up.stderr
            assert file_sha256(remote / "up.bin") == digest
            down = run([*scp, "-O", f"{user}@127.0.0.1:{remote / 'up.bin'}", str(tmp_path / "down.bin")])
            assert down.returncode == 0, down.stderr
            assert file_sha256(tmp_path / "down.bin") == digest


# 3. HTTP: curl through a route and through SOCKS; a reply sent after the client half-closed.


class _HttpAfterEof(socketserver.BaseRequestHandler):
    """
    An HTTP/1.0 server that reads the request until the client half-closes,
    and only then answers: a body of C{size} bytes from the request's path
    (C{GET /SIZE}), pseudo-random from that size.
    """

    def handle(self) -> None:
        request = b""
        while data := self.request.recv(65536):
            request += data
        size = int(request.split(b" ", 2)[1].lstrip(b"/"))
        body = random.Random(size).randbytes(size)
        self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)


@contextmanager
def http_after_eof() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _HttpAfterEof)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_curl_through_a_route_and_socks_and_a_reply_after_half_close(tmp_path: Path) -> None:
    assert shutil.which("curl") and shutil.which("nc"), ".ci/run installs curl and netcat-openbsd"
    body = os.urandom(5 * MiB + 123)
    route, late_route, socks = free_port(), free_port(), free_port()
    with http_server(body) as web, http_after_eof() as late:
        routes = [f"{route}:127.0.0.1:{web}", f"{late_route}:127.0.0.1:{late}"]
        with novas(tmp_path, routes, {"NOVAS_SOCKS_PORT": str(socks)}) as (server, port):
            with novac(tmp_path, agent_env(server, port, "zone=web")):
                server.wait_log("agent agent-1 registered")
                curl = ["curl", "-sS", "--fail", "--max-time", "120", "-w", "%{http_code} %{size_download}\n"]
                via_socks = ["--socks5-hostname", f"127.0.0.1:{socks}", "-U", "zone=web:unused"]
                for i, args in enumerate(
                    [
                        [f"http://127.0.0.1:{web}/"],  # directly
                        [f"http://127.0.0.1:{route}/"],  # through the route
                        [*via_socks, f"http://localhost:{web}/"],  # through SOCKS, resolved by the agent
                    ]
                ):
                    out = tmp_path / f"download-{i}"
                    result = run([*curl, "-o", str(out), *args])
                    assert result.returncode == 0, result.stderr
                    assert result.stdout == f"200 {len(body)}\n".encode()
                    assert out.read_bytes() == body
                assert f"connected to localhost:{web} through agent-1" in server.text()
                # Four parallel transfers on one curl, through SOCKS.
                urls = [f"http://localhost:{web}/{i}" for i in range(4)]
                outs = [str(tmp_path / f"parallel-{i}") for i in range(4)]
                result = run([*curl, "-Z", *via_socks, *[a for o in outs for a in ("-o", o)], *urls])
                assert result.returncode == 0, result.stderr
                assert all(Path(o).read_bytes() == body for o in outs)

                # curl cannot half-close its side, so netcat-openbsd's -N (shutdown
                # after EOF on stdin) sends the request: the server answers only once
                # it has seen EOF, through the route, through SOCKS and directly.
                size = 3 * MiB + 7
                expected_body = random.Random(size).randbytes(size)
                request = f"GET /{size} HTTP/1.0\r\nHost: late\r\n\r\n".encode()
                for args in (
                    ["127.0.0.1", str(late)],
                    ["127.0.0.1", str(late_route)],
                    ["-X", "5", "-x", f"127.0.0.1:{socks}", "localhost", str(late)],
                ):
                    result = run(["nc", "-N", *args], input=request)
                    assert result.returncode == 0, result.stderr
                    head, _, got = result.stdout.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.0 200 OK"), head
                    assert got == expected_body


# 4. Redis: redis-cli fed commands on stdin, and a pipelined redis-benchmark.


def test_redis_cli_and_pipelined_benchmark_through_a_route(tmp_path: Path) -> None:
    assert shutil.which("redis-cli") and shutil.which("redis-benchmark"), ".ci/run installs redis-tools"
    route = free_port()
    with redis_server() as redis, novas(tmp_path, [f"{route}:127.0.0.1:{redis}"]) as (server, port):
        with novac(tmp_path, agent_env(server, port)):
            server.wait_log("agent agent-1 registered")
            big = "v" * 300_000
            commands = (
                "PING\nSET greeting hello\nAPPEND greeting -world\nGET greeting\nINCR counter\nINCRBY counter 41\n"
                "RPUSH list a b c d\nLRANGE list 0 -1\nHSET h f1 1 f2 2\nHGETALL h\n"
                f"SET big {big}\nSTRLEN big\nMULTI\nINCR counter\nGET counter\nEXEC\nDBSIZE\nNOSUCHCOMMAND\n"
            )
            # The same session in database 1 through the route and in database 2 directly.
            via = run(["redis-cli", "-p", str(route), "-n", "1"], input=commands.encode())
            direct = run(["redis-cli", "-p", str(redis), "-n", "2"], input=commands.encode())
            assert via.returncode == direct.returncode == 0, via.stderr
            assert via.stdout == direct.stdout
            lines = via.stdout.decode().splitlines()
            assert lines[:4] == ["PONG", "OK", "11", "hello-world"]
            assert "300000" in lines and "ERR unknown command 'NOSUCHCOMMAND'" in via.stdout.decode()

            def calls(cmd: str) -> int:
                out = run(["redis-cli", "-p", str(redis), "INFO", "commandstats"]).stdout.decode()
                found = re.search(rf"cmdstat_{cmd}:calls=(\d+)", out)
                return int(found.group(1)) if found else 0

            sets = calls("set")
            tests = "set,get,incr,lpush,lpop"
            bench = run(f"redis-benchmark -p {route} -P 16 -c 8 -n 20000 -r 1000 --csv -t {tests}".split())
            out = bench.stdout.decode()
            assert bench.returncode == 0, (out, bench.stderr)
            assert "error" not in (out + bench.stderr.decode()).lower()
            ran = {row.split(",")[0].strip('"') for row in out.splitlines()[1:]}
            assert set(tests.upper().split(",")) <= ran, out
            # Every pipelined SET reached the server.
            assert calls("set") - sets >= 20000


# 5. Integrity under concurrency while a second agent comes and goes.

WORKERS = 200
ROUNDS = 2
MAX_LENGTH = 16 * MiB
TOTAL_CAP = 320 * MiB


def stream_lengths(rng: random.Random) -> list[list[int]]:
    """
    C{ROUNDS} payload lengths for each of C{WORKERS} workers: log-uniform
    from 1 byte to 4 MiB, one in twenty uniform in 4..16 MiB, a few edge
    cases; the total stays under C{TOTAL_CAP} each way.
    """
    while True:
        lengths = [
            [
                rng.randint(4 * MiB, MAX_LENGTH) if rng.random() < 0.05 else int(2 ** rng.uniform(0, 22))
                for _ in range(ROUNDS)
            ]
            for _ in range(WORKERS)
        ]
        lengths[0][0], lengths[1][0], lengths[2][0] = 0, 1, MAX_LENGTH
        if sum(map(sum, lengths)) <= TOTAL_CAP:
            return lengths


async def echo_stream(port: int, length: int, seed: int) -> str | None:
    """Send C{length} pseudo-random bytes, half-close, read the echo; None if it matched, else why not."""
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = hashlib.sha256()

    async def send() -> None:
        left = length
        while left:
            chunk = rng.randbytes(min(left, 256 * 1024))
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)
        writer.write_eof()

    async def receive() -> tuple[int, str]:
        got, n = hashlib.sha256(), 0
        while data := await reader.read(256 * 1024):
            got.update(data)
            n += len(data)
        return n, got.hexdigest()

    try:
        _, (n, digest) = await asyncio.gather(send(), receive())
    finally:
        writer.close()
    if n != length or digest != sent.hexdigest():
        return f"sent {length} bytes, got {n} back, digest {'ok' if digest == sent.hexdigest() else 'WRONG'}"
    return None


def test_200_concurrent_streams_intact_while_a_second_agent_comes_and_goes(tmp_path: Path) -> None:
    rng = random.Random(2024)
    lengths = stream_lengths(rng)
    total = sum(map(sum, lengths))
    route = free_port()
    drain = {"NOVAC_DRAIN_TIMEOUT": "120"}
    with echo_process() as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@pool=echo"]) as (server, port):
        env = agent_env(server, port, "pool=echo", **drain)
        with novac(tmp_path, env, name="steady"):
            server.wait_log("agent steady registered")
            failures: list[str] = []
            streams = [0]
            finished, planned_done = [0], [0.0]
            churn_done = threading.Event()
            load_done = threading.Event()

            async def worker(w: int) -> None:
                # The worker's streams one after another; once they are done,
                # small ones keep coming until the churn has had its cycles.
                plan = list(lengths[w])
                tail = random.Random(w)
                i = 0
                while plan or not churn_done.is_set():
                    length = plan.pop(0) if plan else tail.randrange(0, 64 * 1024)
                    i += 1
                    try:
                        why = await asyncio.wait_for(echo_stream(route, length, w * 1000 + i), 150)
                    except Exception as e:
                        why = f"{type(e).__name__}: {e}"
                    streams[0] += 1
                    if not plan and i == ROUNDS:
                        finished[0] += 1
                        if finished[0] == WORKERS:
                            planned_done[0] = time.monotonic() - started
                    if why is not None:
                        failures.append(f"worker {w} stream {i} ({length} bytes): {why}")

            async def load() -> None:
                await asyncio.gather(*(worker(w) for w in range(WORKERS)))

            def load_thread() -> None:
                try:
                    asyncio.run(load())
                finally:
                    load_done.set()

            # The second agent, same tags: registered before the load starts, so it
            # takes its share of the first (large) streams; stopped with SIGTERM
            # while it carries streams, again and again, each time under a new name.
            loader = threading.Thread(target=load_thread)
            cycles: list[tuple[float, int, float]] = []  # (SIGTERM time, streams on the agent then, drain seconds)
            started = time.monotonic()
            deadline = started + 90
            try:
                while len([c for c in cycles if c[1] > 0]) < 3 and time.monotonic() < deadline:
                    name = f"churn-{len(cycles)}"
                    with novac(tmp_path, env, name=name) as churn:
                        server.wait_log(f"agent {name} registered", timeout=60)
                        if not loader.is_alive() and not load_done.is_set():
                            started = time.monotonic()
                            loader.start()

                        def carrying(name: str = name) -> int:
                            return sum(int(t["active_streams"]) for t in tunnels(server) if t["name"] == name)  # type: ignore[call-overload]

                        wait_for(lambda: carrying() > 0 or load_done.is_set(), 60, f"{name} to carry streams")
                        # Not a wait for an event: the agent is stopped at a random moment of its load.
                        time.sleep(rng.uniform(0.3, 1.0))
                        active = carrying()
                        sigterm = time.monotonic()
                        churn.proc.send_signal(signal.SIGTERM)
                        assert churn.proc.wait(150) == 0
                        cycles.append((sigterm - started, active, time.monotonic() - sigterm))
                        if active:
                            assert "draining 1 tunnel(s)" in churn.text()
            finally:
                churn_done.set()
                if loader.is_alive():
                    loader.join(300)
            elapsed = time.monotonic() - started
            print(
                f"\n{streams[0]} streams ({total / MiB:.0f} MiB planned each way, done after {planned_done[0]:.1f}s) "
                f"in {elapsed:.1f}s; churn cycles (SIGTERM at s, streams on the agent, drain s): "
                + ", ".join(f"({t:.1f}, {n}, {d:.1f})" for t, n, d in cycles)
                + f"; opens refused as DRAINING and retried: {server.text().count('(DRAINING')}"
            )
            assert not loader.is_alive()
            assert not failures, f"{len(failures)} of {streams[0]} streams failed:\n" + "\n".join(failures[:20])
            assert streams[0] >= WORKERS * ROUNDS
            assert len([c for c in cycles if c[1] > 0]) >= 3, cycles
            # The first SIGTERM came while the large planned streams were still running.
            assert cycles[0][0] < planned_done[0]
            wait_for(lambda: all(t["active_streams"] == 0 for t in tunnels(server)), 30, "no active streams")


# 6. A long-lived, idle SSH session across keepalive intervals.


def test_idle_ssh_session_survives_several_keepalive_intervals(tmp_path: Path) -> None:
    route = free_port()
    timing = {"KEEPALIVE": "1", "DEAD_TIMEOUT": "3"}
    server_env = {f"NOVAS_{k}": v for k, v in timing.items()}
    with (
        sshd(tmp_path) as (ssh_port, key),
        novas(tmp_path, [f"{route}:127.0.0.1:{ssh_port}"], server_env) as (
            server,
            port,
        ),
    ):
        env = agent_env(server, port, **{f"NOVAC_{k}": v for k, v in timing.items()})
        with novac(tmp_path, env) as agent:
            server.wait_log("agent agent-1 registered")
            (before,) = tunnels(server)
            shell = subprocess.Popen(
                ["ssh", *ssh_options(key), "-o", "ServerAliveInterval=0", "-p", str(route),
                 f"{getpass.getuser()}@127.0.0.1", "sh"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert shell.stdin is not None and shell.stdout is not None
            try:
                shell.stdin.write(b"echo ready $$\n")
                shell.stdin.flush()
                first = shell.stdout.readline().split()
                assert first[0] == b"ready"
                # Idle: nothing but the tunnel's keepalives for well over two dead timeouts.
                (idle_from,) = tunnels(server)
                time.sleep(8)  # not a wait for an event: the idle time is what is tested
                (idle_to,) = tunnels(server)
                # No stream data moved meanwhile (no SSH-level keepalives either).
                for field in ("bytes_to_agent", "bytes_from_agent", "connected_since"):
                    assert idle_to[field] == idle_from[field], field
                shell.stdin.write(b"echo still-here $$ $((6 * 7))\n")
                shell.stdin.flush()
                assert shell.stdout.readline().split() == [b"still-here", first[1], b"42"]
                shell.stdin.close()
                assert shell.wait(30) == 0
            finally:
                if shell.poll() is None:
                    shell.kill()
                    shell.wait()
            (after,) = tunnels(server)
            # The same tunnel all along, measuring round trips.
            assert after["connected_since"] == before["connected_since"]
            assert after["rtt_ms"] is not None
            assert server.text().count("agent agent-1 registered") == 1
            assert agent.text().count("registered with") == 1
            assert "nothing heard" not in server.text() + agent.text()
            assert "disconnected" not in server.text()
