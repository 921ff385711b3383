"""
Typed settings (nova.config.Setting): one typed default each, derived
labels and variables, and the couplings that used to be hidden.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nova.agent import options as agent_options
from nova.config import ConfigError, Setting, resolve
from nova.mux.defaults import DEFAULT_MAX_STREAMS
from nova.rules.admission import Limits
from nova.server import options as server_options
from nova.wire.frames import DEFAULT_INITIAL_WINDOW

SERVER_BASE = {"NOVAS_AGENT_TOKEN": "agent-token-1234"}
AGENT_BASE = {"NOVAC_SERVER": "novas.test:9022", "NOVAC_TOKEN": "a-long-enough-token", "NOVAC_TLS": "off"}


def server(**env: str) -> server_options.ServerConfig:
    return server_options.build_config(resolve(server_options.SETTINGS, {}, SERVER_BASE | env))


def agent(**env: str) -> agent_options.AgentConfig:
    return agent_options.build_config(resolve(agent_options.SETTINGS, {}, AGENT_BASE | env))


def setting(settings: tuple[Setting[Any], ...], name: str) -> Setting[Any]:
    (found,) = [s for s in settings if s.name == name]
    return found


class DerivedNamesTests(SynchronousTestCase):
    def test_labels_and_variables_come_from_the_name(self) -> None:
        s = setting(server_options.SETTINGS, "max-streams-per-tunnel")
        self.assertEqual(
            (s.env, s.label),
            ("NOVAS_MAX_STREAMS_PER_TUNNEL", "--max-streams-per-tunnel / NOVAS_MAX_STREAMS_PER_TUNNEL"),
        )
        s = setting(agent_options.SETTINGS, "ca")
        self.assertEqual(s.label, "--ca / NOVAC_TLS_CA")
        for settings, prefix in ((server_options.SETTINGS, "NOVAS_"), (agent_options.SETTINGS, "NOVAC_")):
            for s in settings:
                self.assertTrue(s.env.startswith(prefix), s.env)
                self.assertEqual(s.label, f"--{s.name} / {s.env}")

    def test_defaults_are_typed_and_shown_as_the_docs_write_them(self) -> None:
        keepalive = setting(server_options.SETTINGS, "keepalive")
        self.assertEqual((keepalive.initial, keepalive.default), (15.0, "15"))
        config = server()
        self.assertEqual(config.agent_port, 9022)
        self.assertEqual(config.admin_port, 9023)
        self.assertIsNone(config.socks_port)
        self.assertEqual(agent().tags, ())


class OneDefaultTests(SynchronousTestCase):
    """The defaults the runtime uses are the settings' (no second copy to drift)."""

    def test_windows_and_streams(self) -> None:
        self.assertEqual((server().window, agent().window), (DEFAULT_INITIAL_WINDOW, DEFAULT_INITIAL_WINDOW))
        self.assertEqual(agent().max_streams, DEFAULT_MAX_STREAMS)

    def test_limits(self) -> None:
        self.assertEqual(server().limits, Limits())


class CouplingTests(SynchronousTestCase):
    """The settings that used to be another setting's value, silently."""

    def test_agent_handshake_timeout_follows_the_connect_timeout_unless_set(self) -> None:
        self.assertEqual(agent().timing().handshake_timeout, 10.0)
        self.assertEqual(agent(NOVAC_CONNECT_TIMEOUT="4").timing().handshake_timeout, 4.0)
        config = agent(NOVAC_CONNECT_TIMEOUT="4", NOVAC_HANDSHAKE_TIMEOUT="20")
        self.assertEqual((config.connect_timeout, config.timing().handshake_timeout), (4.0, 20.0))

    def test_socks_timeout_follows_the_handshake_timeout_unless_set(self) -> None:
        self.assertEqual(server().socks_timeout, 10.0)
        self.assertEqual(server(NOVAS_HANDSHAKE_TIMEOUT="3").socks_timeout, 3.0)
        config = server(NOVAS_HANDSHAKE_TIMEOUT="3", NOVAS_SOCKS_TIMEOUT="7")
        self.assertEqual((config.handshake_timeout, config.socks_timeout), (3.0, 7.0))

    def test_auth_delay_follows_a_quarter_of_the_block_unless_set(self) -> None:
        self.assertEqual(server().limits.failures_before_delay, 5)
        self.assertEqual(server(NOVAS_AUTH_BLOCK_AFTER="4").limits.failures_before_delay, 1)
        self.assertEqual(server(NOVAS_AUTH_BLOCK_AFTER="0").limits.failures_before_delay, 1)
        self.assertEqual(server(NOVAS_AUTH_DELAY_AFTER="2").limits.failures_before_delay, 2)
        with self.assertRaises(ConfigError) as e:
            server(NOVAS_AUTH_DELAY_AFTER="0")
        self.assertIn("--auth-delay-after / NOVAS_AUTH_DELAY_AFTER", str(e.exception))

    def test_help_says_what_a_derived_default_follows(self) -> None:
        doc = setting(agent_options.SETTINGS, "handshake-timeout").doc()
        self.assertIn("default --connect-timeout's value", doc)
        doc = setting(server_options.SETTINGS, "auth-delay-after").doc()
        self.assertIn("a quarter of --auth-block-after", doc)

    def test_text_given_to_build_config_is_read_by_the_parser(self) -> None:
        values = resolve(agent_options.SETTINGS, {}, AGENT_BASE) | {"connect-timeout": "3"}
        self.assertEqual(agent_options.build_config(values).connect_timeout, 3.0)
