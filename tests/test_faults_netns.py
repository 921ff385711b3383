"""
Faults over distance, for real (docs/faults.md): NOVAS in one network
namespace, NOVAC and a target in another, joined by a veth pair this test
makes (test_netns's pair: 10.99.0.1/24, 10.99.0.2/24; no other non-loopback address is ever
dialled) and a link it can blackhole: an nftables table in the agent's
namespace that drops every packet on the pair, both ways, until removed.

What a user notices: a connection open across a short blackhole, and a
loop of new requests across it and across a flapping link, carry on with
every byte; a server that is really gone is still found dead (the agent's
dead timeout), and the user's connection ends instead of hanging.

Timers are shortened (keepalive 1 s, stall 1.5 s, dead timeout 8 s; 20 s
for the flap) so the test is bounded; needs root (skipped otherwise, saying why).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .harness import Proc, wait_for
from .processes import TOKEN
from .test_netns import _require, _run, namespaces, ns_proc

pytestmark = pytest.mark.integration

SERVER_ADDR = "10.99.0.1"  # the namespaces of test_netns (its SECURITY_ADDR)
AGENT_PORT = 9022
ROUTE_PORT = 15433
TARGET_PORT = 8081
DEAD = 8

BLACKHOLE = """
table inet nova_blackhole {
  chain input { type filter hook input priority -10; policy accept; iifname != "lo" drop; }
  chain output { type filter hook output priority -10; policy accept; oifname != "lo" drop; }
}
"""

ECHO_SERVER = """
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

# Two users for SECONDS: one connection kept open, echoing a numbered line
# every 0.2 s; and a loop of new connections, one request each.  Prints one
# JSON line: how many round trips each made and the first error of each.
USERS = """
import json, socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
out = {"open": 0, "open_error": None, "loop": 0, "loop_error": None}

def exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the tunnel")
        data += chunk
    return data

def kept_open():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            i = 0
            while time.monotonic() < end:
                line = b"line %08d\\n" % i
                s.sendall(line)
                if exact(s, len(line)) != line:
                    raise AssertionError("wrong bytes back")
                out["open"] += 1
                i += 1
                time.sleep(0.2)
    except Exception as e:
        out["open_error"] = f"{type(e).__name__}: {e}"

def loop():
    i = 0
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                msg = b"request %d" % i
                s.sendall(msg)
                if exact(s, len(msg)) != msg:
                    raise AssertionError("wrong bytes back")
            out["loop"] += 1
        except Exception as e:
            out["loop_error"] = f"request {i}: {type(e).__name__}: {e}"
            return
        i += 1
        time.sleep(0.1)

threads = [threading.Thread(target=kept_open), threading.Thread(target=loop)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""


def _twist(*args: str) -> list[str]:
    return [sys.executable, "-m", "twisted", "--log-format=text", *args]


def blackhole(ns: str, on: bool) -> None:
    if on:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=BLACKHOLE, capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            pytest.skip(f"nftables cannot filter inside a namespace here: {done.stderr.strip()}")
    else:
        _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "nova_blackhole")


@contextmanager
def deployment(tmp_path: Path, dead: int = DEAD) -> Iterator[tuple[str, str, Proc, Proc]]:
    """NOVAS on the server side; the target and NOVAC on the agent side, registered."""
    _require()
    procs: list[Proc] = []
    try:
        with namespaces() as (server_ns, agent_ns):
            target = ns_proc(agent_ns, [sys.executable, "-c", ECHO_SERVER, str(TARGET_PORT)], {}, tmp_path / "t.log")
            procs.append(target)
            target.wait_log("listening")
            fast = {"KEEPALIVE": "1", "DEAD_TIMEOUT": str(dead)}
            server = ns_proc(
                server_ns,
                _twist("novas"),
                {
                    "NOVAS_AGENT_TOKEN": TOKEN,
                    "NOVAS_AGENT_BIND": SERVER_ADDR,
                    "NOVAS_AGENT_PORT": str(AGENT_PORT),
                    "NOVAS_TLS": "off",
                    "NOVAS_ADMIN_PORT": "off",
                    "NOVAS_STATE_DIR": str(tmp_path / "state"),
                    "NOVAS_ROUTES": f"{ROUTE_PORT}:127.0.0.1:{TARGET_PORT}",
                    **{f"NOVAS_{k}": v for k, v in fast.items()},
                },
                tmp_path / "novas.log",
            )
            procs.append(server)
            server.wait_log("NOVAS listening")
            agent = ns_proc(
                agent_ns,
                _twist("novac"),
                {
                    "NOVAC_SERVER": f"{SERVER_ADDR}:{AGENT_PORT}",
                    "NOVAC_TOKEN": TOKEN,
                    "NOVAC_TLS": "off",
                    "NOVAC_NAME": "far-agent",
                    "NOVAC_ALLOW": f"127.0.0.1/32:{TARGET_PORT}",
                    "NOVAC_STALL_TIMEOUT": "1.5",
                    "NOVAC_CONNECT_TIMEOUT": "2",
                    "NOVAC_RECONNECT_INITIAL": "0.5",
                    "NOVAC_RECONNECT_MAX": "1",
                    **{f"NOVAC_{k}": v for k, v in fast.items()},
                },
                tmp_path / "novac.log",
            )
            procs.append(agent)
            server.wait_log("agent far-agent registered")
            yield server_ns, agent_ns, server, agent
    finally:
        for p in reversed(procs):
            p.stop()


def users(ns: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", USERS, str(ROUTE_PORT), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), err
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def no_tracebacks(tmp_path: Path) -> None:
    for name in ("novas.log", "novac.log"):
        text = (tmp_path / name).read_text()
        assert "Traceback" not in text, text[-3000:]


def test_a_short_blackhole_is_survived_by_open_connections_and_new_ones(tmp_path: Path) -> None:
    with deployment(tmp_path) as (server_ns, agent_ns, server, agent):
        run = users(server_ns, 16)
        time.sleep(2)  # traffic flows before the fault
        blackhole(agent_ns, True)
        time.sleep(4)  # shorter than the dead timeout
        blackhole(agent_ns, False)
        result = outcome(run, 60)
        assert result["open_error"] is None, (result, agent.tail(), server.tail())
        assert result["loop_error"] is None, (result, agent.tail(), server.tail())
        assert isinstance(result["open"], int) and result["open"] > 20, result
        assert isinstance(result["loop"], int) and result["loop"] > 20, result
        # The stall was seen and answered with a fresh tunnel attempt.
        agent.wait_log("stalled")
        no_tracebacks(tmp_path)


def test_a_flapping_link_is_survived(tmp_path: Path) -> None:
    # A flap backs TCP's retransmissions off further at every down phase (a
    # retransmission that lands in one doubles the next wait), so a tunnel
    # can stay silent longer than the 8 s the other tests use, on a loaded
    # machine: this one keeps the product's ratio of dead timeout to outage.
    with deployment(tmp_path, dead=20) as (server_ns, agent_ns, server, agent):
        run = users(server_ns, 22)
        time.sleep(2)
        for _ in range(4):  # 2 s down, 2 s up
            blackhole(agent_ns, True)
            time.sleep(2)
            blackhole(agent_ns, False)
            time.sleep(2)
        result = outcome(run, 60)
        assert result["open_error"] is None, (result, agent.tail(), server.tail())
        assert result["loop_error"] is None, (result, agent.tail(), server.tail())
        assert isinstance(result["loop"], int) and result["loop"] > 20, result
        no_tracebacks(tmp_path)


def test_a_dead_server_is_still_found_within_the_dead_timeout(tmp_path: Path) -> None:
    with deployment(tmp_path) as (server_ns, agent_ns, server, agent):
        run = users(server_ns, 40)
        time.sleep(2)
        blackhole(agent_ns, True)  # for good: to the agent, the server is gone
        agent.wait_log("nothing heard from the peer", timeout=DEAD + 10)
        # The user's open connection ends rather than hanging (NOVAS drops the
        # silent tunnel too, and with it the user's stream).
        result = outcome(run, 80)
        error = result["open_error"]
        assert isinstance(error, str) and "timed out" not in error, result  # ended by NOVA, not by the user giving up
        # The stalled tunnel's fresh attempts were made, and none registered.
        assert "stalled" in agent.text()
        blackhole(agent_ns, False)
        server.wait_log("agent far-agent registered", timeout=30)
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not agent.alive(), 20, "NOVAC to exit")
        no_tracebacks(tmp_path)
