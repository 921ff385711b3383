"""
Two NOVAS sharing one PostgreSQL, started by the test, as a cluster: a
route added through the API of one is served by the other within 5 s and
removed likewise (a stream it carries runs on); each server's view shows
both servers' tunnels; with PostgreSQL stopped, tunnels and routes keep
working, route changes are refused (503) and the views say stale; with it
back, everything catches up; a server killed with SIGKILL leaves the view
within the cluster dead timeout.

Agents here dial one server each (reaching an agent held by another member
is discovery's work, not this file's); the routes use port 0, so that both
servers, on one host, listen for the same route.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from .processes import (
    Postgres,
    Proc,
    admin_api,
    admin_call,
    echo_roundtrip,
    fingerprint,
    free_port,
    novac,
    novas,
    refused,
    route_port,
    target,
    wait_for,
)

pytestmark = pytest.mark.integration

# Short, so expiry is seen quickly: a heartbeat every second.
DEAD = 3.0
CHANGE = 5.0  # the issue: every server follows a route change within 5 s


def test_two_servers_share_routes_views_and_survive_the_store_and_a_member(tmp_path: Path, postgres: Postgres) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def env(server_id: str) -> dict[str, str]:
        return {
            "NOVAS_AUDIT_DB": postgres.dsn,
            "NOVAS_SERVER_ID": server_id,
            "NOVAS_ADVERTISE_ADDRESS": f"{server_id}.test:9022",
            "NOVAS_CLUSTER_DEAD_TIMEOUT": str(DEAD),
        }

    static_a = free_port()
    with target("echo") as echo, novas(tmp_path / "a", [f"{static_a}:127.0.0.1:{echo}"], env("novas-a")) as (a, port_a):
        with novas(tmp_path / "b", [], env("novas-b")) as (b, port_b):
            A, B = a.admin_port, b.admin_port
            with (
                novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port_a}", "NOVAC_TLS_FINGERPRINT": fingerprint(a)},
                      name="agent-a"),
                novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port_b}", "NOVAC_TLS_FINGERPRINT": fingerprint(b)},
                      name="agent-b"),
            ):  # fmt: skip
                a.wait_log("agent agent-a registered")
                b.wait_log("agent agent-b registered")

                # One view: each server lists both members and both tunnels, with who holds each.
                def members(admin: int) -> dict[str, dict[str, Any]]:
                    return {s["id"]: s for s in admin_api(admin, "/api/v1/servers")["servers"]}

                def holders(admin: int, query: str = "") -> set[tuple[str, str]]:
                    return {(t["name"], t["server"]) for t in admin_api(admin, "/api/v1/tunnels" + query)["tunnels"]}

                both = {("agent-a", "novas-a"), ("agent-b", "novas-b")}
                for admin in (A, B):
                    wait_for(lambda: set(members(admin)) == {"novas-a", "novas-b"}, 10, "both members")  # noqa: B023
                    wait_for(lambda: holders(admin) == both, 10, "both tunnels")  # noqa: B023
                assert members(A)["novas-b"]["address"] == "novas-b.test:9022"
                assert members(A)["novas-a"]["this"] and members(A)["novas-b"]["state"] == "alive"
                assert holders(A, "?server=novas-b") == {("agent-b", "novas-b")}

                # A stream through A's command-line route stays up across every change below.
                other = socket.create_connection(("127.0.0.1", static_a), timeout=10)
                other.sendall(b"static")
                assert other.recv(6) == b"static"

                # A route added on A: listened for on A at once, on B within 5 s.
                status, added = admin_call(A, "POST", "/api/v1/routes", {"route": f"0:127.0.0.1:{echo}"})
                assert status == 201, added
                rid = added["id"]
                t0 = time.monotonic()
                wait_for(lambda: route_port(B, rid) is not None, CHANGE, "B to listen for A's route")
                wait_for(lambda: route_port(A, rid) is not None, CHANGE, "A to listen for its route")
                assert time.monotonic() - t0 < CHANGE
                pa, pb = route_port(A, rid), route_port(B, rid)
                assert pa and pb
                a_port, b_port = pa, pb  # narrowed to int for the closures below
                payload = os.urandom(200_000)
                assert echo_roundtrip(pa, payload) == payload  # through agent-a
                assert echo_roundtrip(pb, payload) == payload  # through agent-b
                events = admin_api(A, "/api/v1/events?kind=route_added")["events"]
                assert [(e["route_id"], e["who"]) for e in events] == [(rid, "admin")]

                # The same listening address again, from the other server: refused.
                fixed = free_port()
                status, first = admin_call(B, "POST", "/api/v1/routes", {"route": f"{fixed}:127.0.0.1:{echo}"})
                assert status == 201, first
                status, body = admin_call(A, "POST", "/api/v1/routes", {"route": f"127.0.0.1:{fixed}:other:2"})
                assert status == 409 and first["id"] in body["error"], body
                assert admin_call(A, "DELETE", f"/api/v1/routes/{first['id']}")[0] == 200
                assert admin_call(B, "DELETE", f"/api/v1/routes/{first['id']}")[0] == 404

                # Removed on B while a stream runs through A: A stops listening
                # within 5 s, the open stream carries on.
                with socket.create_connection(("127.0.0.1", pa), timeout=10) as held:
                    held.sendall(b"before")
                    assert held.recv(6) == b"before"
                    status, _ = admin_call(B, "DELETE", f"/api/v1/routes/{rid}")
                    assert status == 200
                    wait_for(lambda: route_port(A, rid) is None and refused(a_port), CHANGE, "A to stop listening")
                    wait_for(lambda: refused(b_port), CHANGE, "B to stop listening")
                    held.sendall(b"after")
                    assert held.recv(5) == b"after"

                other.sendall(b"untouched")
                assert other.recv(9) == b"untouched"
                other.close()
                assert [r["id"] for r in admin_api(A, "/api/v1/routes")["routes"]] == ["static-0"]
                assert [r["id"] for r in admin_api(B, "/api/v1/routes")["routes"]] == []

                # PostgreSQL goes away: tunnels and routes carry on, changes are
                # refused naming the store, the views say stale.
                status, added = admin_call(A, "POST", "/api/v1/routes", {"route": f"0:127.0.0.1:{echo}"})
                assert status == 201
                live = added["id"]
                wait_for(lambda: route_port(B, live) is not None, CHANGE, "B to listen")
                pa, pb = route_port(A, live), route_port(B, live)
                assert pa and pb
                postgres.stop()
                for admin in (A, B):
                    wait_for(lambda: admin_api(admin, "/api/v1/servers")["stale_since"] is not None, 10, "a stale view")  # noqa: B023
                status, body = admin_call(A, "POST", "/api/v1/routes", {"route": "0:127.0.0.1:1"})
                assert status == 503 and "PostgreSQL" in body["error"], body
                assert admin_call(B, "DELETE", f"/api/v1/routes/{live}")[0] == 503
                assert echo_roundtrip(pa, b"during the outage") == b"during the outage"
                assert echo_roundtrip(pb, b"during the outage") == b"during the outage"
                assert admin_api(A, "/api/v1/tunnels")["stale_since"] is not None
                assert ("agent-a", "novas-a") in holders(A)
                time.sleep(DEAD + 1)  # longer than the dead timeout: the stale view must not expire B
                assert set(members(A)) == {"novas-a", "novas-b"}

                # It comes back: the views are fresh again and changes work.
                postgres.start()
                for admin in (A, B):
                    wait_for(lambda: admin_api(admin, "/api/v1/servers")["stale_since"] is None, 15, "a fresh view")  # noqa: B023
                    wait_for(lambda: holders(admin) == both, 10, "both tunnels again")  # noqa: B023
                status, body = admin_call(B, "DELETE", f"/api/v1/routes/{live}")
                assert status == 200, body
                wait_for(lambda: route_port(A, live) is None, CHANGE, "A to follow after the outage")

                # B dies without a word: gone from A's view within the dead timeout.
                b.proc.kill()
                b.proc.wait()
                t0 = time.monotonic()
                wait_for(lambda: set(members(A)) == {"novas-a"}, DEAD + 3, "B to expire")
                assert holders(A) == {("agent-a", "novas-a")}
                assert time.monotonic() - t0 <= DEAD + 3

                # Its rows are deleted from the store too, at A's next heartbeat.
                import psycopg

                def rows() -> tuple[set[str], set[str]]:
                    with psycopg.connect(postgres.dsn) as conn:
                        servers = {r[0] for r in conn.execute("SELECT id FROM nova_servers").fetchall()}
                        held = {r[0] for r in conn.execute("SELECT server FROM nova_tunnels").fetchall()}
                    return servers, held

                wait_for(lambda: rows() == ({"novas-a"}, {"novas-a"}), 5, "B's rows to be deleted")

                # A stops while the store is gone: a warning, no traceback (checked as it stops).
                postgres.stop()
                wait_for(lambda: admin_api(A, "/api/v1/servers")["stale_since"] is not None, 10, "a stale view")
            a.stop()
            assert a.proc.returncode == 0
            assert "cluster store unreachable while leaving" in a.text()


def test_a_command_line_route_that_cannot_listen_still_stops_the_server(tmp_path: Path) -> None:
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
        env |= {"NOVAS_AGENT_TOKEN": "x" * 16, "NOVAS_AGENT_PORT": "0", "NOVAS_ADMIN_PORT": "off",
                "NOVAS_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "twisted", "novas", "--route", f"{taken}:127.0.0.1:22"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done
    assert f"novas: error: cannot listen for route 127.0.0.1:{taken}:127.0.0.1:22" in done.stderr + done.stdout
    # It never joined the cluster: nothing was written to the store.
    assert not (tmp_path / "state" / "cluster.sqlite3").exists()


def test_drain_through_the_api_sends_new_streams_elsewhere_and_lets_open_ones_finish(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
        admin = server.admin_port
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
        with novac(tmp_path, env, name="agent-1"), novac(tmp_path, env, name="agent-2"):
            server.wait_log("agent agent-1 registered")
            server.wait_log("agent agent-2 registered")
            with socket.create_connection(("127.0.0.1", route), timeout=10) as held:
                held.sendall(b"held")
                assert held.recv(4) == b"held"
                # (The history is written behind: wait for the held stream's record.)
                wait_for(lambda: admin_api(admin, "/api/v1/events?kind=stream_opened")["total"] == 1, 10, "its record")
                busy = {t["name"] for t in admin_api(admin, "/api/v1/tunnels")["tunnels"] if t["active_streams"]}
                (drained,) = busy
                (other,) = {"agent-1", "agent-2"} - busy
                status, answer = admin_call(admin, "POST", f"/api/v1/tunnels/{drained}/drain")
                assert status == 202 and answer["status"] == "draining", answer
                status, _ = admin_call(admin, "POST", f"/api/v1/tunnels/{drained}/drain")
                assert status == 202  # again: harmless; each request is audited
                states = {t["name"]: t["status"] for t in admin_api(admin, "/api/v1/tunnels")["tunnels"]}
                assert states == {drained: "draining", other: "connected"}
                before = admin_api(admin, "/api/v1/events?kind=stream_opened&limit=1000")["total"]
                for i in range(6):
                    assert echo_roundtrip(route, b"new %d" % i) == b"new %d" % i
                held.sendall(b"still")
                assert held.recv(5) == b"still"

            def opened_after() -> list[str]:
                events = admin_api(admin, "/api/v1/events?kind=stream_opened&limit=1000")["events"]
                return [e["agent"] for e in events[: len(events) - before]]

            wait_for(lambda: len(opened_after()) == 6, 10, "the new streams in the history")
            assert set(opened_after()) == {other}
            events = admin_api(admin, "/api/v1/events?kind=tunnel_drained")["events"]
            assert [(e["agent"], e["who"]) for e in events] == [(drained, "admin")] * 2


DRAIN_TIMEOUT = 10.0


class Pair:
    """
    Two servers on one PostgreSQL, two agents each holding a tunnel to both
    (one NOVAC_SERVER entry per server, one certificate for both servers).
    A has a route to any agent and one to agent-1; B one to any agent.
    """

    every = {(n, s) for n in ("agent-1", "agent-2") for s in ("novas-a", "novas-b")}

    def __init__(self, tmp: Path, postgres: Postgres, stack: ExitStack) -> None:
        self.tmp, self.postgres, self.stack = tmp, postgres, stack
        echo = stack.enter_context(target("echo"))
        self.any_a, self.one_a, self.any_b = free_port(), free_port(), free_port()
        a, port_a = self._start(
            "novas-a", [f"{self.any_a}:127.0.0.1:{echo}", f"{self.one_a}:127.0.0.1:{echo}@name:agent-1"]
        )
        b, port_b = self._start("novas-b", [f"{self.any_b}:127.0.0.1:{echo}"])
        self.A, self.B = a.admin_port, b.admin_port
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{port_a},127.0.0.1:{port_b}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(a),
            "NOVAC_RECONNECT_INITIAL": "0.5",
            "NOVAC_RECONNECT_MAX": "2",
        }
        self.agent1 = stack.enter_context(novac(tmp, env, name="agent-1"))
        stack.enter_context(novac(tmp, env, name="agent-2"))
        for admin in (self.A, self.B):
            wait_for(lambda: set(self.tunnels(admin)) == self.every, 20, "both agents on both servers")  # noqa: B023

    def _start(self, sid: str, routes: list[str]) -> tuple[Proc, int]:
        home = self.tmp / sid
        home.mkdir()
        if sid == "novas-b":  # one certificate for the cluster: agents pin one fingerprint
            shutil.copytree(self.tmp / "novas-a" / "state" / "tls", home / "state" / "tls")
        env = {
            "NOVAS_AUDIT_DB": self.postgres.dsn,
            "NOVAS_SERVER_ID": sid,
            "NOVAS_CLUSTER_DEAD_TIMEOUT": str(DEAD),
            "NOVAS_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        }
        return self.stack.enter_context(novas(home, routes, env))

    def tunnels(self, admin: int) -> dict[tuple[str, str], dict[str, Any]]:
        return {(t["name"], t["server"]): t for t in admin_api(admin, "/api/v1/tunnels")["tunnels"]}

    def streams(self, admin: int, agent: str, server: str) -> int:
        return int(self.tunnels(admin)[agent, server]["active_streams"])

    def all_connected(self, admin: int) -> bool:
        now = self.tunnels(admin)
        return set(now) == self.every and all(t["status"] == "connected" for t in now.values())

    def hold(self, port: int, n: int) -> list[socket.socket]:
        """C{n} connections through C{port}, each shown to work, left open."""
        held = [self.stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10)) for _ in range(n)]
        for s in held:
            s.sendall(b"held")
            assert s.recv(4) == b"held"
        return held


def test_drain_and_least_loaded_selection_span_the_cluster(tmp_path: Path, postgres: Postgres) -> None:
    with ExitStack() as stack:
        pair = Pair(tmp_path, postgres, stack)
        selection_counts_the_streams_on_other_members(pair)
        careless_drains_are_refused(pair)
        a_drain_through_a_reaches_b(pair)


def selection_counts_the_streams_on_other_members(pair: Pair) -> None:
    """
    Three long-lived streams through A, all to agent-1.  Once B has read A's
    heartbeat, B sends its new streams to agent-2, though its own tunnels of
    both agents are idle (by B's own counts it would alternate).
    """
    A, B = pair.A, pair.B
    through_a = pair.hold(pair.one_a, 3)
    wait_for(lambda: pair.streams(B, "agent-1", "novas-a") == 3, 10, "B to see agent-1's streams on A")
    through_b = pair.hold(pair.any_b, 3)
    assert (pair.streams(B, "agent-2", "novas-b"), pair.streams(B, "agent-1", "novas-b")) == (3, 0)
    for s in [*through_a, *through_b]:
        s.close()
    for admin, server in ((A, "novas-a"), (B, "novas-b")):
        wait_for(lambda: pair.streams(admin, "agent-2", server) == 0, 10, "the streams to end")  # noqa: B023


def careless_drains_are_refused(pair: Pair) -> None:
    """Unknown and odd names are 404; with the store down, 503 naming it, and nothing is drained."""
    for name in ("nobody", "agent-1%20", "agent%2F1", "%00", "%C3%A9", "x" * 500):
        status, answer = admin_call(pair.A, "POST", f"/api/v1/tunnels/{name}/drain")
        assert status == 404, (name, answer)
    pair.postgres.stop()
    wait_for(lambda: admin_api(pair.A, "/api/v1/servers")["stale_since"] is not None, 10, "a stale view")
    status, answer = admin_call(pair.A, "POST", "/api/v1/tunnels/agent-1/drain")
    assert status == 503 and "PostgreSQL" in answer["error"], answer
    assert pair.tunnels(pair.A)["agent-1", "novas-a"]["status"] == "connected"
    pair.postgres.start()
    for admin in (pair.A, pair.B):
        wait_for(lambda: admin_api(admin, "/api/v1/servers")["stale_since"] is None, 15, "a fresh view")  # noqa: B023
    assert admin_api(pair.A, "/api/v1/events?kind=tunnel_drained")["events"] == []


def a_drain_through_a_reaches_b(pair: Pair) -> None:
    """
    A drain asked of A: A's tunnel of agent-1 drains at once, B's within 5 s,
    new streams through B go to agent-2; once the drain timeout has passed
    agent-1 is back on both, and the old request does not drain it again.
    """
    A, B = pair.A, pair.B
    since = time.time()  # the servers' clock: the history's times
    status, answer = admin_call(A, "POST", "/api/v1/tunnels/agent-1/drain")
    assert status == 202, answer
    assert answer["servers"] == ["novas-a", "novas-b"] and answer["request"]["requested_by"] == "admin"
    assert pair.tunnels(A)["agent-1", "novas-a"]["status"] == "draining"
    asked = time.monotonic()
    wait_for(lambda: pair.tunnels(B)["agent-1", "novas-b"]["status"] == "draining", CHANGE, "B to drain agent-1")
    assert time.monotonic() - asked < CHANGE
    assert admin_call(A, "POST", "/api/v1/tunnels/agent-1/drain")[0] == 202  # again: no error
    # Both of agent-1's tunnels were told (its log names the reason once per tunnel).
    wait_for(lambda: pair.agent1.text().count("drained by the administrator") >= 2, 10, "GOAWAY on both tunnels")
    for i in range(6):
        assert echo_roundtrip(pair.any_b, b"new %d" % i) == b"new %d" % i

    def opened_on_b() -> list[tuple[str, str]]:
        events = admin_api(B, "/api/v1/events?kind=stream_opened&limit=1000")["events"]
        return [(e["agent"], e["server"]) for e in events if e["time"] >= since]

    # (Written after a PostgreSQL outage above: the audit writer reconnects.)
    wait_for(lambda: len(opened_on_b()) >= 6, 10, "the new streams in the history")
    assert opened_on_b() == [("agent-2", "novas-b")] * 6, opened_on_b()
    events = admin_api(A, "/api/v1/events?kind=tunnel_drained")["events"]
    assert [(e["agent"], e["who"], e["server"]) for e in events] == [("agent-1", "admin", "novas-a")] * 2
    # The drain timeout passes: the held tunnels close, agent-1 registers again
    # with both servers, and its new tunnels are not drained by the old request.
    for admin in (A, B):
        wait_for(lambda: pair.all_connected(admin), DRAIN_TIMEOUT + 20, "agent-1 back on both servers")  # noqa: B023
    time.sleep(3)  # a poll or two later: still not drained
    assert pair.all_connected(A) and pair.all_connected(B)
