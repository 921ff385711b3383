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
    "nova.rules.routes",
    "nova.wire.socks5",
    "nova.rules.destinations",
    "nova.agent.events",
)
"""Cores that do no I/O: they load no Twisted at all."""

PURE_PACKAGES = ("nova.wire", "nova.mux", "nova.rules")
"""The folders whose every module is a pure core (nova/__init__.py says so)."""

# Not the standard library's socket or ssl: twisted.internet.defer and
# .interfaces, which the life-cycle machines use for Deferreds and the clock's
# type, import them without opening anything.
IO = (
    "sqlite3",
    "psycopg",
    "OpenSSL",
    "prometheus_client",
    "twisted.internet.reactor",
    "twisted.internet.tcp",
    "twisted.internet.ssl",
    "twisted.internet.endpoints",
    "twisted.web",
    "nova.transport",
    "nova.server",
    "nova.agent",
    "nova.admin",
    "nova.cluster",
    "nova.config",
)
"""What a pure core must not load: sockets, processes, databases, TLS, the reactor, HTTP, the adapters."""


def modules_of(package: str) -> list[str]:
    """Every module of C{package}, found on disk (a new module is checked without being listed)."""
    import importlib
    import pkgutil

    found = importlib.import_module(package)
    return [package, *(f"{package}.{m.name}" for m in pkgutil.iter_modules(found.__path__))]


class LayerTests(SynchronousTestCase):
    def test_routes_do_not_import_the_command_line(self) -> None:
        loaded = loaded_after("import nova.rules.routes")
        self.assertEqual(under(loaded, "nova.config", "nova.server.options", "twisted.python.usage"), [])

    def test_the_pure_cores_load_no_twisted(self) -> None:
        for module in PURE:
            self.assertEqual(under(loaded_after(f"import {module}"), "twisted"), [], module)

    def test_the_pure_folders_do_no_io(self) -> None:
        # Every module of nova/wire, nova/mux and nova/rules, and the two pure
        # top-level modules, each in a fresh interpreter.
        modules = [m for p in PURE_PACKAGES for m in modules_of(p)] + ["nova.values", "nova.errors"]
        self.assertGreater(len(modules), 20)
        for module in modules:
            self.assertEqual(under(loaded_after(f"import {module}"), *IO), [], module)

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
