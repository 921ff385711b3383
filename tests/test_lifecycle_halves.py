"""
A stream's half machines (nova.mux.lifecycle: READ_HALF and WRITE_HALF,
run from transition tables rather than through Automat), checked against
the Automat machines they replaced (tests/reference_halves.py): the same
hooks asked in the same order and the same core fields after every input,
for every sequence of up to four inputs and for longer random ones, with
inputs fed from inside an output (as a protocol that closes the stream at
EOF does) and without.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from nova.mux.lifecycle import READ_HALF, WRITE_HALF, HalvesCore, ReadHalf, StreamHalvesHooks, WriteHalf, start_halves

from . import reference_halves

READ_INPUTS = ("peer_ended", "all_delivered", "drop", "gone")
WRITE_INPUTS = ("end", "close", "fin_sent", "gone")
INPUTS = [("read", name) for name in READ_INPUTS] + [("write", name) for name in WRITE_INPUTS]
# What a stream's protocol may do when told of EOF: close the stream at once.
CLOSES_AT_EOF = [("read", "drop"), ("write", "close")]

Start = Callable[[StreamHalvesHooks], tuple[HalvesCore, ReadHalf, WriteHalf]]


class Hooks:
    """Records what the halves ask; at EOF it feeds C{reentrant} back, from inside the output."""

    def __init__(self, reentrant: list[tuple[str, str]]) -> None:
        self.asked: list[str] = []
        self.reentrant = reentrant
        self.read: ReadHalf | None = None
        self.write: WriteHalf | None = None

    def send_fin(self) -> None:
        self.asked.append("send_fin")

    def read_closed(self) -> None:
        self.asked.append("read_closed")
        for half, name in self.reentrant:
            getattr(self.read if half == "read" else self.write, name)()
        self.asked.append("read_closed returns")  # what was fed above has not run yet

    def write_closed(self) -> None:
        self.asked.append("write_closed")

    def finish(self, cut: bool) -> None:
        self.asked.append(f"finish cut={cut}")


def trace(start: Start, steps: list[tuple[str, str]], reentrant: list[tuple[str, str]]) -> list[object]:
    """After each input: everything asked so far and the core's fields."""
    hooks = Hooks(reentrant)
    core, read, write = start(hooks)
    hooks.read, hooks.write = read, write
    seen: list[object] = []
    for half, name in steps:
        getattr(read if half == "read" else write, name)()
        fields = (core.can_write, core.eof_due, core.dropping, core.read_over, core.write_over)
        seen.append((list(hooks.asked), fields))
    return seen


def test_every_state_has_a_row_for_every_input() -> None:
    for table, inputs, start in ((READ_HALF, READ_INPUTS, "Reading"), (WRITE_HALF, WRITE_INPUTS, "Writing")):
        states = {state for state, _ in table}
        assert start in states
        assert {next_state for next_state, _ in table.values()} <= states
        assert set(table) == {(state, name) for state in states for name in inputs}


def test_every_sequence_of_up_to_four_inputs_is_as_the_automat_machines_did() -> None:
    for length in range(5):
        for steps in itertools.product(INPUTS, repeat=length):
            for reentrant in ([], CLOSES_AT_EOF):
                expected = trace(reference_halves.start_halves, list(steps), reentrant)
                assert trace(start_halves, list(steps), reentrant) == expected, (steps, reentrant)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.sampled_from(INPUTS), max_size=16),
    reentrant=st.lists(st.sampled_from(INPUTS), max_size=3),
)
def test_longer_sequences_are_as_the_automat_machines_did(
    steps: list[tuple[str, str]], reentrant: list[tuple[str, str]]
) -> None:
    assert trace(start_halves, steps, reentrant) == trace(reference_halves.start_halves, steps, reentrant)


def test_an_input_fed_from_an_output_runs_after_it() -> None:
    # EOF reaches a protocol that closes the stream at once: the read half's
    # drop waits until the EOF's output is done (the write half, another
    # machine, takes its close at once and asks for the FIN).
    hooks = Hooks(CLOSES_AT_EOF)
    core, read, write = start_halves(hooks)
    hooks.read, hooks.write = read, write
    read.peer_ended()
    read.all_delivered()
    assert hooks.asked == ["read_closed", "send_fin", "read_closed returns"]
    assert core.read_over and not core.can_write and not core.dropping  # the drop came after EOF: nothing to drop
    write.fin_sent()
    assert hooks.asked == ["read_closed", "send_fin", "read_closed returns", "finish cut=False"]


def test_the_engine_postpones_an_input_fed_from_an_output_as_automat_does() -> None:
    # The halves' own outputs happen to give the same result either way; a
    # table where the order shows holds the engine to Automat's rule: the
    # state is already the next one while the output runs, and an input fed
    # from inside it runs after it, from that state.
    from nova.mux import lifecycle

    events: list[str] = []

    def first(half: object, core: HalvesCore) -> None:
        events.append(f"first sees {half.state}")  # type: ignore[attr-defined]
        half._input("second")  # type: ignore[attr-defined]
        events.append("first returns")

    def second(half: object, core: HalvesCore) -> None:
        events.append(f"second sees {half.state}")  # type: ignore[attr-defined]

    table: dict[tuple[str, str], tuple[str, lifecycle.HalfOutput]] = {
        ("A", "first"): ("B", first),
        ("B", "second"): ("C", second),
    }
    half = lifecycle._Half(HalvesCore(Hooks([])), table, "A")
    half._input("first")
    assert events == ["first sees B", "first returns", "second sees C"]
    assert half.state == "C"
