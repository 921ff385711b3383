"""
Faults over distance (issue 18 item 6, docs/faults.md): on the shaped
link at 50 ms RTT, a user keeps one connection open through the tunnel
(a redis PING every 0.2 s) while a second user opens a new connection per
request in a loop; the link is then blackholed (100 % loss both ways) for
5, 30 or 90 s, or flaps 2 s down / 2 s up.  Reported per tunnel: whether
the open connection survived (1) or was ended (0), and how long after the
link came back the next request succeeded (the flap: the longest time
without a successful request, beyond the 2 s the link is down).

The observer runs on the server side of the link and writes one JSON line
per request with a CLOCK_MONOTONIC time stamp (namespaces share the clock),
so the suite can lay them against the fault's own times.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Proc, Side, log
from shaped import Link, Profile

BASE = Profile("faults", "50 ms RTT", 25, 0, 1.0, False)
BLACKHOLE = Profile("faults_down", "50 ms RTT, blackholed", 25, 100, 1.0, False)
SETTLE = 45.0  # seconds watched after the fault, at most: a tunnel not back by then counts as not recovered


@dataclass(frozen=True)
class Fault:
    key: str
    label: str
    down: float
    up: float = 0.0
    cycles: int = 1


FAULTS = (
    Fault("bh5", "blackhole 5 s", 5),
    Fault("bh30", "blackhole 30 s", 30),
    Fault("bh90", "blackhole 90 s", 90),
    Fault("flap", "flap 2 s down / 2 s up, 8 times", 2, 2, 8),
)

OBSERVER = r"""
import json, socket, sys, threading, time
port, stop_file = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
def note(kind, ok, error=""):
    with lock:
        print(json.dumps({"t": time.monotonic(), "kind": kind, "ok": ok, "error": error}), flush=True)
def stopped():
    try:
        open(stop_file).close()
        return True
    except OSError:
        return False
def ping(s):
    s.sendall(b"PING\r\n")
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = s.recv(64)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    if got != b"+PONG\r\n":
        raise AssertionError(got)
def kept_open():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
            while not stopped():
                ping(s)
                note("open", True)
                time.sleep(0.2)
    except Exception as e:
        note("open", False, f"{type(e).__name__}: {e}")
def loop():
    while not stopped():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                ping(s)
            note("loop", True)
        except Exception as e:
            note("loop", False, f"{type(e).__name__}: {e}")
        time.sleep(0.2)
threads = [threading.Thread(target=kept_open), threading.Thread(target=loop)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def _events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def measure_fault(link: Link, fault: Fault, side: Side, route: int, work: Path, tag: str) -> dict[str, Any]:
    """One fault through one tunnel: the open connection's fate and the time to recover."""
    stop = work / f"fault-{tag}.stop"
    stop.unlink(missing_ok=True)
    out = work / f"fault-{tag}.jsonl"
    observer = Proc(f"fault-{tag}", side.argv([sys.executable, "-c", OBSERVER, str(route), str(stop)]), out)
    try:
        time.sleep(3)  # requests flow before the fault
        link.set(BASE)
        ends = []
        for cycle in range(fault.cycles):
            link.set(BLACKHOLE)
            time.sleep(fault.down)
            link.set(BASE)
            ends.append(time.monotonic())
            if cycle < fault.cycles - 1:
                time.sleep(fault.up)
        fault_end = ends[-1]
        deadline = fault_end + SETTLE
        while time.monotonic() < deadline:
            after = [e for e in _events(out) if e["t"] > fault_end and e["ok"] and e["kind"] == "loop"]
            if len(after) >= 5:
                break
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.touch()
        try:
            observer.proc.wait(150)
        except Exception:
            pass
        observer.stop()
    events = _events(out)
    open_failed = [e for e in events if e["kind"] == "open" and not e["ok"]]
    loop_ok = [e["t"] for e in events if e["kind"] == "loop" and e["ok"]]
    loop_failed = [e for e in events if e["kind"] == "loop" and not e["ok"]]
    first_after = next((t for t in loop_ok if t > fault_end), None)
    recover = None if first_after is None else first_after - fault_end
    if fault.cycles > 1:
        start = ends[0] - fault.down
        inside = [t for t in loop_ok if start - 1 <= t <= fault_end + SETTLE]
        gaps = [b - a for a, b in itertools.pairwise(inside)]
        recover = max(0.0, max(gaps, default=0.0) - fault.down) if first_after is not None else None
    result = {
        "survived": 0.0 if open_failed else 1.0,
        "open_error": open_failed[0]["error"] if open_failed else None,
        "recover_s": recover,
        "loop_ok": len(loop_ok),
        "loop_failed": len(loop_failed),
        "loop_errors": sorted({e["error"] for e in loop_failed})[:5],
    }
    log(f"{tag}: {fault.label}: {result}")
    return result
