"""
The NOVA wire protocol, version 1, as specified in ``docs/protocol.md``,
and the SOCKS5 negotiation NOVAS speaks to its SOCKS clients (RFC 1928).

Everything in this package is pure: bytes in, frames out; frames in, bytes
out.  Nothing here imports Twisted or touches a socket or a clock.
"""
