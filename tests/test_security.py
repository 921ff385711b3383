"""
Security in memory: the token set and the throttle.  Token rotation, mutual
TLS, throttling between real processes and the bad-input suite are
tests/test_security_integration.py.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nova.rules.admission import Limits, Throttle, TokenSet, token_id
from nova.wire.handshake import make_auth


class TokenSetTests(SynchronousTestCase):
    def test_any_listed_token_proves_and_ids_are_not_secrets(self) -> None:
        tokens = TokenSet([b"old-token-123", b"new-token-456"])
        nonce = b"n" * 32
        for t in (b"old-token-123", b"new-token-456"):
            auth = make_auth(t, nonce, b"", "a1", (), 65536)
            matched = tokens.match(nonce, b"", auth)
            self.assertEqual(matched.key if matched else None, token_id(t))
            self.assertNotIn(t.decode(), token_id(t))
        self.assertIsNone(tokens.match(nonce, b"", make_auth(b"other-token", nonce, b"", "a1", (), 65536)))
        tokens.replace([b"new-token-456"])
        self.assertIsNone(tokens.match(nonce, b"", make_auth(b"old-token-123", nonce, b"", "a1", (), 65536)))


class ThrottleTests(SynchronousTestCase):
    def test_delay_grows_then_blocks_then_forgives(self) -> None:
        t = Throttle(Limits(failures_before_delay=3, failures_before_block=6, block_seconds=60, max_delay=30))
        now = 1000.0
        delays = []
        for _ in range(5):
            t.failed("10.0.0.1", now)
            delays.append(t.delay("10.0.0.1", now))
        self.assertEqual(delays, [0.0, 0.0, 1.0, 2.0, 4.0])
        self.assertFalse(t.blocked("10.0.0.1", now))
        t.failed("10.0.0.1", now)
        self.assertTrue(t.blocked("10.0.0.1", now))
        self.assertFalse(t.blocked("10.0.0.2", now))
        self.assertFalse(t.blocked("10.0.0.1", now + 61))
        self.assertEqual(t.delay("10.0.0.1", now + 61), 0.0)

    def test_success_clears_and_memory_is_bounded(self) -> None:
        t = Throttle(Limits(), max_sources=100)
        for i in range(10_000):
            t.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 5.0)
        self.assertEqual(len(t), 100)
        t.failed("192.0.2.1", 5.0)
        t.succeeded("192.0.2.1")
        self.assertEqual(t.delay("192.0.2.1", 5.0), 0.0)


# The bad-input suite.


class ThrottleOffTests(SynchronousTestCase):
    def test_zero_turns_throttling_off(self) -> None:
        t = Throttle(Limits(failures_before_block=0, failures_before_delay=0))
        for _ in range(100):
            t.failed("10.0.0.9", 1.0)
        self.assertFalse(t.blocked("10.0.0.9", 1.0))
        self.assertEqual(t.delay("10.0.0.9", 1.0), 0.0)
