"""
Metrics on both sides (docs/metrics.md): NOVAC's registry and its hooks,
NOVAS's bounded route and agent labels, who may read /metrics, and the
shipped alert rules and dashboard checked against what the code exports.

The unit tests drive the code in memory (the tunnel harness of
L{tests.test_tunnel}, a Clock); the integration tests run NOVAS and NOVAC
on loopback and check real /metrics output with Debian's C{promtool}.

The tests that start processes or open real sockets are in
tests/test_metrics_integration.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from nova.admin.audit import Audit
from nova.admin.metrics import NONE, OTHER, AgentLabels, Metrics
from nova.agent.metrics import RECONNECT_REASONS, AgentMetrics
from nova.agent.options import Options as AgentOptions
from nova.agent.tunnel import AgentContext
from nova.config import resolve
from nova.prometheus import MetricsPage
from nova.rules.destinations import parse_policy
from nova.server.options import SETTINGS as SERVER_SETTINGS
from nova.server.options import build_config as server_config
from nova.wire.errors import ErrorCode

from .test_tunnel import Harness

ROOT = Path(__file__).parent.parent
ALERTS = ROOT / "etc" / "prometheus" / "nova-alerts.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "nova-dashboard.json"
SERVER = "novas.test:9022"  # the harness's server label
METADATA = "169.254.169.254"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample C{name} with exactly C{labels}; 0 when absent."""
    return registry.get_sample_value(name, labels) or 0.0


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {s.labels[label] for m in registry.collect() for s in m.samples if label in s.labels}


# --- NOVAS: bounded agent labels ---------------------------------------------


class AgentLabelTests(SynchronousTestCase):
    def test_first_names_up_to_the_limit_get_their_own_value_the_rest_share_other(self) -> None:
        labels = AgentLabels(2)
        for name in ("a", "b", "c"):
            labels.acquire(name)
        self.assertEqual([labels(n) for n in ("a", "b", "c", "")], ["a", "b", OTHER, NONE])

    def test_a_value_is_freed_when_the_last_tunnel_under_the_name_goes(self) -> None:
        labels = AgentLabels(1)
        labels.acquire("a")
        labels.acquire("a")  # a newer tunnel under the same name, before the old one is gone
        self.assertFalse(labels.release("a"))
        self.assertEqual(labels("a"), "a")
        self.assertTrue(labels.release("a"))
        self.assertEqual(labels("a"), OTHER)
        labels.acquire("b")
        self.assertEqual(labels("b"), "b")

    def test_values_that_cannot_be_agent_names(self) -> None:
        from nova.wire.handshake import name_problem

        self.assertIsNotNone(name_problem(OTHER))
        self.assertIsNotNone(name_problem(NONE))

    @settings(max_examples=200, deadline=None)
    @given(
        limit=st.integers(0, 5),
        events=st.lists(st.tuples(st.booleans(), st.sampled_from("abcdefgh")), max_size=60),
    )
    def test_never_more_values_than_the_limit(self, limit: int, events: list[tuple[bool, str]]) -> None:
        labels = AgentLabels(limit)
        live: dict[str, int] = {}
        for register, name in events:
            if register:
                labels.acquire(name)
                live[name] = live.get(name, 0) + 1
            elif live.get(name):
                labels.release(name)
                live[name] -= 1
            values = {labels(n) for n in "abcdefgh"} - {OTHER}
            self.assertLessEqual(len(values), limit)
            self.assertTrue(all(live.get(v) for v in values), (values, live))


class ServerLabelTests(SynchronousTestCase):
    """Streams through L{Audit}, as the route and SOCKS entries report them."""

    def traffic(self, audit: Audit, agents: list[str], route: str, entry: str) -> None:
        for name in agents:
            audit.stream_opened(name, entry, "127.0.0.1:1", "db:5432", 0.01, route)
            audit.stream_closed(name, entry, "127.0.0.1:1", "db:5432", 10, 20, 1.0, "done", route)
            audit.open_failed(name, entry, "127.0.0.1:1", "db:5432", "refused", "no", route)
            audit.rtt(name, 0.002)

    def test_route_and_agent_labels(self) -> None:
        audit = Audit(metrics=Metrics(10))
        audit.registered("db-agent")
        self.traffic(audit, ["db-agent"], "127.0.0.1:5432:db:5432", "route 127.0.0.1:5432")
        r = audit.metrics.registry
        labels = {"entry": "route", "route": "127.0.0.1:5432:db:5432", "agent": "db-agent"}
        self.assertEqual(value(r, "nova_streams_opened_total", **labels), 1)
        labels = {"route": "127.0.0.1:5432:db:5432", "agent": "db-agent"}
        self.assertEqual(value(r, "nova_stream_bytes_total", direction="up", **labels), 10)
        self.assertEqual(value(r, "nova_stream_bytes_total", direction="down", **labels), 20)
        self.assertEqual(value(r, "nova_streams_failed_total", reason="refused", **labels), 1)
        self.assertEqual(value(r, "nova_keepalive_rtt_seconds", agent="db-agent"), 0.002)

    def test_an_agent_back_under_its_name_counts_from_zero_in_the_exported_series(self) -> None:
        """Series are looked up once and kept: a dropped one must not keep counting where no scrape sees it."""
        audit = Audit(metrics=Metrics(10))
        route, entry = "127.0.0.1:5432:db:5432", "route 127.0.0.1:5432"
        labels = {"entry": "route", "route": route, "agent": "db-agent"}
        r = audit.metrics.registry
        for _ in range(2):
            audit.registered("db-agent")
            self.traffic(audit, ["db-agent", "db-agent"], route, entry)
            self.assertEqual(value(r, "nova_streams_opened_total", **labels), 2)
            self.assertEqual(value(r, "nova_stream_bytes_total", direction="down", route=route, agent="db-agent"), 40)
            audit.unregistered("db-agent", "gone", 1.0)
            self.assertNotIn("db-agent", label_values(r, "agent"))

    def test_socks_streams_carry_neither_the_selector_nor_the_target(self) -> None:
        audit = Audit(metrics=Metrics(10))
        audit.registered("db-agent")
        self.traffic(audit, ["db-agent"], "", "socks name:db-agent")
        audit.open_failed("", "socks env=evil-user-chosen", "127.0.0.1:1", "x:1", "no_agent", "none")
        self.assertEqual(label_values(audit.metrics.registry, "route"), {"socks"})
        r = audit.metrics.registry
        self.assertEqual(value(r, "nova_streams_failed_total", reason="no_agent", route="socks", agent=NONE), 1)

    def test_a_thousand_agent_names_make_at_most_the_bound_of_series(self) -> None:
        """
        The bound, stated in docs/metrics.md: per counter, at most
        NOVAS_METRICS_AGENTS + 2 agent values ((other), (none)) times the
        routes + 1 (socks); names past the bound share (other), and a gone
        agent's series are dropped.
        """
        audit = Audit(metrics=Metrics(5))
        names = [f"pod-{i}" for i in range(1000)]
        for name in names:
            audit.registered(name)
        routes = ["127.0.0.1:1:a:1", "127.0.0.1:2:b:2"]
        for route in routes:
            self.traffic(audit, names, route, "route x")
        self.traffic(audit, names, "", "socks any")
        r = audit.metrics.registry
        self.assertEqual(label_values(r, "agent"), {*names[:5], OTHER})
        self.assertEqual(label_values(r, "route"), {*routes, "socks"})
        other = {"route": routes[0], "agent": OTHER}
        self.assertEqual(value(r, "nova_streams_opened_total", entry="route", **other), 995)
        self.assertEqual(value(r, "nova_stream_bytes_total", direction="up", **other), 9950)
        # The first five rollout's pods go: their series go with them, and the next names take the values.
        for name in names[:5]:
            audit.unregistered(name, "gone", 1.0)
        self.assertEqual(label_values(r, "agent"), {OTHER})
        for name in names[1000 - 3 :]:
            audit.unregistered(name, "gone", 1.0)
            audit.registered(name)
        self.traffic(audit, names[1000 - 3 :], routes[0], "route x")
        self.assertEqual(label_values(r, "agent"), {*names[1000 - 3 :], OTHER})


class RouteAgentsTests(SynchronousTestCase):
    def test_routes_with_their_matching_agents_at_scrape_time(self) -> None:
        metrics = Metrics()
        counts = [("r1", 2), ("r2", 0)]
        metrics.watch_routes(lambda: counts)
        self.assertEqual(value(metrics.registry, "nova_route_agents", route="r2"), 0)
        counts[1] = ("r2", 1)
        self.assertEqual(value(metrics.registry, "nova_route_agents", route="r2"), 1)

    def test_both_registries_carry_build_info_and_the_process_collector(self) -> None:
        for registry, component in ((Metrics().registry, "novas"), (AgentMetrics().registry, "novac")):
            from nova import __version__

            self.assertEqual(value(registry, "nova_build_info", version=__version__, component=component), 1)
            self.assertGreater(value(registry, "process_resident_memory_bytes"), 0)
            self.assertGreater(value(registry, "process_open_fds"), 0)
            self.assertIsNotNone(registry.get_sample_value("process_cpu_seconds_total"))


# --- NOVAC: the hooks in the tunnel -------------------------------------------


def agent_registry(context: AgentContext) -> CollectorRegistry:
    """The Prometheus registry of an agent context the harness built with AgentMetrics."""
    metrics = context.metrics
    assert isinstance(metrics, AgentMetrics)
    return metrics.registry


class AgentHookTests(SynchronousTestCase):
    """Each NOVAC event, in memory through the harness's TLS tunnel, moves its metric."""

    def test_streams_opened_bytes_and_latency(self) -> None:
        h = Harness()
        r = agent_registry(h.agent_context)
        self.assertEqual(value(r, "nova_agent_tunnel_up", server=SERVER), 1)
        stream, recorder, _, target_protocol = h.open("db.internal", 5432)
        stream.write(b"12345")
        h.flush()
        target_protocol.dataReceived(b"abc")
        h.flush()
        self.assertEqual(recorder.received, b"abc")
        self.assertEqual(value(r, "nova_agent_streams_opened_total", server=SERVER), 1)
        self.assertEqual(value(r, "nova_agent_stream_open_seconds_count", server=SERVER), 1)
        stream.loseConnection()
        target_protocol.connectionLost(Failure(error.ConnectionDone()))
        h.flush()
        self.assertEqual(value(r, "nova_agent_stream_bytes_total", server=SERVER, direction="up"), 5)
        self.assertEqual(value(r, "nova_agent_stream_bytes_total", server=SERVER, direction="down"), 3)

    def test_denied_and_refused_targets(self) -> None:
        h = Harness()
        h.agent_context.policy = parse_policy("127.0.0.1/32:5432")
        h.refuse[("127.0.0.1", 5432)] = error.ConnectionRefusedError()
        h.open(METADATA, 80)  # decided by the policy in memory: nothing is dialled
        h.open("127.0.0.1", 6379)
        h.open("127.0.0.1", 5432)
        self.assertEqual(h.targets, [])
        r = agent_registry(h.agent_context)
        self.assertEqual(value(r, "nova_agent_policy_denials_total", server=SERVER), 2)
        self.assertEqual(value(r, "nova_agent_streams_failed_total", server=SERVER, reason="denied"), 2)
        self.assertEqual(value(r, "nova_agent_streams_failed_total", server=SERVER, reason="refused"), 1)
        self.assertEqual(value(r, "nova_agent_streams_opened_total", server=SERVER), 0)

    def test_a_server_restart_counts_one_server_shutdown_reconnect(self) -> None:
        h = Harness()
        r = agent_registry(h.agent_context)
        h.server.drain(5.0, ErrorCode.SHUTDOWN, "server shutting down")
        h.flush()
        h.clock.advance(6)
        h.flush()
        self.assertTrue(h.agent.closed)
        self.assertEqual(value(r, "nova_agent_tunnel_up", server=SERVER), 0)
        self.assertEqual(value(r, "nova_agent_reconnects_total", server=SERVER, reason="server_shutdown"), 1)
        self.assertEqual(
            sum(value(r, "nova_agent_reconnects_total", server=SERVER, reason=x) for x in RECONNECT_REASONS), 1
        )

    def test_a_rejected_registration(self) -> None:
        h = Harness(agent_token=b"not the right token at all")
        r = agent_registry(h.agent_context)
        self.assertEqual(value(r, "nova_agent_reconnects_total", server=SERVER, reason="rejected"), 1)
        self.assertEqual(value(r, "nova_agent_tunnel_up", server=SERVER), 0)

    def test_a_lost_tunnel_and_an_agent_stopping(self) -> None:
        lost = Harness()
        lost.server.transport.abortConnection()  # type: ignore[union-attr]
        lost.flush()
        r = agent_registry(lost.agent_context)
        self.assertEqual(value(r, "nova_agent_reconnects_total", server=SERVER, reason="lost"), 1)
        stopping = Harness()
        stopping.agent.drain(1.0)
        stopping.flush()
        stopping.clock.advance(2)
        stopping.flush()
        r = agent_registry(stopping.agent_context)
        self.assertTrue(stopping.agent.closed)
        self.assertEqual(value(r, "nova_agent_tunnel_up", server=SERVER), 0)
        self.assertEqual(
            sum(value(r, "nova_agent_reconnects_total", server=SERVER, reason=x) for x in RECONNECT_REASONS), 0
        )

    def test_reasons_are_a_fixed_set(self) -> None:
        m = AgentMetrics()
        m.tunnel_ended("s", registered=True, stopping=False, ended_by=None)
        m.tunnel_ended("s", registered=False, stopping=False, ended_by=None)
        m.tunnel_ended("s", registered=False, stopping=False, ended_by="rejected")
        m.tunnel_ended("s", registered=True, stopping=True, ended_by=None)
        self.assertEqual(label_values(m.registry, "reason"), {"lost", "handshake_failed", "rejected"})
        self.assertLessEqual(label_values(m.registry, "reason"), set(RECONNECT_REASONS))


# --- Who may read /metrics ------------------------------------------------------


def render(page: MetricsPage, method: bytes = b"GET", token: str | None = None) -> tuple[int, bytes]:
    request = DummyRequest([b""])
    request.method = method
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    body = page.render(request)  # type: ignore[arg-type]
    return request.responseCode or 200, body


class MetricsPageTests(SynchronousTestCase):
    def test_novas_takes_the_admin_or_the_metrics_token(self) -> None:
        page = MetricsPage(Metrics().registry, (b"admin-token-123", b"metrics-token-123"), "X")
        self.assertEqual(render(page)[0], 401)
        self.assertEqual(render(page, token="wrong-token-123")[0], 401)
        for token in ("admin-token-123", "metrics-token-123"):
            status, body = render(page, token=token)
            self.assertEqual(status, 200)
            self.assertIn(b"nova_build_info", body)
        self.assertEqual(render(page, b"POST", "metrics-token-123")[0], 405)
        self.assertEqual(render(page, b"POST")[0], 401)  # the credential first: nothing said to strangers

    def test_novas_without_any_token_serves_no_metrics(self) -> None:
        status, body = render(MetricsPage(Metrics().registry, (), "NOVAS_METRICS_TOKEN or NOVAS_ADMIN_TOKEN"))
        self.assertEqual(status, 403)
        self.assertIn(b"NOVAS_METRICS_TOKEN", body)
        self.assertNotIn(b"nova_", body.replace(b"NOVAS_", b""))

    def test_novac_asks_no_credential(self) -> None:
        status, body = render(MetricsPage(AgentMetrics().registry, None))
        self.assertEqual(status, 200)
        self.assertIn(b"nova_agent_tunnel_up", body)


class NovasAdminPortTests(SynchronousTestCase):
    """The admin port NOVAS builds: which tokens its /metrics takes, and its routes' agent counts."""

    def admin_metrics(self, **env: str) -> MetricsPage:
        from twisted.internet.testing import MemoryReactorClock

        from nova.server.tap import NovasService

        state = {"NOVAS_STATE_DIR": self.mktemp(), "NOVAS_TLS": "off", "NOVAS_ROUTES": "1:db:5432@env=prod"}
        service = NovasService(server_settings(**state, **env), MemoryReactorClock())
        assert service.admin_listener is not None
        root = service.admin_listener.factory.resource  # type: ignore[attr-defined]
        page = root.getChildWithDefault(b"metrics", DummyRequest([b"metrics"]))
        self.assertIsInstance(page, MetricsPage)
        return cast(MetricsPage, page)

    def test_the_metrics_token_alone(self) -> None:
        page = self.admin_metrics(NOVAS_ADMIN_TOKEN="", NOVAS_METRICS_TOKEN="metrics-token-123")
        self.assertEqual(render(page, token="metrics-token-123")[0], 200)
        self.assertEqual(render(page, token="admin-token-123")[0], 401)

    def test_both_tokens(self) -> None:
        page = self.admin_metrics(NOVAS_METRICS_TOKEN="metrics-token-123")
        self.assertEqual(render(page, token="metrics-token-123")[0], 200)
        status, body = render(page, token="admin-token-123")
        self.assertEqual(status, 200)
        self.assertIn(b'nova_route_agents{route="127.0.0.1:1:db:5432@env=prod"} 0.0', body)

    def test_no_token(self) -> None:
        page = self.admin_metrics(NOVAS_ADMIN_TOKEN="")
        self.assertEqual(render(page, token="admin-token-123")[0], 403)


# --- Settings -------------------------------------------------------------------


def server_settings(**env: str) -> Any:
    base = {"NOVAS_AGENT_TOKEN": "x" * 16, "NOVAS_ADMIN_TOKEN": "admin-token-123"}
    return server_config(resolve(SERVER_SETTINGS, {}, base | env))


class SettingsTests(SynchronousTestCase):
    def test_metrics_token_and_agent_bound(self) -> None:
        config = server_settings(NOVAS_METRICS_TOKEN="metrics-token-123", NOVAS_METRICS_AGENTS="7")
        self.assertEqual((config.metrics_token, config.metrics_agents), (b"metrics-token-123", 7))
        self.assertNotIn("metrics-token-123", repr(config))
        self.assertEqual(server_settings().metrics_agents, 100)

    def test_bad_settings_are_refused_naming_the_setting(self) -> None:
        from nova.config import ConfigError

        cases = {
            "--metrics-token / NOVAS_METRICS_TOKEN must be at least 8": {"NOVAS_METRICS_TOKEN": "short"},
            "--metrics-token / NOVAS_METRICS_TOKEN must differ from --admin-token": {
                "NOVAS_METRICS_TOKEN": "admin-token-123"
            },
            "--metrics-agents / NOVAS_METRICS_AGENTS must be": {"NOVAS_METRICS_AGENTS": "100001"},
        }
        for expected, env in cases.items():
            with self.assertRaises(ConfigError) as caught:
                server_settings(**env)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("admin-token-123", str(caught.exception))

    def test_novac_metrics_on_by_default_off_by_setting(self) -> None:
        base = {"NOVAC_SERVER": "s:1", "NOVAC_TOKEN": "x" * 16, "NOVAC_TLS": "off"}
        for env, expected in (({}, True), ({"NOVAC_METRICS": "off"}, False), ({"NOVAC_METRICS": "on"}, True)):
            options = AgentOptions(env=base | env)
            options.parseOptions([])
            self.assertEqual(options.config.metrics, expected, env)
        options = AgentOptions(env=base)
        options.parseOptions(["--no-metrics"])
        self.assertFalse(options.config.metrics)
        with self.assertRaises(SystemExit) as caught:
            AgentOptions(env=base | {"NOVAC_METRICS": "maybe"}).parseOptions([])
        self.assertIn("NOVAC_METRICS must be on or off", str(caught.exception))


# --- The shipped alert rules and dashboard --------------------------------------

NAME = re.compile(r"\bnova_[a-z0-9_]+\b")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def used_names(expressions: list[str]) -> set[str]:
    return {name for e in expressions for name in NAME.findall(e)}


def test_the_dashboard_is_grafana_json_with_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert len(used_names(dashboard_expressions())) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- Real processes -------------------------------------------------------------
