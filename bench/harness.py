"""
Process plumbing for the benchmark: start programs in their own process
groups with their output in a log file, wait for things with timeouts, read
RSS, and make sure nothing is left running.

Every network address used here is on loopback, or on the shaped link's
own network namespaces (L{Side}), which the suite creates and removes.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# The process harness is the tests' own (tests/harness.py: the standard
# library only), so the benchmark and the tests start, watch and stop
# programs the same way.  Appended, so that nothing installed is shadowed.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from tests import harness as _harness
from tests.harness import clean_env as clean_env
from tests.harness import free_port as free_port
from tests.harness import rss_kib as rss_kib

LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """Something is broken (not merely slow): a process died, a tunnel did not come up, a client failed."""


class Unavailable(Exception):
    """A tool that a figure needs is missing here: the figure is skipped, with this reason printed."""


@dataclass(frozen=True)
class Side:
    """Where a program runs: this network namespace (C{netns} None) or a named one."""

    netns: str | None = None

    def argv(self, argv: Sequence[str]) -> list[str]:
        """C{argv} to run on this side (C{ip netns exec} execs the program: its pid is the program's)."""
        return _harness.in_netns(self.netns, argv)


HERE = Side()


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll C{predicate} until it holds; return the seconds it took.  Raises L{BenchError} on timeout."""
    return _harness.wait_for(predicate, timeout, what, interval, error=BenchError)


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by children); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listening_ports(pid: int | None = None) -> set[int]:
    """
    TCP ports in LISTEN state (IPv4 and IPv6), from /proc/net: in this
    network namespace, or in the one process C{pid} is in.
    """
    ports: set[int] = set()
    base = "/proc/net" if pid is None else f"/proc/{pid}/net"
    for table in (f"{base}/tcp", f"{base}/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Proc(_harness.Proc):
    """
    L{tests.harness.Proc} as the benchmark wants it: failures are
    L{BenchError}s, logs are appended to, and what happens on the way out
    is logged.
    """

    failure: ClassVar[type[Exception]] = BenchError
    log_mode: ClassVar[str] = "ab"

    def note(self, message: str) -> None:
        log(message)


def run_tool(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """
    Run a client tool to completion (in its own process group, killed on
    timeout) and return its output; a non-zero exit is a L{BenchError}.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise BenchError(f"{what}: timed out after {timeout:g}s: {' '.join(argv)}\n{err[-2000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.returncode != 0:
        raise BenchError(f"{what}: exit status {proc.returncode}: {' '.join(argv)}\n{(err or out)[-2000:]}")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


@contextmanager
def profiled(procs: Mapping[str, Proc], out_dir: Path, label: str) -> Iterator[None]:
    """
    Record a py-spy profile of each process while the block runs: a flame
    graph (C{OUT_DIR/LABEL-NAME.svg}) and the same samples as collapsed
    stacks (C{LABEL-NAME.folded}, one "frame;frame;... count" line per
    stack, for C{bench/profile_top.py}).  py-spy samples without pausing
    the target.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spies: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, proc in procs.items():
        for fmt, ext in (("flamegraph", "svg"), ("raw", "folded")):
            argv = ["py-spy", "record", "--nonblocking", "--rate", "200", "--pid", str(proc.pid)]
            argv += ["--format", fmt, "--output", str(out_dir / f"{label}-{name}.{ext}")]
            spy_log = open(out_dir / f"{label}-{name}-{ext}.log", "wb")  # handed to py-spy; closed below
            spies.append((name, subprocess.Popen(argv, stdout=spy_log, stderr=spy_log, start_new_session=True)))
            spy_log.close()
    try:
        time.sleep(0.5)  # py-spy attaches
        yield
    finally:
        for name, spy in spies:
            if spy.poll() is None:
                os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(5)
                log(f"py-spy for {name} did not finish writing {label}")
