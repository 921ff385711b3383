"""
Peer-supplied text is escaped before it reaches a log line or an audit record
(nova.wire.text).
"""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nova.wire.text import has_controls, untrusted

_ESCAPED = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


class UntrustedTextTests(SynchronousTestCase):
    def test_plain_text_is_unchanged(self) -> None:
        self.assertEqual(untrusted("draining for an upgrade"), "draining for an upgrade")
        self.assertEqual(untrusted("agent réseau-1"), "agent réseau-1")

    def test_line_breaks_controls_and_bidi_are_escaped(self) -> None:
        self.assertEqual(untrusted("ok\r\nFAKE line"), "ok\\r\\nFAKE line")
        self.assertEqual(untrusted("127.0.0.1\x00.evil.example"), "127.0.0.1\\x00.evil.example")
        self.assertEqual(untrusted("abc\u202edcba"), "abc\\u202edcba")
        self.assertEqual(untrusted("a\u2028b\x85c\x1bd"), "a\\u2028b\\x85c\\x1bd")
        self.assertEqual(untrusted("back\\slash"), "back\\\\slash")

    def test_long_text_is_cut_and_marked(self) -> None:
        self.assertEqual(untrusted("x" * 300, limit=10), "x" * 10 + "…")
        self.assertEqual(untrusted("\n" * 300, limit=3), "\\n\\n\\n…")

    def test_lone_surrogates_are_escaped(self) -> None:
        out = untrusted("a\ud800b")
        self.assertEqual(out, "a\\ud800b")
        out.encode("utf-8")  # no longer raises

    def test_has_controls(self) -> None:
        self.assertTrue(has_controls("a\x00"))
        self.assertTrue(has_controls("a\u2066"))
        self.assertFalse(has_controls("db.internal.example"))

    @given(st.text(max_size=400))
    def test_output_has_no_control_or_format_character(self, text: str) -> None:
        out = untrusted(text)
        for ch in out:
            self.assertNotIn(unicodedata.category(ch), _ESCAPED)
        out.encode("utf-8")
        self.assertLessEqual(len(out), 10 * 256 + 1)

    @given(st.text(alphabet=st.characters(blacklist_categories=_ESCAPED), max_size=200))  # type: ignore[arg-type]
    def test_printable_text_survives_unchanged(self, text: str) -> None:
        self.assertEqual(untrusted(text.replace("\\", "")), text.replace("\\", ""))
