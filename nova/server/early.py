"""
What a user's connection sends while its stream is being opened.

Version 2 with C{FEATURE_EARLY_DATA} (protocol.md §7.2) lets the server send a
stream's first bytes right after its OPEN, so a client that speaks first (an
HTTP request, a PostgreSQL startup packet, a Redis command) does not wait a
round trip to the agent before its first byte moves.  An entry connection
(a route) keeps what it read in an L{EarlyData} while the endpoint opens its
stream:

 - a tunnel whose agent takes early data I{attaches} to it (L{attach}): it is
   handed what was read so far and everything read after, and the entry
   connection reads while less than L{EARLY_DATA_BUDGET} bytes were read;
 - an attempt that fails I{detaches} (L{detach}): reading pauses, and the
   bytes stay here for the next agent the endpoint tries;
 - a tunnel without the feature never attaches: the entry connection stays
   paused until OPEN_OK, exactly as with version 1, and writes what an earlier
   attempt read (if any) once the stream is open (L{unsent}).

The budget bounds what one opening connection makes the server hold, as the
core's rule bounds what the agent holds.
"""

from __future__ import annotations

from collections.abc import Callable

from nova.wire.frames import EARLY_DATA_BUDGET


class EarlyData:
    """
    The bytes a user's connection sent before its stream was open.

    @param pause: stop reading from the user's connection.
    @param resume: read from it again.
    @param read_now: read what the user's connection has received already,
        at once (into L{write}), rather than on the reactor's next turn.
    """

    def __init__(
        self,
        pause: Callable[[], None],
        resume: Callable[[], None],
        budget: int = EARLY_DATA_BUDGET,
        read_now: Callable[[], None] | None = None,
    ) -> None:
        self._pause = pause
        self._resume = resume
        self._read_now = read_now
        self.budget = budget
        self._chunks: list[bytes] = []
        self.size = 0
        self._sink: Callable[[bytes], None] | None = None

    @property
    def attached(self) -> bool:
        """Whether the current attempt's tunnel has taken everything read so far."""
        return self._sink is not None

    def attach(self, sink: Callable[[bytes], None]) -> None:
        """A tunnel that sends data after OPEN takes what was read, and what will be."""
        self._sink = sink
        if self._chunks:
            sink(b"".join(self._chunks))
        if self.size < self.budget:
            self._resume()
            if self._read_now is not None:
                # The tunnel writes its OPEN after this: bytes the user sent
                # with the connection (most clients speak first) go out in
                # the same write, one TLS record and one send, not the next.
                self._read_now()

    def detach(self) -> None:
        """The attempt is over: stop reading; keep the bytes for another attempt."""
        if self._sink is not None:
            self._sink = None
            self._pause()

    def write(self, data: bytes) -> None:
        """The user's connection sent C{data} before its stream was open."""
        self._chunks.append(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink(data)
        if self.size >= self.budget:
            self._pause()

    def unsent(self) -> bytes:
        """
        The stream is open: what its tunnel did not take (everything, when
        it did not attach), to be written to the stream first.  Forgets it all.
        """
        data = b"" if self._sink is not None else b"".join(self._chunks)
        self._chunks = []
        self._sink = None
        return data
