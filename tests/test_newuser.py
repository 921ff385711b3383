"""
What a new user trips over (issue 17, item 5): settings mistakes that were
silently accepted or explained badly, the version, start-up failures under
twistd, the agent's retry line and the example files.

Here the decisions and messages, in memory.  The checks that run the real
command (`python -m twisted novas|novac`, `twistd`) the way a user would and
assert what the user sees are in tests/test_newuser_integration.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import nova
from nova.agent.options import SETTINGS as AGENT_SETTINGS
from nova.agent.options import Options as AgentOptions
from nova.agent.reconnect import Backoff, reconnecting
from nova.agent.tunnel import NOT_TLS, tls_mismatch
from nova.config import ConfigError, is_placeholder, split_host_port, unknown_variables
from nova.server.options import SETTINGS as SERVER_SETTINGS
from nova.server.options import Options as ServerOptions
from nova.service import StartupError, json_line

from .processes import TOKEN

SECRET_PASSWORD = "pg-secret-pw-77"


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


# --- The real commands -------------------------------------------------------------


# --- twistd: a start that fails exits non-zero, leaving no pid file -----------------


# --- The agent's retry line and a TLS mismatch ---------------------------------------


class RetryLineTests(SynchronousTestCase):
    def test_the_retry_line_names_the_server_the_reason_novas_count_and_delay(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[arg-type]
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


# --- Stopping twice (Ctrl-C in the terminal, then the supervisor's SIGTERM) ----------


# --- The demo ----------------------------------------------------------------------------


# --- The benchmark's NOVAS needs no fixed port ---------------------------------------


# --- The example environment files read by a shell --------------------------------------


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
