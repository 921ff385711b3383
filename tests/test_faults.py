"""
Faults over distance (docs/faults.md), without sockets: the stall setting,
and a stalled agent tunnel handing its member to the pool.  The decisions
themselves are tested on a Clock in test_lifecycle.py (StallTests),
test_agent_pool.py (StallTests) and test_endpoint.py (FreshTunnelTests).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nova.agent import options as agent_options
from nova.config import ConfigError, resolve
from nova.server import options as server_options


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
