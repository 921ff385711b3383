"""
Which layers a module may import: each import is checked in a fresh
interpreter, so nothing another test has loaded hides a dependency.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from twisted.trial.unittest import SynchronousTestCase

# Each test imports a module in a fresh interpreter (a subprocess).
pytestmark = pytest.mark.integration


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running C{statement}."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def under(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


PURE = (
    "nova.wire.codec",
    "nova.wire.handshake",
    "nova.mux.core",
    "nova.values",
    "nova.server.routes",
    "nova.server.socks5",
    "nova.agent.policy",
    "nova.agent.events",
)
"""Cores that do no I/O: they load no Twisted at all."""


class LayerTests(SynchronousTestCase):
    def test_routes_do_not_import_the_command_line(self) -> None:
        loaded = loaded_after("import nova.server.routes")
        self.assertEqual(under(loaded, "nova.config", "nova.server.options", "twisted.python.usage"), [])

    def test_the_pure_cores_load_no_twisted(self) -> None:
        for module in PURE:
            self.assertEqual(under(loaded_after(f"import {module}"), "twisted"), [], module)

    def test_novac_loads_neither_the_admin_page_nor_prometheus(self) -> None:
        # The agent's service, built as `twist novac` builds it, with a probe
        # port but no /metrics: Prometheus is loaded only to serve /metrics.
        loaded = loaded_after(
            "from twisted.internet import reactor\n"
            "from nova.agent.options import Options\n"
            "from nova.agent.tap import makeService\n"
            "options = Options(env={'NOVAC_SERVER': 's:1', 'NOVAC_TOKEN': 'x' * 16, 'NOVAC_TLS': 'off',"
            " 'NOVAC_HEALTH_PORT': '0', 'NOVAC_METRICS': 'off'})\n"
            "options.parseOptions([])\n"
            "makeService(options)"
        )
        self.assertEqual(under(loaded, "nova.admin", "prometheus_client"), [])
        self.assertIn("nova.agent.health", loaded)

    def test_novac_loads_prometheus_to_serve_metrics(self) -> None:
        loaded = loaded_after(
            "from twisted.internet import reactor\n"
            "from nova.agent.options import Options\n"
            "from nova.agent.tap import makeService\n"
            "options = Options(env={'NOVAC_SERVER': 's:1', 'NOVAC_TOKEN': 'x' * 16, 'NOVAC_TLS': 'off',"
            " 'NOVAC_HEALTH_PORT': '0'})\n"
            "options.parseOptions([])\n"
            "makeService(options)"
        )
        self.assertIn("prometheus_client", loaded)
        self.assertEqual(under(loaded, "nova.admin"), [])

    def test_the_options_do_not_import_the_check(self) -> None:
        # --check is dispatched by nova.agent.tap.makeService, not by the options.
        self.assertNotIn("nova.agent.check", loaded_after("import nova.agent.options"))
        self.assertNotIn("nova.agent.check", loaded_after("import nova.agent.tap"))

    def test_the_check_loads_neither_the_admin_page_nor_prometheus(self) -> None:
        loaded = loaded_after("import nova.agent.check")
        self.assertEqual(under(loaded, "nova.admin", "prometheus_client"), [])


class CheckDispatchTests(SynchronousTestCase):
    """C{--check} is read by the options and run by C{makeService}, instead of the service."""

    ENV = {"NOVAC_SERVER": "s:1", "NOVAC_TOKEN": "x" * 16, "NOVAC_TLS": "off"}

    def test_parsing_check_runs_nothing(self) -> None:
        from nova.agent.options import Options

        options = Options(env=self.ENV)
        options.parseOptions(["--check"])  # before, postOptions ran the check and exited here
        self.assertTrue(options["check"])

    def test_make_service_runs_the_check_instead_of_the_service(self) -> None:
        from nova.agent import check, tap
        from nova.agent.options import Options

        ran: list[object] = []

        class Ran(Exception):
            pass

        def run(config: object) -> None:
            ran.append(config)
            raise Ran()  # the real one exits the process with the check's status

        self.patch(check, "run", run)
        options = Options(env=self.ENV)
        options.parseOptions(["--check"])
        self.assertRaises(Ran, tap.makeService, options)
        self.assertEqual(ran, [options.config])
