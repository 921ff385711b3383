"""
Control-frame floods against real processes (issue 14, defect 2): a peer
that sends frames needing an answer (PING) as fast as it can and never reads
the answers must not grow the other side's memory, and must not disturb
anyone else; honest bulk DATA both ways through one tunnel must never stall.
"""

from __future__ import annotations

from nova.wire.frames import Ping, encode

# How long each flood runs, and how much the flooded process may grow over
# it.  Before the fix NOVAS grew by about 6 MiB/s under one flooder.
FLOOD_SECONDS = 12.0
RSS_BOUND_KIB = 16 * 1024

# A burst of PINGs, sent in one piece: 1,000 frames of 20 bytes.
PINGS = b"".join(b"".join(encode(Ping(i.to_bytes(8, "big")))) for i in range(1000))
