"""
What a new user trips over (issue 17, item 5): settings mistakes that were
silently accepted or explained badly, the version, start-up failures under
twistd, the agent's retry line and the example files.

Each check runs the real command (`python -m twisted novas|novac`, `twistd`)
the way a user would and asserts what the user sees: the exit status, the one
line that names the setting, no traceback and no secret.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import nova
from nova.admin.store import AuditStore, AuditStoreError, PostgresBackend, SQLiteBackend
from nova.agent.options import SETTINGS as AGENT_SETTINGS
from nova.agent.options import Options as AgentOptions
from nova.agent.reconnect import Backoff, reconnecting
from nova.agent.tunnel import NOT_TLS, tls_mismatch
from nova.config import ConfigError, is_placeholder, split_host_port, unknown_variables
from nova.server.options import SETTINGS as SERVER_SETTINGS
from nova.server.options import Options as ServerOptions
from nova.service import StartupError, json_line

from .processes import ADMIN_TOKEN, TOKEN, free_port, novac, novas, wait_for
from .test_deploy import NOVAC_ENV, NOVAS_ENV, read_env_file

BIN = Path(sys.executable).parent
SECRET_PASSWORD = "pg-secret-pw-77"


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


# --- The pure decisions ---------------------------------------------------------


class UnknownVariableTests(SynchronousTestCase):
    def test_a_misspelt_variable_names_the_closest_setting(self) -> None:
        warnings = unknown_variables(SERVER_SETTINGS, {"NOVAS_ROUTE": "1:a:2", "NOVAS_AGENT_TOKEN": "x"})
        self.assertEqual(warnings, ["NOVAS_ROUTE is not a setting and is ignored; did you mean NOVAS_ROUTES?"])

    def test_a_name_close_to_none_points_at_help(self) -> None:
        warnings = unknown_variables(AGENT_SETTINGS, {"NOVAC_FOO": "1"})
        self.assertEqual(warnings, ["NOVAC_FOO is not a setting and is ignored; see --help for the settings"])

    def test_the_other_command_and_kubernetes_service_links_are_not_ours(self) -> None:
        env = {
            "NOVAC_SERVER": "a:1",  # NOVAC's, beside NOVAS in one Compose file
            "NOVAS_SERVICE_HOST": "10.0.0.1",  # a Kubernetes Service named novas
            "NOVAS_SERVICE_PORT": "9022",
            "NOVAS_PORT": "tcp://10.0.0.1:9022",
            "NOVAS_PORT_9022_TCP_ADDR": "10.0.0.1",
            "HOME": "/root",
        }
        self.assertEqual(unknown_variables(SERVER_SETTINGS, env), [])

    def test_every_real_setting_is_known(self) -> None:
        for settings in (SERVER_SETTINGS, AGENT_SETTINGS):
            self.assertEqual(unknown_variables(settings, {s.env: "x" for s in settings}), [])


class ValueTests(SynchronousTestCase):
    def test_a_url_is_not_host_port(self) -> None:
        with self.assertRaises(ConfigError) as e:
            split_host_port("https://novas.example.com:9022", "--server / NOVAC_SERVER")
        self.assertEqual(
            str(e.exception),
            "--server / NOVAC_SERVER: 'https://novas.example.com:9022' is a URL:"
            " give HOST:PORT without https:// (e.g. novas.example.com:9022)",
        )
        with self.assertRaises(ConfigError):
            split_host_port("novas.example.com/x:9022", "--server / NOVAC_SERVER")
        self.assertEqual(split_host_port("novas.example.com:9022", "x"), ("novas.example.com", 9022))
        self.assertEqual(split_host_port("[::1]:9022", "x"), ("::1", 9022))

    def test_placeholders(self) -> None:
        for placeholder in ("change-me-to-a-long-random-secret", "CHANGEME-please-0123456789", "paste-here"):
            self.assertTrue(is_placeholder(placeholder), placeholder)
        for real in (TOKEN, "a-change-me-in-the-middle-1234", "7f3c" * 8):
            self.assertFalse(is_placeholder(real), real)

    def test_an_unknown_option_is_one_line_with_the_closest(self) -> None:
        with self.assertRaises(SystemExit) as e:
            ServerOptions(env={}).parseOptions(["--agent-tokn", "x"])
        self.assertEqual(
            str(e.exception),
            "novas: error: unknown option --agent-tokn; did you mean --agent-token? (--help lists the options)",
        )
        with self.assertRaises(SystemExit) as e:
            AgentOptions(env={}).parseOptions(["--server"])
        self.assertEqual(str(e.exception), "novac: error: option --server requires argument (--help lists the options)")

    def test_version_option_prints_novas_version_not_twisteds(self) -> None:
        out = io.StringIO()
        with self.assertRaises(SystemExit) as e, contextlib.redirect_stdout(out):
            ServerOptions(env={}).parseOptions(["--version"])
        self.assertEqual(e.exception.code, 0)
        self.assertEqual(out.getvalue(), f"novas (NOVA) {nova.__version__}\n")

    def test_startup_error_is_both_an_exit_and_an_exception(self) -> None:
        # twist lets a SystemExit print its line; twistd catches Exception to
        # remove its pid file and release the parent it detached from.
        error = StartupError("novas: error: x")
        self.assertIsInstance(error, SystemExit)
        self.assertIsInstance(error, Exception)
        self.assertEqual(error.code, "novas: error: x")


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


# --- The real commands -------------------------------------------------------------


def _bad_files(tmp: Path) -> dict[str, str]:
    garbage = tmp / "not-a-cert.pem"
    garbage.write_text("hello\n")
    return {"missing": str(tmp / "missing.pem"), "garbage": str(garbage)}


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


@pytest.mark.integration
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


@pytest.mark.integration
def test_an_unknown_option_is_one_line_not_the_whole_help() -> None:
    result = _run("novas", {"NOVAS_AGENT_TOKEN": TOKEN}, "--agent-tokn", TOKEN)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "novas: error: unknown option --agent-tokn; did you mean --agent-token? (--help lists the options)"
    ]
    assert result.stdout == ""


@pytest.mark.integration
def test_a_misspelt_variable_is_named_before_the_error_it_causes() -> None:
    result = _run("novas", {"NOVAS_AGENT_TOKN": TOKEN})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "novas: warning: NOVAS_AGENT_TOKN is not a setting and is ignored; did you mean NOVAS_AGENT_TOKEN?",
        "novas: error: --agent-token / NOVAS_AGENT_TOKEN (or --agent-token-file) is required",
    ]
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.parametrize("plugin", ["novas", "novac"])
def test_version_is_novas_own(plugin: str) -> None:
    result = _run(plugin, {}, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{plugin} (NOVA) {nova.__version__}"


# --- twistd: a start that fails exits non-zero, leaving no pid file -----------------


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


@pytest.mark.integration
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


# --- The agent's retry line and a TLS mismatch ---------------------------------------


class RetryLineTests(SynchronousTestCase):
    def test_the_retry_line_names_the_server_the_reason_novas_count_and_delay(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        endpoint = _RefusingEndpoint()
        backoff = Backoff(1.0, 30.0, random=lambda: 0.5, server="novas.example.com:9022")
        service = reconnecting(endpoint, Factory.forProtocol(Protocol), backoff, clock)  # type: ignore[arg-type]
        service.startService()
        clock.advance(0.5)
        clock.advance(1.0)
        service.stopService()
        lines = [
            formatEvent(e) for e in events if e.get("log_namespace", "").startswith(("twisted.application", "nova"))
        ]
        self.assertEqual(
            [line for line in lines if "retry" in line.lower()],
            [
                "retrying novas.example.com:9022 in 0.5s (retry 1; last attempt: Connection was refused by other"
                " side: 111: Connection refused.)",
                "retrying novas.example.com:9022 in 1.0s (retry 2; last attempt: Connection was refused by other"
                " side: 111: Connection refused.)",
                "retrying novas.example.com:9022 in 2.0s (retry 3; last attempt: Connection was refused by other"
                " side: 111: Connection refused.)",
            ],
        )
        self.assertFalse(any("Endpoint object" in line or "Scheduling retry" in line for line in lines), lines)
        backoff.reset()
        self.assertEqual(backoff.attempts, 0)

    def test_a_tls_agent_meeting_plaintext_is_told_so(self) -> None:
        wrong = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        self.assertEqual(tls_mismatch(wrong, tls=True), NOT_TLS)
        self.assertIsNone(tls_mismatch(wrong, tls=False))
        self.assertIsNone(tls_mismatch(Failure(ConnectionDone()), tls=True))


class _RefusingEndpoint:
    def connect(self, factory: object) -> Deferred[Any]:
        return fail(ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.integration
def test_agent_logs_the_server_and_why_when_it_retries(tmp_path: Path) -> None:
    closed = free_port()
    env = {"NOVAC_SERVER": f"127.0.0.1:{closed}", "NOVAC_TLS": "off", "NOVAC_RECONNECT_MAX": "1"}
    with novac(tmp_path, env) as agent:
        agent.wait_log(f"retrying 127.0.0.1:{closed} in ")
        agent.wait_log("(retry 2; last attempt: Connection was refused")
    text = agent.text()
    assert "_WrapperEndpoint" not in text and "Scheduling retry" not in text


@pytest.mark.integration
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


@pytest.mark.integration
def test_plaintext_agent_against_a_tls_server_is_told_the_server_may_speak_tls(tmp_path: Path) -> None:
    # The server's deadline first, so that it, not the agent, ends the connection.
    with novas(tmp_path, [], {"NOVAS_HANDSHAKE_TIMEOUT": "1"}) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off", "NOVAC_CONNECT_TIMEOUT": "3"}
        with novac(tmp_path, env) as agent:
            server.wait_log("the TLS handshake did not finish within 1s (an agent with NOVAC_TLS=off sends nothing)")
            agent.wait_log("without a word (no HELLO): it may be speaking TLS while this agent has NOVAC_TLS=off")


# --- Stopping twice (Ctrl-C in the terminal, then the supervisor's SIGTERM) ----------


@pytest.mark.integration
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


# --- The demo ----------------------------------------------------------------------------


@pytest.mark.integration
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


# --- The benchmark's NOVAS needs no fixed port ---------------------------------------


@pytest.mark.integration
def test_bench_novas_listens_on_no_admin_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the default admin port (9023) it could not start while a demo or another NOVAS held it.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import tunnels  # type: ignore[import-not-found]

    server = tunnels.Novas(tmp_path, free_port(), tmp_path / "state")
    try:
        server.wait_listening(60)
        text = server.proc.text()
    finally:
        server.stop()
    assert "NOVAS listening" in text
    assert "admin on" not in text, text


# --- The example environment files read by a shell --------------------------------------


@pytest.mark.parametrize("path", [NOVAS_ENV, NOVAC_ENV], ids=["novas", "novac"])
def test_sourcing_an_env_example_with_bash_gives_what_systemd_and_compose_read(path: Path) -> None:
    script = f'set -a; . "{path}" || exit 3; set +a; env -0'
    result = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    sourced = {k: v for k, v in pairs if k.startswith(("NOVAS_", "NOVAC_"))}
    assert sourced == read_env_file(path)[0]


# --- Log format: text by default everywhere, or one JSON object per line ----------------


class JsonLineTests(SynchronousTestCase):
    def test_an_event_is_one_json_object_on_one_line(self) -> None:
        event = {
            "log_format": "agent {agent} registered from {peer}",
            "log_level": LogLevel.info,
            "log_namespace": "nova.server.tunnel",
            "log_time": 1_700_000_000.25,
            "agent": "db-agent-0",
            "peer": "127.0.0.1:5000",
            "count": 3,
            "addr": ("127.0.0.1", 5000),
        }
        line = json_line(event)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2023-11-14T22:13:20.250+00:00",
                "level": "info",
                "logger": "nova.server.tunnel",
                "message": "agent db-agent-0 registered from 127.0.0.1:5000",
                "fields": {"agent": "db-agent-0", "peer": "127.0.0.1:5000", "count": 3, "addr": "('127.0.0.1', 5000)"},
            },
        )

    def test_a_failure_keeps_its_traceback_inside_the_line(self) -> None:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            failure = Failure()
        line = json_line({"log_format": "it failed", "log_level": LogLevel.error, "log_failure": failure})
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(
            (record["level"], record["message"], record["error"]), ("error", "it failed", "boom\nsecond line")
        )
        self.assertIn("ValueError", record["traceback"])


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


@pytest.mark.integration
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


@pytest.mark.integration
def test_check_mode_warns_about_a_misspelt_variable_too() -> None:
    env = {"NOVAC_SERVER": f"127.0.0.1:{free_port()}", "NOVAC_TLS": "off", "NOVAC_TOKEN": TOKEN, "NOVAC_TAG": "a=b"}
    result = _run("novac", env, "--check")
    assert result.returncode == 2  # nothing listens there
    assert "novac: warning: NOVAC_TAG is not a setting and is ignored; did you mean NOVAC_TAGS?" in result.stderr
