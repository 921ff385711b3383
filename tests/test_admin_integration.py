"""
The admin interface with real processes: the API, audit history, metrics and
probes of a running NOVAS, the audit history shared in PostgreSQL by two
servers, the page in a real browser, NOVAC's probes.  The in-memory half is
tests/test_admin.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nova.rules.admission import token_id

from .processes import (
    ADMIN_TOKEN,
    TOKEN,
    Proc,
    echo_roundtrip,
    fingerprint,
    free_port,
    novac,
    novas,
    postgres_server,
    target,
    wait_for,
)
from .test_admin import get

pytestmark = pytest.mark.integration


def api(port: int, path: str) -> Any:
    status, body, _ = get(port, path)
    assert status == 200, (status, body)
    return json.loads(body)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_api_history_metrics_and_probes(tmp_path: Path) -> None:
    route, dead_route = free_port(), free_port()
    routes = [f"{route}:127.0.0.1:{{echo}}", f"{dead_route}:127.0.0.1:9@env=nowhere"]
    quick_pings = {"NOVAS_KEEPALIVE": "1", "NOVAS_DEAD_TIMEOUT": "10"}  # an RTT to show within a second or two
    with (
        target("echo") as echo,
        novas(tmp_path, [r.format(echo=echo) for r in routes], quick_pings) as (server, port),
    ):
        admin = server.admin_port
        with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server),
                              "NOVAC_TAGS": "env=prod;team=db"}):  # fmt: skip
            server.wait_log("agent agent-1 registered")
            # Authorization.
            for token in (None, "wrong-token-123"):
                status, body, headers = get(admin, "/api/v1/tunnels", token)
                assert status == 401 and b"agent-1" not in body
                assert headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert get(admin, "/metrics", None)[0] == 401
            assert get(admin, "/healthz", None)[0] == 200
            assert get(admin, "/readyz", None)[0] == 200
            # Traffic: one good stream, one that finds no agent.
            payload = os.urandom(300_000)
            assert echo_roundtrip(route, payload) == payload
            with socket.create_connection(("127.0.0.1", dead_route), timeout=10) as s:
                assert s.recv(1) == b""
            [tunnel] = api(admin, "/api/v1/tunnels")["tunnels"]
            assert tunnel["name"] == "agent-1"
            assert tunnel["tags"] == {"env": "prod", "team": "db"}
            assert tunnel["status"] == "connected" and tunnel["tls"] == "TLSv1.3"
            assert tunnel["agent_version"] and tunnel["protocol_version"] == 1
            assert tunnel["bytes_to_agent"] >= len(payload) and tunnel["bytes_from_agent"] >= len(payload)
            assert tunnel["token_id"] == token_id(TOKEN.encode()) and TOKEN not in json.dumps(tunnel)
            wait_for(lambda: api(admin, "/api/v1/tunnels")["tunnels"][0]["rtt_ms"] is not None, 10, "an RTT")

            def kinds() -> set[str]:
                return {e["kind"] for e in api(admin, "/api/v1/events?limit=100")["events"]}

            wait_for(lambda: {"tunnel_registered", "stream_opened", "stream_closed", "open_failed"} <= kinds(), 10)
            [closed] = api(admin, "/api/v1/events?kind=stream_closed&agent=agent-1")["events"]
            assert closed["bytes_up"] == len(payload) and closed["bytes_down"] == len(payload)
            assert closed["target"] == f"127.0.0.1:{echo}" and closed["entry"] == f"route 127.0.0.1:{route}"
            assert closed["requester"].startswith("127.0.0.1:") and closed["reason"] == "done"
            [failed] = api(admin, "/api/v1/events?kind=open_failed")["events"]
            assert failed["reason"] == "no_agent"
            page = api(admin, "/api/v1/events?limit=1&offset=1")
            everything = api(admin, "/api/v1/events?limit=1000")
            assert page["total"] == everything["total"] and page["events"] == everything["events"][1:2]
            assert get(admin, "/api/v1/events?limit=abc")[0] == 400
            # Metrics parse and move.
            text = get(admin, "/metrics")[1].decode()
            before = metric(text, "nova_streams_opened_total", entry="route")
            assert before >= 1 and metric(text, "nova_tunnels_connected") == 1
            assert metric(text, "nova_streams_failed_total", reason="no_agent") == 1
            assert metric(text, "nova_stream_bytes_total", direction="up") >= len(payload)
            assert echo_roundtrip(route, b"again") == b"again"
            wait_for(lambda: metric(get(admin, "/metrics")[1].decode(), "nova_streams_opened_total", entry="route")
                     == before + 1, 10)  # fmt: skip
        wait_for(lambda: "tunnel_unregistered" in {e["kind"] for e in api(admin, "/api/v1/events")["events"]}, 10)
        total = api(admin, "/api/v1/events")["total"]
    # The history survives a restart.
    env = {
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_AGENT_PORT": str(free_port()),
        "NOVAS_STATE_DIR": str(tmp_path / "state"),
        "NOVAS_ADMIN_PORT": str(admin),
        "NOVAS_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    again = Proc("novas", [], env, tmp_path / "novas-again.log")
    try:
        again.wait_log("NOVAS listening")
        assert api(admin, "/api/v1/events")["total"] == total
    finally:
        again.stop()
    for path in tmp_path.glob("*.log"):
        assert TOKEN not in path.read_text() and ADMIN_TOKEN not in path.read_text()


@pytest.fixture
def postgres() -> Iterator[str]:
    """The address of a throwaway PostgreSQL server (L{tests.processes.postgres_server})."""
    with postgres_server() as (port, _):
        yield f"postgresql://nova@127.0.0.1:{port}/postgres"


def test_audit_in_postgresql_shared_by_two_servers(tmp_path: Path, postgres: str) -> None:
    import psycopg

    route1, route2 = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with target("echo") as echo:
        env = {"NOVAS_AUDIT_DB": postgres}
        with novas(tmp_path / "a", [f"{route1}:127.0.0.1:{echo}"], env) as (s1, p1):
            with novas(tmp_path / "b", [f"{route2}:127.0.0.1:{echo}"], env) as (s2, p2):
                with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{p1}", "NOVAC_TLS_FINGERPRINT": fingerprint(s1)},
                           name="agent-a"):  # fmt: skip
                    with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{p2}",
                                          "NOVAC_TLS_FINGERPRINT": fingerprint(s2)}, name="agent-b"):  # fmt: skip
                        s1.wait_log("agent agent-a registered")
                        s2.wait_log("agent agent-b registered")
                        assert echo_roundtrip(route1, b"one") == b"one"
                        assert echo_roundtrip(route2, b"two") == b"two"

                        def agents_in_history() -> set[str]:
                            events = api(s1.admin_port, "/api/v1/events?kind=stream_closed")["events"]
                            return {e["agent"] for e in events}

                        # Server one sees server two's streams: one shared history.
                        wait_for(lambda: agents_in_history() == {"agent-a", "agent-b"}, 15)
    with psycopg.connect(postgres) as conn:
        row = conn.execute("SELECT count(*) FROM nova_events WHERE kind = 'tunnel_registered'").fetchone()
        assert row is not None
        (n,) = row
        assert n == 2


def test_reverse_tunnels_page_in_a_real_browser(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, ".ci/run installs Debian's chromium"
    from playwright.sync_api import ConsoleMessage, expect, sync_playwright

    with novas(tmp_path, []) as (server, port):
        admin = server.admin_port
        # A tag value an agent chose that looks like markup: shown as text.
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server),
               "NOVAC_TAGS": "Env=Production;team=db;note=<i>x</i><script>alert(1)</script>"}  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run", "--disable-quic"],
            )  # fmt: skip
            try:
                page = browser.new_page()
                requests: list[str] = []
                page.on("request", lambda r: requests.append(r.url))
                console: list[str] = []

                def on_console(message: ConsoleMessage) -> None:
                    console.append(f"{message.type}: {message.text}")

                page.on("console", on_console)
                dialogs: list[str] = []

                def on_dialog(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", on_dialog)
                # Every CSP violation the page causes, as the browser reports it.
                page.add_init_script(
                    "window.cspViolations = [];"
                    "document.addEventListener('securitypolicyviolation',"
                    " (e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
                )
                response = page.goto(f"http://127.0.0.1:{admin}/")
                assert response is not None
                csp = response.headers["content-security-policy"]
                assert "'unsafe-inline'" not in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
                # Without the token the page asks for it and shows nothing.
                page.wait_for_selector("#login:not([hidden])")
                page.fill("#token", ADMIN_TOKEN)
                page.click("#login-form button")
                with novac(tmp_path, env, name="db-agent-0"):
                    server.wait_log("agent db-agent-0 registered")
                    expect(page.locator("#tunnels")).to_contain_text("db-agent-0", timeout=15000)
                    row = page.inner_text("#tunnels")
                    assert "Env=Production" in row and "team=db" in row and "connected" in row
                    assert "note=<i>x</i><script>alert(1)</script>" in row
                    assert token_id(TOKEN.encode()) in row  # the token's id, never the token
                    assert TOKEN not in page.content()
                    assert page.locator("#tunnels i, #tunnels script").count() == 0
                    assert dialogs == []
                expect(page.locator("#events")).to_contain_text("tunnel_unregistered", timeout=15000)
                assert "db-agent-0" in page.inner_text("#events")
                assert page.inner_text("#tunnels").strip() == ""
                # The script and style came from their files on NOVAS, and the
                # strict CSP blocked nothing the page needs.
                assert f"http://127.0.0.1:{admin}/page.js" in requests
                assert f"http://127.0.0.1:{admin}/page.css" in requests
                assert page.evaluate("window.cspViolations") == []
                assert [m for m in console if "Content Security Policy" in m or "Refused" in m] == []
                # No asset came from anywhere but NOVAS itself (it must work in a closed VPC).
                assert requests and all(u.startswith(f"http://127.0.0.1:{admin}/") for u in requests)
            finally:
                browser.close()


def test_novac_health_probes(tmp_path: Path) -> None:
    health = free_port()
    server_port = free_port()
    env = {
        "NOVAC_SERVER": f"127.0.0.1:{server_port}",
        "NOVAC_TLS": "off",
        "NOVAC_HEALTH_PORT": str(health),
        "NOVAC_HEALTH_BIND": "127.0.0.1",
        "NOVAC_RECONNECT_MAX": "2",
    }
    with novac(tmp_path, env) as agent:
        agent.wait_log("health probes on 127.0.0.1")
        wait_for(lambda: get(health, "/healthz", None)[0] == 200, 10, "/healthz")
        status, body, _ = get(health, "/readyz", None)
        assert status == 503 and b"not registered" in body  # no server yet
        plain = {"NOVAS_TLS": "off", "NOVAS_AGENT_PORT": str(server_port)}
        (tmp_path / "s").mkdir()
        with novas(tmp_path / "s", [], plain) as (server, _):
            server.wait_log("agent agent-1 registered", timeout=40)
            wait_for(lambda: get(health, "/readyz", None)[0] == 200, 10, "/readyz to turn ready")
        wait_for(lambda: get(health, "/readyz", None)[0] == 503, 20, "/readyz to turn unready")
