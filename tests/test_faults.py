"""
Faults over distance (docs/faults.md), without sockets: the stall setting,
and a stalled agent tunnel handing its member to the pool.  The decisions
themselves are tested on a Clock in test_lifecycle.py (StallTests),
test_agent_pool.py (StallTests) and test_endpoint.py (FreshTunnelTests).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nova.agent import options as agent_options
from nova.agent.pool import PoolState
from nova.agent.reconnect import RESTART_RETRIES, Backoff
from nova.agent.tunnel import AgentTunnel
from nova.config import ConfigError, resolve
from nova.server import options as server_options

from .contexts import agent_context


def agent(**env: str) -> Any:
    base = {"NOVAC_SERVER": "novas.test:9022", "NOVAC_TOKEN": "a-long-enough-token", "NOVAC_TLS": "off"}
    return agent_options.build_config(resolve(agent_options.SETTINGS, {}, base | env))


def server(**env: str) -> Any:
    return server_options.build_config(
        resolve(server_options.SETTINGS, {}, {"NOVAS_AGENT_TOKEN": "agent-token-1234"} | env)
    )


class StallSettingTests(SynchronousTestCase):
    def test_default_reaches_the_agent_tunnels_only(self) -> None:
        self.assertEqual(agent().timing().stall_timeout, 5.0)
        self.assertEqual(agent(NOVAC_STALL_TIMEOUT="2.5").timing().stall_timeout, 2.5)
        # NOVAS never opens tunnels: its sessions report no stalls.
        self.assertEqual(server().timing().stall_timeout, 0.0)

    def test_a_short_dead_timeout_shortens_the_default(self) -> None:
        # A configuration valid before the setting existed still starts.
        config = agent(NOVAC_KEEPALIVE="1", NOVAC_DEAD_TIMEOUT="3")
        self.assertEqual(config.timing().stall_timeout, 1.0)

    def test_off(self) -> None:
        for value in ("0", "off", "OFF"):
            self.assertEqual(agent(NOVAC_STALL_TIMEOUT=value).timing().stall_timeout, 0.0)

    def test_not_under_the_dead_timeout_is_refused_in_one_line(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            agent(NOVAC_STALL_TIMEOUT="45")
        message = str(raised.exception)
        self.assertEqual(
            message,
            "--stall-timeout / NOVAC_STALL_TIMEOUT (45s) must be shorter than --dead-timeout / NOVAC_DEAD_TIMEOUT"
            " (45s), or 0 to turn it off",
        )
        with self.assertRaises(ConfigError):
            agent(NOVAC_STALL_TIMEOUT="10", NOVAC_DEAD_TIMEOUT="8", NOVAC_KEEPALIVE="2")

    def test_garbage_is_refused(self) -> None:
        for value in ("-1", "soon", "nan"):
            with self.assertRaises(ConfigError) as raised:
                agent(NOVAC_STALL_TIMEOUT=value)
            self.assertIn("NOVAC_STALL_TIMEOUT", str(raised.exception))


class StalledAgentTunnelTests(SynchronousTestCase):
    def test_a_stall_hands_the_member_to_the_pool_and_keeps_the_next_dials_short(self) -> None:
        clock = Clock()
        backoff = Backoff(1.0, 30.0, random=lambda: 0.999999)
        for _ in range(6):
            backoff(1)  # grown over earlier losses
        dials: list[int] = []

        class Hooks:
            def dial(self) -> None:
                dials.append(1)

            def cancel_dial(self) -> None:
                pass

        state = PoolState(clock, Hooks(), lambda: backoff(0))
        context = agent_context(clock, lambda *a: Deferred(), name="a", tags=(), token=b"t", tls=False)
        tunnel = AgentTunnel(context, "s:1", backoff, state)
        state.start()
        state.connected(tunnel)
        state.welcomed(tunnel, "s1", ("s1",))
        tunnel.stalled(6.5)
        self.assertEqual(state.held, {})
        self.assertEqual(state.stalled, {"s1": tunnel})
        # The fresh tunnel is dialled within the initial delay, not after 30 s,
        # and so are the retries while the link stays down.
        for _ in range(RESTART_RETRIES - 1):
            before = len(dials)
            clock.advance(1.0)
            self.assertEqual(len(dials), before + 1)
            state.attempt_failed()
