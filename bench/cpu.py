"""
Instructions per request on each side of a NOVA tunnel, counted by
valgrind's callgrind: repeatable even on a busy, shared machine, where a
timed figure is not.

    python bench/cpu.py [--requests 2000] [--keep]
    python bench/cpu.py --connections [--requests 500]

Runs a redis-server, NOVAS and NOVAC (TLS on, as in C{bench/run}), both
under C{valgrind --tool=callgrind --instr-atstart=no}, and one client
connection to the route doing C{--requests} GET round trips.  Counting is
switched on (C{callgrind_control -i on}) only after a warm-up of the same
connection and off again after the last reply, so startup, the handshake
and the connection's open are not in the figure: what remains is the
steady-state request/response path, DATA relayed both ways.  With
C{--connections} each request is instead a new client connection (connect,
one GET, its reply, close, as C{redis-benchmark -k 0} does): the figure is
then the whole life of one tunnelled connection on each side (accept, agent
choice, OPEN, the target's connect, OPEN_OK, DATA, FIN, close, audit and
metrics).  Prints the
instructions per request of each process, and where C{--keep} is given
keeps the callgrind files (C{callgrind_annotate FILE} breaks them down by C
function; the Python functions are all inside the interpreter's loop, so
for those use C{bench/run --profile} and C{bench/profile_top.py}).

Needs valgrind (C{apt-get install valgrind}) and redis-server.  Under
valgrind everything runs about 50 times slower: 2,000 requests take about a
minute.
"""

from __future__ import annotations

import argparse
import json
import pstats
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import LOOPBACK, BenchError, Proc, Side, clean_env, free_port, listening_ports, log, wait_until
from tunnels import TOKEN, TWIST, Novas, local_targets

GET = b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n"
NIL = b"$-1\r\n"
_TOTALS = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Callgrind(Side):
    """A side that runs its program under callgrind, counting nothing until told to."""

    out_dir: str = ""

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.out_dir}/callgrind.%p",
            *argv,
        ]


@dataclass(frozen=True)
class Profiled(Side):
    """A side that runs a Python program under cProfile (written at exit to OUT_DIR/PROGRAM.prof)."""

    out_dir: str = ""

    def argv(self, argv: Sequence[str]) -> list[str]:
        name = "novas" if "novas" in argv else "novac"
        return [argv[0], "-m", "cProfile", "-o", f"{self.out_dir}/{name}.prof", *argv[1:]]


@dataclass(frozen=True)
class Traced(Side):
    """A side that runs a Python program under L{opcount} (counts written at exit to OUT_DIR/PROGRAM.json)."""

    out_dir: str = ""

    def argv(self, argv: Sequence[str]) -> list[str]:
        name = "novas" if "novas" in argv else "novac"
        return [argv[0], str(Path(__file__).with_name("opcount.py")), f"{self.out_dir}/{name}.json", *argv[1:]]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def instructions(out_dir: Path, pid: int) -> int:
    """Instructions counted in C{pid}'s dumps (one per C{callgrind_control -d}, plus the final one)."""
    total = 0
    for path in out_dir.glob(f"callgrind.{pid}*"):
        m = _TOTALS.search(path.read_text(errors="replace"))
        if m is not None and path.name != f"callgrind.{pid}":  # the final dump at exit: counting was off
            total += int(m.group(1))
    return total


def measure(work: Path, requests: int, warmup: int, side: Side, fresh: bool = False) -> dict[str, float]:
    """
    Count C{requests} GET round trips; C{fresh}: each on a new connection
    (the last one's close is given time to run through both sides before
    counting stops).
    """
    counting = isinstance(side, Callgrind)
    with local_targets(work) as targets:
        route = free_port()
        novas = Novas(work, free_port(), work / "novas-state", [f"{route}:{LOOPBACK}:{targets.redis_port}"], side=side)
        novac: Proc | None = None
        try:
            novas.wait_listening(600)
            env = clean_env(
                {
                    "NOVAC_SERVER": f"{LOOPBACK}:{novas.agent_port}",
                    "NOVAC_TOKEN": TOKEN,
                    "NOVAC_NAME": "cpu-agent",
                    "NOVAC_TLS_FINGERPRINT": novas.fingerprint(),
                }
            )
            novac = Proc("novac", side.argv([*TWIST, "novac"]), work / "novac.log", env=env, cwd=work)
            novas.proc.wait_log("agent cpu-agent registered", 600)
            wait_until(lambda: route in listening_ports(novas.proc.pid), 120, "the route port to listen")
            pids = {"NOVAS": novas.proc.pid, "NOVAC": novac.pid}
            if fresh:
                _connections(route, warmup)
                if counting:
                    for pid in pids.values():
                        control(pid, "-i", "on")
                _connections(route, requests)
                # The last close runs through both sides after the client's
                # own: on the other side of the warm-up's, it keeps the
                # count at the whole of C{requests} connections.
                time.sleep(2)
            else:
                with socket.create_connection((LOOPBACK, route), timeout=120) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    _loop(s, warmup)
                    if counting:
                        for pid in pids.values():
                            control(pid, "-i", "on")
                    _loop(s, requests)
            if counting:
                for pid in pids.values():
                    control(pid, "-d")
                    control(pid, "-i", "off")
            if not counting:
                return {}
            return {name: instructions(work, pid) / requests for name, pid in pids.items()}
        finally:
            if novac is not None:
                novac.stop(60)
            novas.proc.stop(60)


def _connections(route: int, n: int) -> None:
    """C{n} connections to the route, one after the other, each: connect, one GET, its reply, close."""
    for _ in range(n):
        with socket.create_connection((LOOPBACK, route), timeout=120) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _loop(s, 1)


def _loop(s: socket.socket, n: int) -> None:
    for _ in range(n):
        s.sendall(GET)
        reply = b""
        while len(reply) < len(NIL):
            chunk = s.recv(64)
            if not chunk:
                raise BenchError("the route closed the connection")
            reply += chunk
        if reply != NIL:
            raise BenchError(f"unexpected reply {reply!r}")


Key = tuple[str, int, str]


def _stats(path: Path) -> dict[Key, tuple[int, float]]:
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    return {key: (value[1], value[2]) for key, value in raw.items()}


def _package(filename: str) -> str:
    for package in ("nova", "twisted", "OpenSSL"):
        if f"/{package}/" in filename:
            return package
    return "built-in" if filename == "~" else "other"


def calls(work: Path, requests: int, warmup: int, top: int, fresh: bool = False) -> None:
    """
    Per request, each Python function's calls and own time (cProfile's, so
    inflated, but in proportion): a run of C{warmup} requests subtracted
    from a run of C{warmup + requests}, so startup cancels out.
    """
    runs = []
    for n in (0, requests):
        d = work / f"calls-{n}"
        d.mkdir()
        measure(d, max(n, 1), warmup, Profiled(out_dir=str(d)), fresh)
        runs.append({name: _stats(d / f"{name}.prof") for name in ("novas", "novac")})
    for name in ("novas", "novac"):
        base, full = runs[0][name], runs[1][name]
        diff: dict[Key, tuple[float, float]] = {}
        for key, (n, t) in full.items():
            n0, t0 = base.get(key, (0, 0.0))
            if n - n0 > 0:
                diff[key] = ((n - n0) / (requests - 1), (t - t0) / (requests - 1) * 1e6)
        total_calls = sum(c for c, _ in diff.values())
        total_us = sum(t for _, t in diff.values())
        print(
            f"{name.upper()}: {total_calls:.0f} Python-visible calls per request,"
            f" {total_us:.0f} us (cProfile) per request"
        )
        by_package: dict[str, tuple[float, float]] = {}
        for key, (c, t) in diff.items():
            package = _package(key[0])
            pc, pt = by_package.get(package, (0.0, 0.0))
            by_package[package] = (pc + c, pt + t)
        print("  calls by package: " + ", ".join(f"{p} {c:.0f}" for p, (c, _) in sorted(by_package.items())))
        print("  own us by package: " + ", ".join(f"{p} {t:.1f}" for p, (_, t) in sorted(by_package.items())))
        print(f"  {'calls':>6} {'own us':>7}  function")
        for key, (c, t) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:top]:
            where = f"{Path(key[0]).name}:{key[1]}" if key[0] != "~" else ""
            print(f"  {c:6.2f} {t:7.2f}  {key[2]} {where}")


Counts = dict[str, dict[str, float]]


def opcodes(work: Path, requests: int, warmup: int, fresh: bool = False) -> dict[str, tuple[Counts, Counts]]:
    """
    Per request and side, the bytecode instructions executed and the
    Python calls made in each package's frames, and in each function's
    (L{opcount}): a run of C{warmup} requests subtracted from a run of
    C{warmup + requests}.
    """
    runs = []
    for n in (0, requests):
        d = work / f"opcodes-{n}"
        d.mkdir()
        measure(d, max(n, 1), warmup, Traced(out_dir=str(d)), fresh)
        runs.append({name: json.loads((d / f"{name}.json").read_text()) for name in ("novas", "novac")})
    result: dict[str, tuple[Counts, Counts]] = {}
    for name in ("novas", "novac"):
        base, full = runs[0][name], runs[1][name]
        packages = {
            package: {
                what: (counts[what] - base["packages"].get(package, {}).get(what, 0)) / (requests - 1)
                for what in ("opcodes", "calls")
            }
            for package, counts in sorted(full["packages"].items())
        }
        functions = {
            function: {
                "opcodes": (ops - base["functions"].get(function, (0, 0))[0]) / (requests - 1),
                "calls": (n - base["functions"].get(function, (0, 0))[1]) / (requests - 1),
            }
            for function, (ops, n) in full["functions"].items()
        }
        result[name.upper()] = (packages, {f: c for f, c in functions.items() if c["opcodes"] >= 0.5})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (callgrind files, logs)")
    parser.add_argument(
        "--calls",
        action="store_true",
        help="instead: Python function calls and cProfile time per request, by function (no valgrind)",
    )
    parser.add_argument(
        "--opcodes",
        action="store_true",
        help="instead: bytecode instructions and Python calls per request in each package's code (no valgrind)",
    )
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--connections",
        action="store_true",
        help="each request on a new connection: the cost of one tunnelled connection's whole life",
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/cpu.py needs {tool}")
    work = Path(tempfile.mkdtemp(prefix="nova-cpu-"))
    try:
        if args.calls:
            calls(work, args.requests, args.warmup, args.top, args.connections)
            return
        if args.opcodes:
            how = "each on a new connection" if args.connections else "one connection"
            print(f"bytecode instructions and Python calls per request by package ({args.requests} GETs, {how}):")
            for side, (packages, functions) in opcodes(work, args.requests, args.warmup, args.connections).items():
                cells = ", ".join(f"{p} {v['opcodes']:,.0f} ({v['calls']:,.0f} calls)" for p, v in packages.items())
                print(f"  {side}: {cells}")
                ranked = sorted(functions.items(), key=lambda kv: -kv[1]["opcodes"])[: args.top]
                for function, v in ranked:
                    print(f"    {v['opcodes']:8,.1f} {v['calls']:6.2f}  {function}")
            return
        result = measure(work, args.requests, args.warmup, Callgrind(out_dir=str(work)), args.connections)
    finally:
        Proc.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    how = "each on a new connection" if args.connections else "one connection"
    print(f"instructions per request ({args.requests} GET round trips, {how}, TLS tunnel):")
    for name, n in result.items():
        print(f"  {name}: {n:,.0f}")


if __name__ == "__main__":
    main()
