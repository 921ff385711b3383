"""
The Reverse Tunnels page's cluster parts in a real browser (Debian's
Chromium through Playwright, as tests/test_admin.py runs the page): the
members, the server column, the routes with their warning where no agent
matches, and the controls that add and remove a route and drain an agent,
all under the strict CSP and with the bearer token the page already uses.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .processes import ADMIN_TOKEN, echo_roundtrip, fingerprint, free_port, novac, novas, target, wait_for

pytestmark = pytest.mark.integration


def api(admin: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}")
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_cluster_controls_in_a_real_browser(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, ".ci/run installs Debian's chromium"
    from playwright.sync_api import Dialog, expect, sync_playwright

    nowhere = free_port()
    with (
        target("echo") as echo,
        novas(tmp_path, [f"{nowhere}:127.0.0.1:9@env=nowhere"], {"NOVAS_SERVER_ID": "novas-page"}) as (server, port),
    ):
        admin = server.admin_port
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(server),
            "NOVAC_TAGS": "env=prod",
        }
        with novac(tmp_path, env, name="db-agent-1"), sync_playwright() as p:
            server.wait_log("agent db-agent-1 registered")
            browser = p.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run", "--disable-quic"],
            )  # fmt: skip
            try:
                page = browser.new_page()
                page.add_init_script(
                    "window.cspViolations = [];"
                    "document.addEventListener('securitypolicyviolation',"
                    " (e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
                )
                dialogs: list[str] = []

                def on_dialog(dialog: Dialog) -> None:
                    dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", on_dialog)
                page.goto(f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
                # The members, and the server that holds each tunnel.
                expect(page.locator("#servers")).to_contain_text("novas-page (this server)", timeout=15000)
                expect(page.locator("#tunnels")).to_contain_text("db-agent-1", timeout=15000)
                assert "novas-page" in page.inner_text("#tunnels tr")
                # The command-line route: no agent has env=nowhere, the page warns; no Remove button.
                static = page.locator("#routes tr[data-id='static-0']")
                expect(static).to_contain_text("no matching agent in the cluster")
                assert static.locator("button").count() == 0
                # A bad route: the API's reason shown, nothing added.
                page.fill("#route-spec", "not-a-route")
                page.click("#route-add")
                expect(page.locator("#route-error")).to_contain_text("is not [BIND:]PORT:HOST:HOSTPORT")
                assert page.locator("#routes tr").count() == 1
                # A good one: listed with its port and the one matching agent, and it carries traffic.
                page.fill("#route-spec", f"0:127.0.0.1:{echo}@env=prod")
                page.click("#route-add")
                added = page.locator("#routes tr", has_text=f"127.0.0.1:{echo}@env=prod")
                expect(added).to_contain_text("on port", timeout=10000)
                assert page.inner_text("#route-error") == ""
                [route] = [r for r in api(admin, "/api/v1/routes")["routes"] if not r["static"]]
                assert route["agents"] == 1 and route["created_by"] == "admin"
                expect(added.locator("td").nth(3)).to_have_text("1")
                assert echo_roundtrip(route["port"], b"through the page's route") == b"through the page's route"
                # Removed from the page: gone from the list and from the port.
                added.locator("button", has_text="Remove").click()
                expect(page.locator("#routes tr")).to_have_count(1, timeout=10000)
                assert [r["id"] for r in api(admin, "/api/v1/routes")["routes"]] == ["static-0"]
                # Drain the agent: GOAWAY, audited as the admin's.
                page.locator("#tunnels tr", has_text="db-agent-1").locator("button", has_text="Drain").click()
                server.wait_log("agent db-agent-1 drained by admin")

                def drained() -> bool:
                    events = api(admin, "/api/v1/events?kind=tunnel_drained")["events"]
                    return [(e["agent"], e["who"]) for e in events] == [("db-agent-1", "admin")]

                wait_for(drained, 10, "the drain in the history")
                kinds = {e["kind"] for e in api(admin, "/api/v1/events?limit=1000")["events"]}
                assert {"route_added", "route_removed", "tunnel_drained"} <= kinds
                assert dialogs == []
                assert page.evaluate("window.cspViolations") == []
            finally:
                browser.close()
