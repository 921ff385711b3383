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
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)


HERE = Side()


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll C{predicate} until it holds; return the seconds it took.  Raises L{BenchError} on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


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


def rss_kib(pid: int) -> int:
    """Resident set size of C{pid} in KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any NOVAS_/NOVAC_ settings, plus C{extra}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    env.update(extra or {})
    return env


class Proc:
    """
    A program in its own process group (session), stdout and stderr to a
    log file.  L{stop} ends the whole group: first SIGTERM, then SIGKILL.
    """

    live: list[Proc] = []

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=self._log if stdout is None else stdout,
            stderr=self._log,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._read_offset = 0
        Proc.live.append(self)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid {self.pid}>"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}; last lines of {self.log_path}:\n{self.tail()}"
            )

    def wait_log(self, needle: str, timeout: float) -> float:
        """Wait until C{needle} appears in the log; fail early if the process exits."""

        def found() -> bool:
            if needle in self.text():
                return True
            self.check_alive()
            return False

        return wait_until(found, timeout, f"{needle!r} in {self.log_path.name}")

    def new_lines(self) -> list[str]:
        """Complete log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._read_offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._read_offset += end + 1
        return chunk[: end + 1].decode(errors="replace").splitlines()

    def rss_kib(self) -> int:
        self.check_alive()
        return rss_kib(self.pid)

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the process group (SIGTERM, then SIGKILL after C{timeout}); return the exit status."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g}s; killing it")
        # Whatever is left in the group (children of the leader) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {self.pid}) did not die after SIGKILL")
        if not self._log.closed:
            self._log.close()
        if self in Proc.live:
            Proc.live.remove(self)
        return self.popen.returncode

    @classmethod
    def stop_all(cls) -> None:
        for proc in reversed(list(cls.live)):
            proc.stop(timeout=5.0)


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
