"""
Programs under test, started one way for the tests and the benchmark: each
in its own session with its output in a log file, waited for by what it
logs (always with a deadline), and ended as a whole process group.

The tests reach it through L{tests.processes} (which adds NOVA's plugins),
the benchmark through C{bench/harness.py}.  It imports nothing from NOVA or
from the rest of C{tests}, so C{bench/} can load it from a checkout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

_EPHEMERAL = (32768, 60999)
try:
    _low, _high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    _EPHEMERAL = (_low, _high)
except (OSError, ValueError):
    pass
_handed_out: set[int] = set()


def free_port() -> int:
    """
    A port nothing listens on, chosen below the kernel's ephemeral range: a
    port the kernel handed out for binding to port 0 can be taken by any
    outgoing connection (a flood test's, say) before the server under test
    binds it.  Checked free on the wildcard address, as NOVAS binds it.
    """
    for _ in range(1000):
        port = random.randrange(10_000, min(_EPHEMERAL[0], 32_768))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.05,
    error: type[Exception] = AssertionError,
) -> float:
    """
    Poll C{predicate} until it holds; return the seconds it took.  Raises
    C{error} at the deadline.  For a state another process reaches (a log
    line, a listening port), which has no event this process could wait on.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any NOVAS_/NOVAC_ settings, plus C{extra}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    env.update(extra or {})
    return env


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """C{argv} run inside network namespace C{netns} (C{ip netns exec} execs it: the pid is the program's)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def rss_kib(pid: int) -> int:
    """Resident set size of C{pid} in KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Proc:
    """
    A program in its own process group (session), stdout and stderr to a
    log file.  L{stop} ends the whole group: first SIGTERM, then SIGKILL.

    Subclasses choose the exception a failure raises (L{failure}) and whether
    a new log replaces or extends an old one of the same name (L{log_mode}).
    """

    failure: ClassVar[type[Exception]] = AssertionError
    log_mode: ClassVar[str] = "wb"
    live: ClassVar[list[Proc]] = []

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
        self._log = open(log_path, self.log_mode)  # closed in stop()
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

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The C{Popen} (the tests' name for L{popen})."""
        return self.popen

    def note(self, message: str) -> None:
        """Something the caller may want to know about (the benchmark logs it)."""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise self.failure(
                f"{self.name} exited with status {self.popen.returncode}; last lines of {self.log_path}:\n"
                + self.tail(60)
            )

    def wait_log(self, needle: str, timeout: float = 20.0) -> float:
        """Wait until C{needle} appears in the log; fail early if the process exits."""

        def found() -> bool:
            if needle in self.text():
                return True
            self.check_alive()
            return False

        return wait_for(found, timeout, f"{needle!r} in {self.log_path.name}", error=self.failure)

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
                self.note(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g}s; killing it")
        # Whatever is left in the group (children of the leader) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.note(f"{self.name} (pid {self.pid}) did not die after SIGKILL")
        if not self._log.closed:
            self._log.close()
        if self in Proc.live:
            Proc.live.remove(self)
        return self.popen.returncode

    @classmethod
    def stop_all(cls) -> None:
        for proc in reversed(list(Proc.live)):
            proc.stop(timeout=5.0)
