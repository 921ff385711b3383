"""
Wire helpers and Hypothesis strategies shared by the tests: frames to bytes,
hand-made headers, arbitrary splits, and the strategies for the values a
frame carries.  A plain module rather than conftest fixtures, so that the
C{TestCase} suites use them under trial too.
"""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from nova.wire.errors import ErrorCode, OpenFailReason
from nova.wire.frames import HEADER, MAX_DATA_PAYLOAD, MAX_STREAM_ID, Frame, encode, max_payload


def wire(*frames: Frame) -> bytes:
    """The frames as they cross the wire, in one byte string."""
    return b"".join(b"".join(encode(f)) for f in frames)


def header(type_byte: int, stream_id: int, length: int, version: int = 1, flags: int = 0, reserved: int = 0) -> bytes:
    """A frame header with any field, valid or not (protocol.md §1)."""
    return HEADER.pack(version, type_byte, flags, reserved, stream_id, length)


def payload_size(frame: Frame) -> int:
    return sum(len(p) for p in frame.payload())


def fits(frame: Frame) -> bool:
    """The frame's payload is within its type's limit (encode would accept it)."""
    return payload_size(frame) <= max_payload(frame.TYPE)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    """C{blob} cut at C{cuts} (taken modulo its length, so any integers do)."""
    points = [0, *sorted(c % (len(blob) + 1) for c in cuts), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(points)]


u32 = st.integers(0, 2**32 - 1)
stream_ids = st.integers(1, MAX_STREAM_ID)
error_codes = st.sampled_from(ErrorCode)
reasons = st.sampled_from(OpenFailReason)
# A DATA payload of any size up to the maximum, cheap to draw even when large.
long_payloads = st.integers(1, MAX_DATA_PAYLOAD).map(lambda n: bytes(range(256)) * (n // 256) + b"\x07" * (n % 256))
