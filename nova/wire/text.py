"""
Text that a peer chose (a GOAWAY or OPEN_FAIL message, a claimed agent name,
a SOCKS domain, a tag value) made safe to put in a log line or an audit
record.

A raw carriage return or newline would let a peer forge log lines; a bidi
override would make a line read differently from what it says; a NUL can cut
a record short in some stores.  So every character that is not plainly
printable is written as an escape (``\\r``, ``\\x00``, ``\\u202e``), a
backslash as two, and the text is cut to a bound.  The result is ASCII-safe
in the sense that matters here: what a reader sees is what the bytes say.
"""

from __future__ import annotations

import unicodedata

# Unicode categories escaped: controls (C0, DEL, C1), format characters
# (bidi embeddings, overrides and isolates, zero-width joiners and marks),
# lone surrogates, private use, unassigned, and line/paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}

DEFAULT_LIMIT = 256


def _escape(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def untrusted(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """
    C{text} with every control, format or separator character escaped and
    at most C{limit} characters of the original kept (an ellipsis marks a cut).
    """
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text + "…" if cut else text  # the common case: nothing to escape
    out = [_escape(ch) if ch in _SHORT or unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch for ch in text]
    return "".join(out) + ("…" if cut else "")


def has_controls(text: str) -> bool:
    """True if C{text} holds any character L{untrusted} would escape (a backslash aside)."""
    return any(unicodedata.category(ch) in _ESCAPED_CATEGORIES for ch in text)
