"""
Metrics of real processes: NOVAS and NOVAC on loopback under real traffic,
real /metrics output, and the shipped alert rules and scrape config checked
with Debian's C{promtool}.  The in-memory half is tests/test_metrics.py.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nova.admin.metrics import NONE, OTHER
from nova.rules.routes import parse_route
from nova.wire.errors import OpenFailReason
from nova.wire.frames import Open, OpenFail, Ping, Pong, Welcome

from .processes import ADMIN_TOKEN, TOKEN, echo_roundtrip, free_port, novac, novas, target, wait_for
from .rawagent import RawAgent
from .test_metrics import ALERTS, ROOT, dashboard_expressions, used_names

pytestmark = pytest.mark.integration

METRICS_TOKEN = "integration-metrics-token-7c4e"


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exported_names(text: str) -> set[str]:
    """Every series name an exposition offers, samples or not (a labelled counter with no child yet has none)."""
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = match.groups()
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def scrape(port: int, token: str | None = None, path: str = "/metrics") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called C{name} that carry C{labels}."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "test.sh installs Debian's prometheus package (promtool)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def closed_at_once(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        return s.recv(1) == b""


def test_metrics_on_both_sides_under_real_traffic(tmp_path: Path) -> None:
    """
    NOVAS and NOVAC on loopback: a stream through a route, a target NOVAC's
    policy denies (a loopback port that listens), a route no agent serves,
    and NOVAS restarting.  Both /metrics pass promtool, move with the
    traffic, and export every name the alert rules and dashboard use.
    """
    ok_route, denied_route, dead_route = free_port(), free_port(), free_port()
    agent_port, admin_port, health = free_port(), free_port(), free_port()
    with socket.create_server(("127.0.0.1", 0)) as denied_listener, target("echo") as echo:
        denied = denied_listener.getsockname()[1]
        routes = [f"{ok_route}:127.0.0.1:{echo}", f"{denied_route}:127.0.0.1:{denied}", f"{dead_route}:db:1@env=none"]
        server_env = {
            "NOVAS_TLS": "off",
            "NOVAS_AGENT_PORT": str(agent_port),
            "NOVAS_ADMIN_PORT": str(admin_port),
            "NOVAS_METRICS_TOKEN": METRICS_TOKEN,
            "NOVAS_KEEPALIVE": "1",
        }
        agent_env = {
            "NOVAC_SERVER": f"127.0.0.1:{agent_port}",
            "NOVAC_TLS": "off",
            "NOVAC_HEALTH_PORT": str(health),
            "NOVAC_HEALTH_BIND": "127.0.0.1",
            "NOVAC_ALLOW": f"127.0.0.1:{echo}",
            "NOVAC_RECONNECT_INITIAL": "0.2",
            "NOVAC_RECONNECT_MAX": "1",
        }
        server_label = f"127.0.0.1:{agent_port}"
        with novac(tmp_path, agent_env) as agent:
            with novas(tmp_path, routes, server_env) as (server, _):
                server.wait_log("agent agent-1 registered")
                payload = b"x" * 100_000
                assert echo_roundtrip(ok_route, payload) == payload
                assert closed_at_once(denied_route) and closed_at_once(dead_route)
                wait_for(lambda: sample(scrape(health)[1], "nova_agent_policy_denials_total") == 1, 10, "the denial")
                wait_for(lambda: sample(scrape(health)[1], "nova_agent_stream_bytes_total") >= 2 * len(payload), 10)
                wait_for(lambda: sample(scrape(admin_port, METRICS_TOKEN)[1], "nova_keepalive_rtt_seconds") > 0, 10)
                # Who may read NOVAS's /metrics: the metrics token opens /metrics and nothing else.
                assert scrape(admin_port)[0] == 401
                assert scrape(admin_port, "wrong-token-12345")[0] == 401
                assert scrape(admin_port, ADMIN_TOKEN)[0] == 200
                assert scrape(admin_port, METRICS_TOKEN, "/api/v1/tunnels")[0] == 401
                status, novas_text = scrape(admin_port, METRICS_TOKEN)
                assert status == 200
            # NOVAS is gone (GOAWAY SHUTDOWN on SIGTERM); the same server comes back.
            wait_for(lambda: sample(scrape(health)[1], "nova_agent_tunnel_up", server=server_label) == 0, 10)
            with novas(tmp_path, routes, server_env) as (again, _):
                again.wait_log("agent agent-1 registered")
                wait_for(lambda: sample(scrape(health)[1], "nova_agent_tunnel_up", server=server_label) == 1, 10)
                novac_text = scrape(health)[1]
            assert agent.proc.poll() is None
    # NOVAC's metrics moved with the traffic.
    assert sample(novac_text, "nova_agent_streams_opened_total", server=server_label) == 1
    assert sample(novac_text, "nova_agent_stream_bytes_total", server=server_label, direction="up") == len(payload)
    assert sample(novac_text, "nova_agent_stream_bytes_total", server=server_label, direction="down") == len(payload)
    assert sample(novac_text, "nova_agent_stream_open_seconds_count", server=server_label) == 1
    assert sample(novac_text, "nova_agent_streams_failed_total", server=server_label, reason="denied") == 1
    assert sample(novac_text, "nova_agent_policy_denials_total", server=server_label) == 1
    assert sample(novac_text, "nova_agent_reconnects_total", server=server_label, reason="server_shutdown") == 1
    # NOVAS's, by route and agent.
    ok, denied_r, dead = (str(parse_route(r)) for r in routes)
    assert sample(novas_text, "nova_streams_opened_total", route=ok, agent="agent-1", entry="route") == 1
    assert sample(novas_text, "nova_stream_bytes_total", route=ok, agent="agent-1", direction="up") == len(payload)
    assert sample(novas_text, "nova_streams_failed_total", route=denied_r, agent="agent-1", reason="denied") == 1
    assert sample(novas_text, "nova_streams_failed_total", route=dead, agent=NONE, reason="no_agent") == 1
    assert sample(novas_text, "nova_route_agents", route=ok) == 1
    assert sample(novas_text, "nova_route_agents", route=dead) == 0
    for text in (novas_text, novac_text):
        promtool_check_metrics(text)
        assert sample(text, "process_resident_memory_bytes") > 0 and sample(text, "process_open_fds") > 0
        assert sample(text, "nova_build_info") == 1
    # Every name the alert rules and the dashboard use is one the code exports.
    exported = exported_names(novas_text) | exported_names(novac_text)
    assert "nova_no_such_metric" not in exported
    for what, expressions in (("alert rules", alert_expressions()), ("dashboard", dashboard_expressions())):
        missing = used_names(expressions) - exported
        assert not missing, f"the {what} use names neither NOVAS nor NOVAC exports: {sorted(missing)}"
    for path in tmp_path.glob("*.log"):
        assert METRICS_TOKEN not in path.read_text() and ADMIN_TOKEN not in path.read_text()


def test_novac_metrics_off_leaves_the_probe_port_to_the_probes(tmp_path: Path) -> None:
    health = free_port()
    env = {
        "NOVAC_SERVER": f"127.0.0.1:{free_port()}",  # nothing listens
        "NOVAC_TLS": "off",
        "NOVAC_HEALTH_PORT": str(health),
        "NOVAC_HEALTH_BIND": "127.0.0.1",
        "NOVAC_METRICS": "off",
    }
    with novac(tmp_path, env) as agent:
        agent.wait_log("health probes on 127.0.0.1")
        assert "(/healthz, /readyz)" in agent.text()
        wait_for(lambda: scrape(health, path="/healthz")[0] == 200, 10, "the probe port")
        assert scrape(health)[0] == 404


class _RefusingAgent(threading.Thread):
    """A hand-driven agent: answers every PING, refuses every OPEN (REFUSED), until told to stop."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.raw = RawAgent(port, tls=False)
        welcome = self.raw.register(TOKEN.encode(), name, (("role", "raw"),))
        assert isinstance(welcome, Welcome), welcome
        self.stopping = threading.Event()
        self.opens = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                frame = self.raw.next_frame(0.2)
            except (TimeoutError, OSError):
                continue
            if frame is None:
                return
            if isinstance(frame, Ping):
                self.raw.send_frame(Pong(frame.opaque))
            elif isinstance(frame, Open):
                self.opens += 1
                self.raw.send_frame(OpenFail(frame.stream_id, OpenFailReason.REFUSED, "no"))

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.raw.close()


def agent_values(text: str) -> set[str]:
    return {s.labels["agent"] for f in text_string_to_metric_families(text) for s in f.samples if "agent" in s.labels}


def test_many_agent_names_stay_within_the_label_bound(tmp_path: Path) -> None:
    """
    Twenty agents under names of their own (a rollout's worth of pods), a
    bound of 3: NOVAS's /metrics carries at most 3 agent names (plus
    (other) and (none)) whatever they do, drops a name's series when it
    goes, and the real agent's route keeps working throughout.
    """
    raw_route, ok_route, agent_port, admin_port = free_port(), free_port(), free_port(), free_port()
    bound = 3
    with target("echo") as echo:
        routes = [f"{raw_route}:db.internal:5432@role=raw", f"{ok_route}:127.0.0.1:{echo}@role=real"]
        env = {
            "NOVAS_TLS": "off",
            "NOVAS_AGENT_PORT": str(agent_port),
            "NOVAS_ADMIN_PORT": str(admin_port),
            "NOVAS_METRICS_AGENTS": str(bound),
            "NOVAS_KEEPALIVE": "1",
        }
        agent_env = {"NOVAC_SERVER": f"127.0.0.1:{agent_port}", "NOVAC_TLS": "off", "NOVAC_TAGS": "role=real"}
        with novas(tmp_path, routes, env) as (server, _), novac(tmp_path, agent_env):
            server.wait_log("agent agent-1 registered")
            raw = [_RefusingAgent(agent_port, f"pod-{i:02}") for i in range(20)]
            try:
                for agent in raw:
                    agent.start()
                for _ in range(40):
                    assert closed_at_once(raw_route)
                    assert echo_roundtrip(ok_route, b"still here") == b"still here"

                def refused() -> float:
                    return sample(scrape(admin_port, ADMIN_TOKEN)[1], "nova_streams_failed_total", reason="refused")

                wait_for(lambda: refused() == 40, 10, "40 refusals counted")
                wait_for(lambda: sample(scrape(admin_port, ADMIN_TOKEN)[1], "nova_keepalive_rtt_seconds") > 0, 10)
                text = scrape(admin_port, ADMIN_TOKEN)[1]
                names = agent_values(text) - {OTHER, NONE}
                assert len(names) <= bound and "agent-1" in names, names
                assert OTHER in agent_values(text)
                rtt_names = {s.labels["agent"] for f in text_string_to_metric_families(text) for s in f.samples
                             if s.name == "nova_keepalive_rtt_seconds"}  # fmt: skip
                assert rtt_names <= names
                assert sum(a.opens for a in raw) == 40
            finally:
                for agent in raw:
                    agent.stop()
            # The pods are gone: their names' series go with them; the real agent's stay.
            wait_for(lambda: agent_values(scrape(admin_port, ADMIN_TOKEN)[1]) - {OTHER, NONE} == {"agent-1"}, 10)
            assert refused() >= sample(text, "nova_streams_failed_total", reason="refused", agent=OTHER) > 0
            assert echo_roundtrip(ok_route, b"still here") == b"still here"


def test_the_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "test.sh installs Debian's prometheus package (promtool)"
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    rules = yaml.safe_load(ALERTS.read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    for required in ("NovaAgentDown", "NovaNoAgentForRoute", "NovaAuthFailuresRising", "NovaAuditDropped"):
        assert required in names


def test_the_documented_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """docs/metrics.md's prometheus.yml, with its paths pointed at this checkout."""
    promtool = shutil.which("promtool")
    assert promtool, "test.sh installs Debian's prometheus package (promtool)"
    found = re.search(r"```yaml\n(# prometheus.yml.*?)```", (ROOT / "docs" / "metrics.md").read_text(), re.S)
    assert found, "docs/metrics.md shows a prometheus.yml"
    (tmp_path / "token").write_text("x")
    config = found.group(1).replace("/etc/prometheus/rules/nova-alerts.yml", str(ALERTS))
    config = config.replace("/etc/prometheus/nova-metrics-token", str(tmp_path / "token"))
    assert config != found.group(1)
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
