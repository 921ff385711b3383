"""
A real cluster on loopback, as issue 16 deploys it: PostgreSQL started by
the test; three NOVAS sharing it, each with its own id, behind Debian's
HAProxy (mode tcp, round robin, health checks), with a fourth backend line
that has no server behind it yet; two agents whose only server setting is
the balancer's address.

What a user would notice: every agent ends up held by every server; a route
on any server reaches any agent (sha256-identical transfers, half-close); a
route added through one server's API is served by all within 5 s, and
removed likewise; a server killed with SIGKILL during a connection loop
through the others costs the loop nothing, the agents re-home and the
cluster view drops it; PostgreSQL stopped and started during traffic costs
nothing; a fourth server that joins is held by every agent within a minute
and carries a route.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from .processes import (
    Postgres,
    Proc,
    admin_api,
    admin_call,
    echo_roundtrip,
    fingerprint,
    free_port,
    haproxy,
    novac,
    novas,
    refused,
    route_port,
    target,
    wait_for,
)

pytestmark = pytest.mark.integration

DEAD = 3.0  # the cluster dead timeout: a heartbeat every second
CHANGE = 5.0  # the issue: every server follows a route change within 5 s
AGENTS = {"agent-x": "team=x", "agent-y": "team=y"}


def held_by(server: Proc, sid: str) -> set[str]:
    """The agents whose tunnel this server itself holds (by its own view)."""
    try:
        return {t["name"] for t in admin_api(server.admin_port, "/api/v1/tunnels")["tunnels"] if t["server"] == sid}
    except OSError:
        return set()


def members(server: Proc) -> set[str]:
    return {s["id"] for s in admin_api(server.admin_port, "/api/v1/servers")["servers"]}


def digest_transfer(port: int, payload: bytes) -> None:
    """
    Send C{payload}, shut down writing, then read the target's answer (it
    answers only once it saw the end): the half-close crossed the tunnel, and
    what arrived is sha256-identical to what was sent.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode(), answer


class Loop:
    """Transfers through the given route ports, one after another, in a thread, until stopped; counts failures."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for port in self.ports:
                payload = os.urandom(20_000)
                try:
                    digest_transfer(port, payload)
                    self.done += 1
                except (OSError, AssertionError) as e:
                    self.failures.append(f"port {port}: {e!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Cluster:
    """The servers of the test, each with a route per agent (ports fixed per server)."""

    def __init__(self, tmp: Path, stack: ExitStack, dsn: str, digest: int) -> None:
        self.tmp, self.stack, self.dsn, self.digest = tmp, stack, dsn, digest
        self.servers: dict[str, Proc] = {}
        self.routes: dict[tuple[str, str], int] = {}  # (server, agent) -> port

    def start(self, sid: str, agent_port: int) -> Proc:
        home = self.tmp / sid
        home.mkdir()
        if self.servers:  # one certificate for the cluster, as behind a real balancer
            first = next(iter(self.servers))
            shutil.copytree(self.tmp / first / "state" / "tls", home / "state" / "tls")
        specs = []
        for agent, tag in AGENTS.items():
            self.routes[sid, agent] = free_port()
            specs.append(f"{self.routes[sid, agent]}:127.0.0.1:{self.digest}@{tag}")
        env = {
            "NOVAS_AUDIT_DB": self.dsn,
            "NOVAS_SERVER_ID": sid,
            "NOVAS_ADVERTISE_ADDRESS": f"127.0.0.1:{agent_port}",
            "NOVAS_CLUSTER_DEAD_TIMEOUT": str(DEAD),
            "NOVAS_AGENT_PORT": str(agent_port),
        }
        server, _ = self.stack.enter_context(novas(home, specs, env))
        self.servers[sid] = server
        return server

    def everyone_holds_every_agent(self, timeout: float, sids: list[str]) -> None:
        def done() -> bool:
            return all(held_by(self.servers[s], s) == set(AGENTS) for s in sids)

        wait_for(done, timeout, f"every agent held by {sids}")


def when(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for C{predicate}; how long it took."""
    t0 = time.monotonic()
    wait_for(predicate, timeout, what)
    return time.monotonic() - t0


def test_three_servers_behind_haproxy_serve_two_agents_through_failures(tmp_path: Path) -> None:
    pg = Postgres()
    with ExitStack() as stack:
        stack.callback(pg.remove)
        pg.start()
        digest = stack.enter_context(target("digest"))
        echo = stack.enter_context(target("echo"))
        ids = ["novas-a", "novas-b", "novas-c"]
        agent_ports = {sid: free_port() for sid in [*ids, "novas-d"]}
        # novas-d's line is there from the start: down until a server listens on it.
        _, lb = stack.enter_context(haproxy(list(agent_ports.values())))
        cluster = Cluster(tmp_path, stack, pg.dsn, digest)
        for sid in ids:
            cluster.start(sid, agent_ports[sid])
        agents: dict[str, Proc] = {}
        for name, tag in AGENTS.items():
            env = {
                "NOVAC_SERVER": f"127.0.0.1:{lb}",  # the balancer, and nothing else
                "NOVAC_TLS_FINGERPRINT": fingerprint(cluster.servers["novas-a"]),
                "NOVAC_TAGS": tag,
                "NOVAC_RECONNECT_INITIAL": "0.5",
                "NOVAC_RECONNECT_MAX": "2",
            }
            agents[name] = stack.enter_context(novac(tmp_path, env, name=name))

        # Every agent ends up with a tunnel to every server, through the one address.
        cluster.everyone_holds_every_agent(60, ids)
        for sid in ids:
            assert members(cluster.servers[sid]) == set(ids)

        # From each server, a route reaches each agent: identical bytes, half-close.
        payload = os.urandom(1_000_000)
        for port in cluster.routes.values():
            digest_transfer(port, payload)

        dynamic_route_everywhere(cluster, echo)
        survivors = kill_one_during_a_loop(cluster, agents, "novas-a")
        postgres_outage_during_a_loop(cluster, pg, survivors)

        # A fourth server joins behind the balancer's spare line: every agent
        # holds a tunnel to it within a minute, and its routes reach them.
        d = cluster.start("novas-d", agent_ports["novas-d"])
        took = when(lambda: held_by(d, "novas-d") == set(AGENTS), 60, "every agent on novas-d")
        assert took < 60, took
        for sid in survivors:
            wait_for(lambda: members(cluster.servers[sid]) == {*survivors, "novas-d"}, 10, "novas-d in view")  # noqa: B023
        for agent in AGENTS:
            digest_transfer(cluster.routes["novas-d", agent], payload)
        cluster.everyone_holds_every_agent(10, [*survivors, "novas-d"])


def dynamic_route_everywhere(cluster: Cluster, echo: int) -> None:
    """A route added through one server's API is served by all within 5 s, and removed likewise."""
    servers = list(cluster.servers.values())
    a, c = servers[0], servers[-1]
    status, added = admin_call(a.admin_port, "POST", "/api/v1/routes", {"route": f"0:127.0.0.1:{echo}@team=y"})
    assert status == 201, added
    rid = added["id"]
    took = when(
        lambda: all(route_port(s.admin_port, rid) is not None for s in servers), CHANGE + 1, "every server to listen"
    )
    assert took < CHANGE, took
    ports = [route_port(s.admin_port, rid) for s in servers]
    for port in ports:
        assert port is not None
        assert echo_roundtrip(port, b"dynamic" * 1000) == b"dynamic" * 1000
    # Removed through another server's API: every server stops within 5 s.
    status, _ = admin_call(c.admin_port, "DELETE", f"/api/v1/routes/{rid}")
    assert status == 200
    took = when(lambda: all(p is not None and refused(p) for p in ports), CHANGE + 1, "every server to stop")
    assert took < CHANGE, took
    # A careless second removal and a bad spec: refused with a reason.
    assert admin_call(a.admin_port, "DELETE", f"/api/v1/routes/{rid}")[0] == 404
    status, body = admin_call(a.admin_port, "POST", "/api/v1/routes", {"route": "not-a-route"})
    assert status == 400 and body["error"], body


def kill_one_during_a_loop(cluster: Cluster, agents: dict[str, Proc], victim: str) -> list[str]:
    """
    SIGKILL one server while transfers loop through the others' routes: none
    fails, the view drops it within the dead timeout, the agents' pools drop
    it and they stay held by every survivor.  Returns the survivors.
    """
    survivors = [s for s in cluster.servers if s != victim]
    loop = Loop([cluster.routes[s, agent] for s in survivors for agent in AGENTS])
    wait_for(lambda: loop.done >= 8, 60, "the loop to run")
    seen = {name: len(agent.text()) for name, agent in agents.items()}
    cluster.servers[victim].proc.kill()
    cluster.servers[victim].proc.wait()
    first = cluster.servers[survivors[0]]
    took = when(lambda: members(first) == set(survivors), DEAD + 5, f"{victim} to leave the view")
    assert took <= DEAD + 5
    for sid in survivors:
        assert members(cluster.servers[sid]) == set(survivors)
    # The agents re-home: their pools now name the survivors only.
    for name, agent in agents.items():
        wait_for(
            lambda: f"names {len(survivors)} member(s)" in agent.text()[seen[name] :],  # noqa: B023
            30,
            f"{name}'s pool to drop {victim}",
        )
    cluster.everyone_holds_every_agent(30, survivors)
    done_at_kill = loop.done
    wait_for(lambda: loop.done >= done_at_kill + 8, 60, "the loop to go on")
    loop.stop()
    assert loop.failures == [], loop.failures[:5]
    del cluster.servers[victim]
    return survivors


def postgres_outage_during_a_loop(cluster: Cluster, pg: Postgres, survivors: list[str]) -> None:
    """PostgreSQL stops and comes back during traffic: no connection through an existing route fails."""
    admins = [cluster.servers[s].admin_port for s in survivors]
    loop = Loop([cluster.routes[s, agent] for s in survivors for agent in AGENTS])
    wait_for(lambda: loop.done >= 4, 60, "the loop to run")
    pg.stop()
    for admin in admins:
        wait_for(lambda: admin_api(admin, "/api/v1/servers")["stale_since"] is not None, 15, "a stale view")  # noqa: B023
    during = loop.done
    wait_for(lambda: loop.done >= during + 8, 60, "traffic during the outage")
    pg.start()
    for admin in admins:
        wait_for(lambda: admin_api(admin, "/api/v1/servers")["stale_since"] is None, 20, "a fresh view")  # noqa: B023
    after = loop.done
    wait_for(lambda: loop.done >= after + 4, 60, "traffic after the outage")
    loop.stop()
    assert loop.failures == [], loop.failures[:5]
