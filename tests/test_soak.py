"""
A bounded soak: connections opened and closed continuously, through a route
and through SOCKS, for NOVA_SOAK_SECONDS (default 20); afterwards no stream,
file descriptor or memory is left behind in NOVAS or NOVAC beyond a small
margin.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from .processes import (
    Proc,
    echo_process,
    fd_count,
    fingerprint,
    free_port,
    metric_total,
    novac,
    novas,
    rss_kib,
    tunnels,
    wait_for,
)

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("NOVA_SOAK_SECONDS", "20"))
WARMUP_SECONDS = 4.0
WORKERS = 12
FD_MARGIN = 8
RSS_MARGIN_KIB = 24 * 1024


def socks_connect(socks_port: int, host: str, port: int) -> socket.socket:
    """A SOCKS5 CONNECT (no authentication, remote name resolution) by hand."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=30)
    try:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        version, reply, _, atyp = recv_exactly(s, 4)
        assert (version, reply) == (5, 0), f"SOCKS reply {reply}"
        recv_exactly(s, {1: 4, 4: 16}.get(atyp) or recv_exactly(s, 1)[0])
        recv_exactly(s, 2)
        return s
    except BaseException:
        s.close()
        raise


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def echo_over(s: socket.socket, payload: bytes) -> bytes:
    """Send C{payload} while reading the echo on an open socket, half-close, read to EOF."""

    def send() -> None:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    chunks = []
    while data := s.recv(1 << 16):
        chunks.append(data)
    sender.join()
    return b"".join(chunks)


def abort(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashing client would."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def load(route: int, socks: int, echo: int, seconds: float, seed: int) -> tuple[Counter[str], list[str]]:
    """
    C{WORKERS} threads opening and closing connections for C{seconds}: full
    echoes through the route and through SOCKS (which must all succeed),
    and clients that reset mid-transfer, close at once, or close without
    reading what is coming back (which may end any way, but must leave
    nothing behind).
    """
    done: Counter[str] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        while time.monotonic() < deadline:
            kind = rng.choices(["route", "socks", "reset", "close", "unread"], [5, 3, 1, 1, 1])[0]
            payload = rng.randbytes(rng.choice([0, 1, rng.randrange(1, 4096), rng.randrange(1, 256 * 1024)]))
            try:
                if kind in ("route", "socks"):
                    s = (
                        socket.create_connection(("127.0.0.1", route), timeout=30)
                        if kind == "route"
                        else socks_connect(socks, "localhost", echo)
                    )
                    with s:
                        back = echo_over(s, payload)
                    if back != payload:
                        raise AssertionError(f"sent {len(payload)} bytes, got {len(back)} different ones back")
                else:
                    s = socket.create_connection(("127.0.0.1", route), timeout=30)
                    if kind == "reset":
                        s.sendall(payload[:65536] + b"x")
                        s.recv(1)
                        abort(s)
                    elif kind == "close":
                        s.close()
                    else:  # unread: the echo is still coming back when the client closes
                        s.sendall(payload[:65536] + b"x")
                        s.close()
            except Exception as e:
                if kind in ("route", "socks"):
                    with lock:
                        failures.append(f"{kind} ({len(payload)} bytes): {type(e).__name__}: {e}")
            with lock:
                done[kind] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    assert not any(t.is_alive() for t in threads), "a soak worker hung"
    return done, failures


def quiet(server: Proc) -> None:
    """Wait until NOVAS shows no open stream, in the API and in /metrics."""

    def no_streams() -> bool:
        return all(t["active_streams"] == 0 for t in tunnels(server)) and (
            metric_total(server, "nova_streams_active") == 0
        )

    wait_for(no_streams, 30, "every stream to close")


def test_bounded_soak_leaves_no_streams_fds_or_memory_behind(tmp_path: Path) -> None:
    route, socks = free_port(), free_port()
    with (
        echo_process() as echo,
        novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], {"NOVAS_SOCKS_PORT": str(socks)}) as (
            server,
            port,
        ),
    ):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
        with novac(tmp_path, env) as agent:
            server.wait_log("agent agent-1 registered")
            pids = {"NOVAS": server.proc.pid, "NOVAC": agent.proc.pid}

            # Warm up with the same load, so caches, pools and the allocator reach their steady size.
            done, failures = load(route, socks, echo, WARMUP_SECONDS, seed=1)
            assert not failures, failures[:10]
            quiet(server)
            before = {name: (fd_count(pid), rss_kib(pid)) for name, pid in pids.items()}

            started = time.monotonic()
            done, failures = load(route, socks, echo, SECONDS, seed=2)
            elapsed = time.monotonic() - started
            quiet(server)
            # Let the last closes reach both processes' event loops: no event
            # says they have, and the counts below are measured, not awaited.
            time.sleep(1)
            after = {name: (fd_count(pid), rss_kib(pid)) for name, pid in pids.items()}

            print(f"\nsoak: {sum(done.values())} connections in {elapsed:.1f}s: {dict(done)}")
            for name in pids:
                (fd0, rss0), (fd1, rss1) = before[name], after[name]
                print(f"  {name}: fds {fd0} -> {fd1} ({fd1 - fd0:+d}), RSS {rss0} -> {rss1} KiB ({rss1 - rss0:+d})")
            assert not failures, f"{len(failures)} echoes failed:\n" + "\n".join(failures[:20])
            assert done["route"] and done["socks"] and done["reset"] and done["close"] and done["unread"]
            for name in pids:
                (fd0, rss0), (fd1, rss1) = before[name], after[name]
                assert fd1 <= fd0 + FD_MARGIN, f"{name} has {fd1 - fd0} more file descriptors open"
                assert rss1 <= rss0 + RSS_MARGIN_KIB, f"{name} grew by {rss1 - rss0} KiB"
            # Both are still healthy: a last echo goes through.
            with socket.create_connection(("127.0.0.1", route), timeout=30) as s:
                assert echo_over(s, b"after the soak") == b"after the soak"
