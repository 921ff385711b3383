"""
A shaped link for the benchmark: two network namespaces of this run's own,
joined by C{shaped-link} (delay, loss, reordering, rate; a userspace
emulator, since this kernel has no C{netem}), and the profiles measured over
it.  The agent side (NOVAC, the ssh client, the Go agent, the targets) runs
in namespace A, "the private network"; the server side (NOVAS, sshd, the Go
server, the clients) in namespace B; the tunnel crosses the link.

The tool is not part of this repository: C{NOVA_SHAPED_LINK} names it, or
it is looked for at C{../shared/tools/shaped-link/shaped-link} beside the
repository.  Without it (or without root, C{ip}, C{gcc}) the shaped figures
are skipped with the reason printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import BenchError, Side, Unavailable, log
from tunnels import Placement

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOOL = REPO.parent / "shared" / "tools" / "shaped-link" / "shaped-link"
ADDR_A, ADDR_B = "10.250.0.1", "10.250.0.2"  # the link's own addresses, inside this run's namespaces only


@dataclass(frozen=True)
class Profile:
    key: str  # row key prefix
    label: str
    delay_ms: float  # one way, each direction: RTT = 2 x delay_ms
    loss_pct: float  # each direction
    bulk1_bar: float  # NOVA / ssh -R for single-stream bulk
    p99_bar: bool  # whether "p99 under bulk <= RTT + 2 ms" applies

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms


PROFILES = (
    Profile("rtt10", "10 ms RTT", 5, 0, 1.0, True),
    Profile("rtt50", "50 ms RTT", 25, 0, 1.0, True),
    # With 1 % loss each way, a request or its reply loses a packet about 2 %
    # of the time and waits at least one more round trip for the
    # retransmission, so no TCP tunnel's p99 can be within RTT + 2 ms: shown,
    # not barred.
    Profile("rtt50loss1", "50 ms RTT, 1 % loss", 25, 1, 0.8, False),
)


def find_tool() -> Path:
    """The C{shaped-link} script, or L{Unavailable} with the reason."""
    configured = os.environ.get("NOVA_SHAPED_LINK")
    tool = Path(configured) if configured else DEFAULT_TOOL
    if not tool.is_file():
        how = "NOVA_SHAPED_LINK" if configured else f"{DEFAULT_TOOL} (or set NOVA_SHAPED_LINK)"
        raise Unavailable(f"shaped-link not found: {how}")
    if os.geteuid() != 0:
        raise Unavailable("shaped-link needs root (network namespaces, TUN devices)")
    for program in ("ip", "gcc", "bash"):
        if shutil.which(program) is None:
            raise Unavailable(f"shaped-link needs {program}, which is not installed")
    return tool


class Link:
    """This run's shaped link: its namespaces, and the profile in force."""

    def __init__(self, tool: Path, work: Path) -> None:
        tag = f"nb{os.getpid() % 100000}"
        self.tool = tool
        self.ns_a, self.ns_b = f"{tag}a", f"{tag}b"
        self.env = {
            **os.environ,
            "NS_A": self.ns_a,
            "NS_B": self.ns_b,
            "ADDR_A": ADDR_A,
            "ADDR_B": ADDR_B,
            "LINK_DIR": str(work / "shaped-link"),
        }
        self.placement = Placement(server=Side(self.ns_b), agent=Side(self.ns_a), server_addr=ADDR_B)

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run([str(self.tool), *args], env=self.env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise BenchError(f"shaped-link {' '.join(args)} timed out") from None
        if done.returncode != 0:
            raise BenchError(f"shaped-link {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def up(self) -> None:
        self._run("up")
        for ns in (self.ns_a, self.ns_b):
            # New connections start from scratch, not from what an earlier
            # connection (another tunnel, another profile) taught the kernel.
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_no_metrics_save=1"],
                capture_output=True,
                timeout=30,
            )

    def set(self, profile: Profile) -> None:
        self._run("set", f"{profile.delay_ms:g}", f"{profile.loss_pct:g}")
        log(f"shaped link {self.ns_a}<->{self.ns_b}: {profile.label} (set {profile.delay_ms:g} {profile.loss_pct:g})")

    def stats(self) -> str:
        try:
            return self._run("stats").strip()
        except BenchError as e:
            return str(e)

    def down(self) -> None:
        try:
            self._run("down")
        except BenchError as e:
            log(f"shaped-link down: {e}")


@contextmanager
def shaped_link(work: Path) -> Iterator[Link]:
    """This run's link, always taken down at the end (L{Unavailable} if the tool cannot run here)."""
    link = Link(find_tool(), work)
    try:
        link.up()
        log(f"shaped link up: namespaces {link.ns_a} (agent side, {ADDR_A}) and {link.ns_b} (server side, {ADDR_B})")
        yield link
    finally:
        link.down()
