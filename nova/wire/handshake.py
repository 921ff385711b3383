"""
The registration handshake's cryptography and validation (protocol.md §4).

The agent proves it knows the shared token without sending it: it MACs the
server's fresh nonce, the TLS channel binding and the rest of its AUTH frame.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from .frames import FEATURE_NONE, MAC_SIZE, MAX_VERSION, MAX_WINDOW, MIN_INITIAL_WINDOW, NONCE_SIZE, VERSION, Auth

EXPORTER_LABEL = b"EXPORTER-nova-channel-binding"
BINDING_SIZE = 32
_CONTEXT = b"nova-auth-v1\x00"

MAX_TAGS = 32
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
_TAG_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")
_TAG_VALUE_FORBIDDEN = re.compile(r"[;=,\x00-\x1f\x7f-\x9f]")


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def auth_mac(token: bytes, nonce: bytes, binding: bytes, body: bytes) -> bytes:
    return hmac.new(token, _CONTEXT + nonce + binding + body, hashlib.sha256).digest()


def make_auth(
    token: bytes,
    nonce: bytes,
    binding: bytes,
    name: str,
    tags: tuple[tuple[str, str], ...],
    initial_window: int,
    version: int = 1,
    features: int = FEATURE_NONE,
) -> Auth:
    """The AUTH of C{version} (its layout; version 2 adds C{features}, MACed with the rest)."""
    unsigned = Auth(b"\x00" * MAC_SIZE, initial_window, name, tags, version, features)
    return Auth(auth_mac(token, nonce, binding, unsigned.body()), initial_window, name, tags, version, features)


def negotiated_version(offer: int, speaks: int = MAX_VERSION) -> int:
    """
    The version a tunnel runs (protocol.md §4.2): the lower of the server's
    offer in HELLO and the highest this side speaks.  A version-1 server
    offers nothing (0), which is version 1.
    """
    return max(VERSION, min(offer, speaks))


def verify_auth(token: bytes, nonce: bytes, binding: bytes, auth: Auth) -> bool:
    """Constant-time check of an AUTH frame's MAC."""
    expected = auth_mac(token, nonce, binding, auth.body())
    return hmac.compare_digest(expected, auth.mac)


def _utf8_len(text: str) -> int | None:
    """Length in UTF-8, or None for text that has no UTF-8 form (lone surrogates)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def name_problem(name: str) -> str | None:
    """Why C{name} is not a valid agent name, or None if it is."""
    if _NAME.fullmatch(name) is None or (_utf8_len(name) or 64) > 63:
        return "agent name must be 1-63 characters of A-Z a-z 0-9 . _ - and not start with . or -"
    return None


def tags_problem(tags: tuple[tuple[str, str], ...]) -> str | None:
    """Why C{tags} are not acceptable, or None if they are."""
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} tags are allowed"
    seen: set[str] = set()
    for key, value in tags:
        if not _TAG_KEY.fullmatch(key):
            return f"tag key {key!r} must be 1-63 characters of A-Z a-z 0-9 . _ / -"
        if key in seen:
            return f"tag key {key!r} is given twice"
        seen.add(key)
        size = _utf8_len(value)
        if size is None or size > 255 or _TAG_VALUE_FORBIDDEN.search(value):
            return f"tag {key!r} has a value that is too long or contains ; = , or control characters"
    return None


def window_problem(window: int) -> str | None:
    if not MIN_INITIAL_WINDOW <= window <= MAX_WINDOW:
        return f"initial window must be between {MIN_INITIAL_WINDOW} and {MAX_WINDOW}"
    return None
