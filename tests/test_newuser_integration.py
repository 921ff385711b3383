"""
What a new user trips over, run for real: `python -m twisted novas|novac`
and `twistd` the way a user would, asserting what the user sees (the exit
status, the one line that names the setting, no traceback and no secret).
The in-memory half is tests/test_newuser.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

import nova
from nova.admin.store import AuditStore, AuditStoreError, PostgresBackend, SQLiteBackend

from .processes import ADMIN_TOKEN, TOKEN, free_port, novac, novas, wait_for
from .test_deploy import NOVAC_ENV, NOVAS_ENV, read_env_file
from .test_newuser import SECRET_PASSWORD

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
CASES = [
    pytest.param(
        "novas",
        {"NOVAS_AGENT_TOKEN": "change-me-to-a-long-random-secret"},
        "--agent-token / NOVAS_AGENT_TOKEN is still the example's placeholder",
        id="novas-placeholder-agent-token",
    ),
    pytest.param(
        "novas",
        {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_ADMIN_TOKEN": "change-me-to-another-long-random-secret"},
        "--admin-token / NOVAS_ADMIN_TOKEN is still the example's placeholder",
        id="novas-placeholder-admin-token",
    ),
    pytest.param(
        "novac",
        {"NOVAC_SERVER": "a:1", "NOVAC_TLS": "off", "NOVAC_TOKEN": "change-me-to-a-long-random-secret"},
        "--token / NOVAC_TOKEN is still the example's placeholder",
        id="novac-placeholder-token",
    ),
    pytest.param(
        "novac",
        {"NOVAC_SERVER": "https://novas.example.com:9022", "NOVAC_TLS": "off", "NOVAC_TOKEN": TOKEN},
        "--server / NOVAC_SERVER: 'https://novas.example.com:9022' is a URL: give HOST:PORT without https://",
        id="novac-server-url",
    ),
    pytest.param(
        "novas",
        {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_ROUTES": "15432:db:5432;16379:cache:6379"},
        "--route / NOVAS_ROUTES: route '15432:db:5432;16379:cache:6379' is not [BIND:]PORT:HOST:HOSTPORT"
        "[@SELECTOR] (NOVAS_ROUTES separates entries with ',', not ';')",
        id="novas-routes-semicolon",
    ),
    pytest.param(
        "novas",
        {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_TLS_CERT": "{missing}", "NOVAS_TLS_KEY": "{missing}"},
        "--tls-cert / NOVAS_TLS_CERT: cannot read certificate",
        id="novas-unreadable-cert",
    ),
    pytest.param(
        "novas",
        {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_TLS_CERT": "{garbage}", "NOVAS_TLS_KEY": "{missing}"},
        "--tls-cert / NOVAS_TLS_CERT: certificate",
        id="novas-garbage-cert",
    ),
    pytest.param(
        "novac",
        {
            "NOVAC_SERVER": "a:1",
            "NOVAC_TOKEN": TOKEN,
            "NOVAC_TLS_FINGERPRINT": "sha256:" + "ab" * 32,
            "NOVAC_TLS_CERT": "{missing}",
            "NOVAC_TLS_KEY": "{missing}",
        },
        "--tls-cert / NOVAC_TLS_CERT: cannot read client certificate",
        id="novac-unreadable-client-cert",
    ),
    pytest.param(
        "novas",
        {
            "NOVAS_AGENT_TOKEN": TOKEN,
            "NOVAS_ADMIN_PORT": "off",
            "NOVAS_AUDIT_DB": f"postgresql://nova:{SECRET_PASSWORD}@127.0.0.1:{{closed}}/nova",
        },
        "--audit-db / NOVAS_AUDIT_DB: cannot open the audit store postgresql://nova:***@127.0.0.1:",
        id="novas-audit-db-down",
    ),
]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    env.update(extra)
    return env


def _run(plugin: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted", plugin, *args],
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


class AuditStoreErrorTests(SynchronousTestCase):
    def test_an_unreachable_postgresql_names_the_setting_and_hides_the_password(self) -> None:
        dsn = f"postgresql://nova:{SECRET_PASSWORD}@127.0.0.1:{free_port()}/nova"
        store = AuditStore(PostgresBackend(dsn))
        with self.assertRaises(AuditStoreError) as e:
            store.start()
        message = str(e.exception)
        self.assertTrue(
            message.startswith("--audit-db / NOVAS_AUDIT_DB: cannot open the audit store postgresql://nova:***@")
        )
        self.assertNotIn(SECRET_PASSWORD, message)
        self.assertNotIn("\n", message)

    def test_an_unusable_sqlite_path_names_the_setting(self) -> None:
        store = AuditStore(SQLiteBackend(Path("/proc/nova-cannot-be-here/audit.sqlite3")))
        with self.assertRaises(AuditStoreError) as e:
            store.start()
        self.assertIn(
            "--audit-db / NOVAS_AUDIT_DB: cannot open the audit store /proc/nova-cannot-be-here", str(e.exception)
        )


def _bad_files(tmp: Path) -> dict[str, str]:
    garbage = tmp / "not-a-cert.pem"
    garbage.write_text("hello\n")
    return {"missing": str(tmp / "missing.pem"), "garbage": str(garbage)}


@pytest.mark.parametrize(("plugin", "env", "message"), CASES)
def test_a_silent_mistake_is_one_line_naming_the_setting(
    tmp_path: Path, plugin: str, env: dict[str, str], message: str
) -> None:
    values = _bad_files(tmp_path) | {"closed": str(free_port())}
    env = {k: v.format(**values) for k, v in env.items()}
    if plugin == "novas":
        env.setdefault("NOVAS_STATE_DIR", str(tmp_path / "state"))
        env.setdefault("NOVAS_AGENT_PORT", str(free_port()))
        env.setdefault("NOVAS_ADMIN_PORT", str(free_port()))
    result = _run(plugin, env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{plugin}: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for secret in (TOKEN, SECRET_PASSWORD):
        assert secret not in result.stderr + result.stdout


def test_an_unknown_option_is_one_line_not_the_whole_help() -> None:
    result = _run("novas", {"NOVAS_AGENT_TOKEN": TOKEN}, "--agent-tokn", TOKEN)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "novas: error: unknown option --agent-tokn; did you mean --agent-token? (--help lists the options)"
    ]
    assert result.stdout == ""


def test_a_misspelt_variable_is_named_before_the_error_it_causes() -> None:
    result = _run("novas", {"NOVAS_AGENT_TOKN": TOKEN})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "novas: warning: NOVAS_AGENT_TOKN is not a setting and is ignored; did you mean NOVAS_AGENT_TOKEN?",
        "novas: error: --agent-token / NOVAS_AGENT_TOKEN (or --agent-token-file) is required",
    ]
    assert TOKEN not in result.stderr + result.stdout


def test_a_misspelt_variable_is_warned_about_at_start_and_both_sides_log_the_version(tmp_path: Path) -> None:
    with novas(tmp_path, [], {"NOVAS_ROUTE": f"{free_port()}:127.0.0.1:1"}) as (server, port):
        server.wait_log("NOVAS listening")
        text = server.text()
        assert "NOVAS_ROUTE is not a setting and is ignored; did you mean NOVAS_ROUTES?" in text
        assert f"novas (NOVA) {nova.__version__}, Twisted " in text
        with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off", "NOVAC_TAG": "a=b"}) as agent:
            agent.wait_log(f"novac (NOVA) {nova.__version__}, Twisted ")
            agent.wait_log("NOVAC_TAG is not a setting and is ignored; did you mean NOVAC_TAGS?")
    assert ADMIN_TOKEN not in server.text()


@pytest.mark.parametrize("plugin", ["novas", "novac"])
def test_version_is_novas_own(plugin: str) -> None:
    result = _run(plugin, {}, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{plugin} (NOVA) {nova.__version__}"


def _twistd_env(tmp: Path, agent_port: int, **extra: str) -> dict[str, str]:
    return _clean_env(
        NOVAS_AGENT_TOKEN=TOKEN,
        NOVAS_AGENT_PORT=str(agent_port),
        NOVAS_ADMIN_PORT=str(free_port()),
        NOVAS_STATE_DIR=str(tmp / "state"),
        **extra,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _twistd_processes_for(pidfile: Path) -> list[int]:
    """Processes whose command line names this test's pid file (the daemon, if it lingers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(pidfile).encode() in cmdline and _pid_alive(int(proc.name)):
                found.append(int(proc.name))
    return found


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "nodaemon"])
@pytest.mark.parametrize("failure", ["port-in-use", "audit-db-down"])
def test_twistd_exits_non_zero_when_novas_cannot_start(tmp_path: Path, daemon: bool, failure: str) -> None:
    pidfile, logfile = tmp_path / "novas.pid", tmp_path / "novas.log"
    busy = socket.socket()
    busy.bind(("0.0.0.0", free_port()))
    busy.listen()
    try:
        if failure == "port-in-use":
            env, expected = _twistd_env(tmp_path, busy.getsockname()[1]), "cannot listen for agents on port"
        else:
            env = _twistd_env(
                tmp_path, free_port(), NOVAS_AUDIT_DB=f"postgresql://nova:{SECRET_PASSWORD}@127.0.0.1:{free_port()}/n"
            )
            expected = "--audit-db / NOVAS_AUDIT_DB: cannot open the audit store"
        argv = [str(BIN / "twistd"), "--pidfile", str(pidfile), "--logfile", str(logfile)]
        argv += ([] if daemon else ["--nodaemon"]) + ["novas"]
        try:
            result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            for pid in _twistd_processes_for(pidfile):
                os.kill(pid, signal.SIGKILL)
            raise AssertionError("twistd hung instead of exiting") from None
    finally:
        busy.close()
    assert result.returncode != 0
    wait_for(lambda: not _twistd_processes_for(pidfile), 10, "the daemon to be gone")
    assert not pidfile.exists(), "stale pid file"
    log = logfile.read_text()
    assert f"novas: error: {expected}" in log
    assert "Traceback" not in log
    assert SECRET_PASSWORD not in log + result.stdout + result.stderr
    if daemon:
        # The parent that waited says so, in the 100 bytes twistd passes on.
        assert "novas: error: " in result.stderr


def test_agent_logs_the_server_and_why_when_it_retries(tmp_path: Path) -> None:
    closed = free_port()
    env = {"NOVAC_SERVER": f"127.0.0.1:{closed}", "NOVAC_TLS": "off", "NOVAC_RECONNECT_MAX": "1"}
    with novac(tmp_path, env) as agent:
        agent.wait_log(f"retrying 127.0.0.1:{closed} in ")
        agent.wait_log("(retry 2; last attempt: Connection was refused")
    text = agent.text()
    assert "_WrapperEndpoint" not in text and "Scheduling retry" not in text


def test_tls_agent_against_a_plaintext_server_is_told_the_server_does_not_speak_tls(tmp_path: Path) -> None:
    with novas(tmp_path, [], {"NOVAS_TLS": "off"}) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": "sha256:" + "ab" * 32}
        with novac(tmp_path, env) as agent:
            agent.wait_log(f"cannot register with 127.0.0.1:{port}: the server does not speak TLS")
            agent.wait_log("NOVAC_TLS=off")
            agent.wait_log("last attempt: TLS mismatch")
            # And the server says so too, naming both settings.
            server.wait_log("the client started a TLS handshake on this plaintext agent port")
            assert "set NOVAC_TLS=off on the agent" in server.text()
        assert "UNSUPPORTED_VERSION" not in agent.text()


def test_plaintext_agent_against_a_tls_server_is_told_the_server_may_speak_tls(tmp_path: Path) -> None:
    # The server's deadline first, so that it, not the agent, ends the connection.
    with novas(tmp_path, [], {"NOVAS_HANDSHAKE_TIMEOUT": "1"}) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off", "NOVAC_CONNECT_TIMEOUT": "3"}
        with novac(tmp_path, env) as agent:
            server.wait_log("the TLS handshake did not finish within 1s (an agent with NOVAC_TLS=off sends nothing)")
            agent.wait_log("without a word (no HELLO): it may be speaking TLS while this agent has NOVAC_TLS=off")


@pytest.mark.parametrize("plugin", ["novas", "novac"])
def test_ctrl_c_then_sigterm_leaves_no_traceback(tmp_path: Path, plugin: str) -> None:
    with contextlib.ExitStack() as stack:
        server, port = stack.enter_context(novas(tmp_path, [], {"NOVAS_TLS": "off"}))
        proc = server
        agent = stack.enter_context(novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off"}))
        # Registered: both reactors run, so their signal handlers are in place.
        server.wait_log("agent agent-1 registered")
        agent.wait_log("registered with")
        proc = server if plugin == "novas" else agent
        # What a terminal's Ctrl-C and then the demo (or a supervisor) send.
        proc.proc.send_signal(signal.SIGINT)
        proc.proc.send_signal(signal.SIGTERM)
        proc.proc.wait(30)
        text = proc.text()
        assert "ReactorNotRunning" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep"])
def test_demo_ctrl_c_stops_cleanly_and_removes_its_files(tmp_path: Path, keep: bool) -> None:
    argv = [sys.executable, "-m", "nova.demo", "--admin-port", str(free_port()), "--route-port", str(free_port())]
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        # Its own process group, as a terminal's foreground job: Ctrl-C is SIGINT to the whole group.
        demo = subprocess.Popen(
            argv + (["--keep"] if keep else []),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            start_new_session=True,
        )
        try:
            wait_for(lambda: "Press Ctrl-C to stop." in out.read_text(), 60, "the demo to start")
            os.killpg(demo.pid, signal.SIGINT)
            assert demo.wait(30) == 0
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
    text = out.read_text()
    work = Path(text.split("files in ", 1)[1].split(")", 1)[0])
    assert work.name.startswith("nova-demo-")
    # The page's address to open, not a macOS `open` command.
    assert not any(line.strip().startswith("open ") for line in text.splitlines())
    assert "/#token=" in text
    assert "Traceback" not in text
    if keep:
        for log in ("novas.log", "novac.log"):
            logged = (work / log).read_text()
            assert "ReactorNotRunning" not in logged and "Traceback" not in logged, logged[-3000:]
            assert "SIGTERM received" in logged
        assert f"files kept in {work}" in text
        shutil.rmtree(work)
    else:
        assert not work.exists()


def test_bench_novas_listens_on_no_admin_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the default admin port (9023) it could not start while a demo or another NOVAS held it.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import tunnels

    server = tunnels.Novas(tmp_path, free_port(), tmp_path / "state")
    try:
        server.wait_listening(60)
        text = server.proc.text()
    finally:
        server.stop()
    assert "NOVAS listening" in text
    assert "admin on" not in text, text


@pytest.mark.parametrize("path", [NOVAS_ENV, NOVAC_ENV], ids=["novas", "novac"])
def test_sourcing_an_env_example_with_bash_gives_what_systemd_and_compose_read(path: Path) -> None:
    script = f'set -a; . "{path}" || exit 3; set +a; env -0'
    result = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    sourced = {k: v for k, v in pairs if k.startswith(("NOVAS_", "NOVAC_"))}
    assert sourced == read_env_file(path)[0]


def _twist_output(tmp_path: Path, twist_args: list[str], env: dict[str, str]) -> bytes:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.log"
    full = {
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_AGENT_PORT": str(free_port()),
        "NOVAS_ADMIN_PORT": "off",
        "NOVAS_STATE_DIR": str(tmp_path / "state"),
    } | env
    with open(out, "wb") as sink:  # a file, not a terminal: where twist used to switch to JSON sequences
        proc = subprocess.Popen(
            [sys.executable, "-m", "twisted", *twist_args, "novas"], stdout=sink, stderr=subprocess.STDOUT,
            env=_clean_env(**full),
        )  # fmt: skip
        try:
            wait_for(lambda: b"NOVAS listening" in out.read_bytes(), 30, "NOVAS to listen")
        finally:
            proc.terminate()
            proc.wait(30)
    return out.read_bytes()


def test_log_is_text_by_default_and_json_lines_on_request(tmp_path: Path) -> None:
    text = _twist_output(tmp_path, [], {})
    assert b"\x1e" not in text and not text.startswith(b"{")
    assert b"[nova.server.tap#info] NOVAS listening for agents on" in text

    lines = _twist_output(tmp_path, [], {"NOVA_LOG_FORMAT": "json"}).decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    listening = [r for r in records if r["message"].startswith("NOVAS listening for agents on")]
    assert len(listening) == 1
    assert listening[0]["level"] == "info" and listening[0]["logger"] == "nova.server.tap"
    assert listening[0]["fields"]["tls"] == "TLS" and "time" in listening[0]

    # twist's own option still wins.
    explicit = _twist_output(tmp_path, ["--log-format=json"], {"NOVA_LOG_FORMAT": "text"})
    assert explicit.startswith(b"\x1e")


def test_check_mode_warns_about_a_misspelt_variable_too() -> None:
    env = {"NOVAC_SERVER": f"127.0.0.1:{free_port()}", "NOVAC_TLS": "off", "NOVAC_TOKEN": TOKEN, "NOVAC_TAG": "a=b"}
    result = _run("novac", env, "--check")
    assert result.returncode == 2  # nothing listens there
    assert "novac: warning: NOVAC_TAG is not a setting and is ignored; did you mean NOVAC_TAGS?" in result.stderr
