"""
The systemd units booted for real: the stand-in Debian 12 tree (the one the
image tests build from, with systemd in it) booted by
`systemd-nspawn -b`, NOVA installed into /opt/nova from the wheel, the
units installed as their comments say, then `systemctl enable --now`, the
fingerprint in the journal, `systemctl reload` re-reading the token file,
and `systemctl stop` draining and exiting 0 within TimeoutStopSec.

The machine shares the host's network namespace, so NOVAS's ports and the
echo target are all on the one loopback.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .containers import ROOT, ca_bundle, skip_loudly, stand_in_tree
from .processes import TOKEN, echo_roundtrip, free_port, target, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

SYSTEMD = ROOT / "etc" / "systemd"
AGENT_TOKEN = "systemd-agent-token-0f3a9c"
OTHER_TOKEN = "systemd-other-token-77e1b2"
# What `systemd-analyze security` may score each unit at most (0 = best, 10 = worst):
# 1.1 as shipped, booted (`--offline=yes`: 1.7 before PrivateUsers=, ProcSubset= and
# SystemCallFilter=~@privileged @resources, 1.3 after).
EXPOSURE_AT_MOST = 1.2


class Machine:
    """A booted systemd-nspawn container; commands run in it through nsenter."""

    def __init__(self, proc: subprocess.Popen[bytes], leader: int, log: Path) -> None:
        self.proc, self.leader, self.log = proc, leader, log

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", "/bin/sh", "-ec", script]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            recent = self.sh("journalctl -q --no-pager -n 60 | tail -n 12", check=False).stdout
            raise AssertionError(f"{script!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{recent}")
        return done

    def journal(self, unit: str) -> str:
        return self.sh(f"journalctl -q --no-pager -o cat -u {unit}", check=False).stdout

    def wait_journal(self, unit: str, needle: str, timeout: float = 30) -> None:
        wait_for(lambda: needle in self.journal(unit), timeout, f"{needle!r} in the journal of {unit}")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _leader(nspawn: int) -> int | None:
    """The container's PID 1, as the host sees it: the systemd that nspawn forked."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            fields = (child / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == nspawn and (child / "comm").read_text().strip() == "systemd":
            return int(child.name)
    return None


def _install_nova(tree: Path, tmp: Path) -> None:
    """/opt/nova from the wheel, pinned as the image is, before the boot (pip reaches PyPI from the host's network)."""
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.copy(ROOT / "etc" / "docker" / "constraints.txt", wheels / "constraints.txt")
    script = (
        "python3 -m venv /opt/nova && /opt/nova/bin/pip install -q --constraint /wheels/constraints.txt"
        " /wheels/nova_tunnel-*.whl"
    )
    done = subprocess.run(
        ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(tree), f"--bind-ro={wheels}:/wheels",
         f"--bind-ro={ca_bundle()}:/run/nova-ca.pem", "--setenv=PIP_CERT=/run/nova-ca.pem",
         "--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1", "/bin/sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The repository's files the install steps use.
    src = tree / "root" / "src" / "etc"
    shutil.copytree(SYSTEMD, src / "systemd")
    for example in ("novas.env.example", "novac.env.example"):
        shutil.copy(ROOT / "etc" / example, src / example)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    if shutil.which("systemd-nspawn") is None:
        raise AssertionError("systemd-nspawn is not installed: test.sh and .ci/run install it (systemd-container)")
    base = stand_in_tree()
    tmp = tmp_path_factory.mktemp("nspawn")
    tree = tmp / "tree"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], check=True, timeout=300)
    _install_nova(tree, tmp)
    log = tmp / "boot.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["systemd-nspawn", "-b", "--register=no", "--keep-unit", "-q", "-D", str(tree)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        found: list[int] = []

        def booted() -> bool:
            if proc.poll() is not None:
                return True
            leader = _leader(proc.pid)
            if leader is not None:
                found.append(leader)
            return bool(found)

        wait_for(booted, 60, "systemd-nspawn to start the container's systemd")
        if proc.poll() is not None:
            skip_loudly(f"systemd-nspawn could not boot the stand-in tree here:\n{log.read_text()[-2000:]}")
        m = Machine(proc, found[0], log)
        states: list[str] = []

        def settled() -> bool:
            # Until the container's systemd listens on its socket, systemctl prints nothing.
            states.append(m.sh("systemctl is-system-running --wait", check=False, timeout=120).stdout.strip())
            return states[-1] not in ("", "initializing", "starting")

        wait_for(settled, 120, "the container's systemd to finish booting")
        state = states[-1]
        assert state == "running", f"{state}: {m.sh('systemctl --failed --no-pager', check=False).stdout}"
        yield m
    finally:
        proc.terminate()  # nspawn asks the container's systemd to power off
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fingerprint(journal: str) -> str:
    m = re.search(r"NOVAC_TLS_FINGERPRINT=(sha256:[0-9a-f]{64})", journal)
    assert m, journal
    return m.group(1)


def test_units_booted_for_real(machine: Machine) -> None:
    m = machine
    port, admin, route = free_port(), free_port(), free_port()
    with target("echo") as echo:
        # As novas.service's comments say: the sysusers file (install -D: Debian 12 has no
        # /etc/sysusers.d) and Twisted's plugin cache are the lines of the comment itself.
        m.sh(
            "cd /root/src\n"
            + _install_step("nova.sysusers.conf")
            + "\n"
            + _install_step("getPlugins")
            + "\ninstall -d -m 0750 -g nova /etc/nova\n"
            "install -m 0600 etc/novas.env.example /etc/nova/novas.env\n"
            "install -m 0644 etc/systemd/novas.service /etc/systemd/system/novas.service\n"
            "install -m 0644 etc/systemd/novac.service /etc/systemd/system/novac.service\n"
        )
        # "then edit it": the settings of this test, after the example's (the last one wins).
        m.sh(
            f"printf '%s\\n' {AGENT_TOKEN} {OTHER_TOKEN} > /etc/nova/agent-tokens\n"
            "chown root:nova /etc/nova/agent-tokens && chmod 0640 /etc/nova/agent-tokens\n"
            "cat >> /etc/nova/novas.env <<EOF\n"
            # Every placeholder of the example replaced, as an operator must (NOVAS refuses them).
            f"NOVAS_AGENT_TOKEN={TOKEN}\nNOVAS_AGENT_TOKEN_FILE=/etc/nova/agent-tokens\n"
            "NOVAS_ADMIN_TOKEN=systemd-admin-token-5c2e91aa\n"
            f"NOVAS_AGENT_PORT={port}\nNOVAS_ADMIN_PORT={admin}\n"
            f"NOVAS_ROUTES=127.0.0.1:{route}:127.0.0.1:{echo}\nEOF\n"
            "systemctl daemon-reload && systemctl enable --now novas"
        )
        m.wait_journal("novas", "NOVAS listening")
        # The fingerprint agents pin, where the unit's comment says to look.
        fp = _fingerprint(m.sh("journalctl -u novas -g NOVAC_TLS_FINGERPRINT --no-pager").stdout)
        m.sh(
            "install -m 0600 /root/src/etc/novac.env.example /etc/nova/novac.env\n"
            "cat >> /etc/nova/novac.env <<EOF\n"
            f"NOVAC_SERVER=127.0.0.1:{port}\nNOVAC_TOKEN={AGENT_TOKEN}\nNOVAC_NAME=sd-agent\n"
            f"NOVAC_TLS_FINGERPRINT={fp}\nEOF\n"
            # The check the unit's comment gives, run as the service will run.
            "systemd-run --quiet --pipe --wait -p DynamicUser=yes -p EnvironmentFile=/etc/nova/novac.env"
            " /opt/nova/bin/twist novac --check\n"
            "systemctl enable --now novac"
        )
        m.wait_journal("novas", "agent sd-agent registered")
        assert echo_roundtrip(route, b"through systemd units") == b"through systemd units"

        # systemctl stop drains: an open stream keeps working, then exit 0 within TimeoutStopSec.
        user = socket.create_connection(("127.0.0.1", route), timeout=20)
        try:
            user.sendall(b"before")
            assert user.recv(64) == b"before"
            stopped: list[int] = []
            stopping = threading.Thread(
                target=lambda: stopped.append(m.sh("systemctl stop novac", check=False, timeout=120).returncode)
            )
            stopping.start()
            m.wait_journal("novac", "SIGTERM received: draining")
            user.sendall(b"during the drain")
            got = b""
            while len(got) < len(b"during the drain"):
                got += user.recv(64)
            assert got == b"during the drain"
        finally:
            user.close()
        stopping.join(120)
        assert stopped == [0]
        state = m.show("novac", "Result", "ExecMainStatus", "ExecMainCode", "ActiveState")
        assert state == {"Result": "success", "ExecMainStatus": "0", "ExecMainCode": "1", "ActiveState": "inactive"}

        # systemctl reload re-reads the token file: the removed token's tunnel is closed.
        m.sh("systemctl start novac")
        wait_for(lambda: m.journal("novas").count("agent sd-agent registered") == 2, 30, "the agent to register again")
        m.sh(f"printf '%s\\n' {OTHER_TOKEN} > /etc/nova/agent-tokens && systemctl reload novas")
        m.wait_journal("novas", "closing 1 tunnel(s) whose token was removed")
        m.wait_journal("novas", "agent sd-agent disconnected")
        # No agent left for the route: the user's connection is closed, nothing comes back.
        with socket.create_connection(("127.0.0.1", route), timeout=10) as nobody:
            try:
                nobody.sendall(b"no agent now")
                answer = nobody.recv(64)
            except OSError:
                answer = b""
        assert answer == b""

        m.sh("systemctl stop novas novac", timeout=120)
        for unit in ("novas", "novac"):
            state = m.show(unit, "Result", "ExecMainStatus", "NRestarts")
            assert state == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}, (unit, state)
            journal = m.journal(unit)
            for bad in ("Traceback", "Unhandled error", "error number 30", "dropin.cache"):
                assert bad not in journal, f"{unit} logged {bad!r}:\n{journal[-3000:]}"


def _install_step(word: str) -> str:
    """The line of novas.service's install comments that holds C{word}, run as it is written there."""
    text = (SYSTEMD / "novas.service").read_text()
    lines = [line[1:].strip() for line in text.splitlines() if word in line and line.startswith("#   ")]
    assert lines, f"novas.service's install steps have no line with {word!r}"
    return lines[0]


def test_security_exposure_of_the_booted_units(machine: Machine) -> None:
    """`systemd-analyze security` of the units as installed (after test_units_booted_for_real)."""
    for unit in ("novas", "novac"):
        done = machine.sh(f"systemd-analyze security --no-pager {unit}.service", check=False)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
        assert m, done.stdout + done.stderr
        print(f"systemd-analyze security {unit}.service: {m.group(1)}")
        assert float(m.group(1)) <= EXPOSURE_AT_MOST, done.stdout


def test_memory_deny_write_execute_stays_off_for_a_reason(machine: Machine) -> None:
    """
    The control for the comment in the units: with MemoryDenyWriteExecute=yes
    (a drop-in over the installed novas.service), NOVAS fails at its first TLS
    handshake, which is why the units leave it off.
    """
    m = machine
    assert m.sh("test -f /etc/systemd/system/novas.service", check=False).returncode == 0, (
        "runs after test_units_booted_for_real, which installs the units"
    )
    env = m.sh("cat /etc/nova/novas.env").stdout
    port = int(re.findall(r"^NOVAS_AGENT_PORT=(\d+)$", env, re.M)[-1])
    m.sh(
        "mkdir -p /etc/systemd/system/novas.service.d\n"
        "printf '[Service]\\nMemoryDenyWriteExecute=yes\\n' > /etc/systemd/system/novas.service.d/mdwe.conf\n"
        "systemctl daemon-reload && systemctl reset-failed novas && systemctl start novas"
    )
    try:
        m.wait_journal("novas", "NOVAS listening")
        before = m.journal("novas")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"\\0" * 16)
                    tls.recv(64)
        except OSError:
            pass

        def failed() -> bool:
            state = m.show("novas", "NRestarts", "Result", "ExecMainStatus")
            return state["NRestarts"] != "0" or state["Result"] != "success" or state["ExecMainStatus"] != "0"

        wait_for(failed, 30, "NOVAS to fail under MemoryDenyWriteExecute=yes")
        assert "Cannot allocate write+execute memory for ffi.callback()" in m.journal("novas")[len(before) :]
    finally:
        m.sh(
            "rm -r /etc/systemd/system/novas.service.d && systemctl daemon-reload && systemctl stop novas"
            " && systemctl reset-failed novas || true"
        )
