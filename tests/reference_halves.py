"""
The reference for a stream's half machines: the read and write halves as
they were first written, as Automat machines (nova.mux.lifecycle now runs
them from transition tables, READ_HALF and WRITE_HALF, which cost a
fraction per input).  tests/test_lifecycle_halves.py checks the tables
against these, input sequence by input sequence.
"""

from __future__ import annotations

from automat import TypeMachineBuilder

from nova.mux.lifecycle import HalvesCore, ReadHalf, StreamHalvesHooks, WriteHalf

_reads = TypeMachineBuilder(ReadHalf, HalvesCore)
Reading = _reads.state("Reading")
PeerEnded = _reads.state("PeerEnded")
Dropping = _reads.state("Dropping")
ReadDone = _reads.state("ReadDone")
ReadGone = _reads.state("ReadGone")


@Reading.upon(ReadHalf.peer_ended).to(PeerEnded)
@Dropping.upon(ReadHalf.peer_ended).loop()
def _peer_ended(half: ReadHalf, core: HalvesCore) -> None:
    core.eof_due = True


@Reading.upon(ReadHalf.drop).to(Dropping)
@PeerEnded.upon(ReadHalf.drop).to(Dropping)
def _drop(half: ReadHalf, core: HalvesCore) -> None:
    core.dropping = True


@PeerEnded.upon(ReadHalf.all_delivered).to(ReadDone)
def _eof(half: ReadHalf, core: HalvesCore) -> None:
    core.eof_due = False
    core.read_over = True
    core.hooks.read_closed()
    if core.write_over:
        core.hooks.finish(cut=False)


@Dropping.upon(ReadHalf.all_delivered).to(ReadDone)
def _dropped_to_eof(half: ReadHalf, core: HalvesCore) -> None:
    core.eof_due = False
    core.read_over = True
    if core.write_over:
        core.hooks.finish(cut=False)


@Reading.upon(ReadHalf.gone).to(ReadGone)
@PeerEnded.upon(ReadHalf.gone).to(ReadGone)
@Dropping.upon(ReadHalf.gone).to(ReadGone)
@ReadDone.upon(ReadHalf.gone).to(ReadGone)
def _read_gone(half: ReadHalf, core: HalvesCore) -> None:
    core.eof_due = False


@PeerEnded.upon(ReadHalf.peer_ended).loop()
@ReadDone.upon(ReadHalf.peer_ended).loop()
@ReadDone.upon(ReadHalf.drop).loop()
@Dropping.upon(ReadHalf.drop).loop()
@Reading.upon(ReadHalf.all_delivered).loop()
@ReadDone.upon(ReadHalf.all_delivered).loop()
@ReadGone.upon(ReadHalf.peer_ended).loop()
@ReadGone.upon(ReadHalf.all_delivered).loop()
@ReadGone.upon(ReadHalf.drop).loop()
@ReadGone.upon(ReadHalf.gone).loop()
def _read_ignored(half: ReadHalf, core: HalvesCore) -> None:
    pass


_writes = TypeMachineBuilder(WriteHalf, HalvesCore)
Writing = _writes.state("Writing")
Ending = _writes.state("Ending")
Closing = _writes.state("Closing")
WriteDone = _writes.state("WriteDone")
WriteGone = _writes.state("WriteGone")


@Writing.upon(WriteHalf.end).to(Ending)
def _end(half: WriteHalf, core: HalvesCore) -> None:
    core.can_write = False
    core.hooks.send_fin()


@Writing.upon(WriteHalf.close).to(Closing)
def _close(half: WriteHalf, core: HalvesCore) -> None:
    core.can_write = False
    core.hooks.send_fin()


@Ending.upon(WriteHalf.close).to(Closing)
def _close_ending(half: WriteHalf, core: HalvesCore) -> None:
    pass


@Ending.upon(WriteHalf.fin_sent).to(WriteDone)
def _fin_sent(half: WriteHalf, core: HalvesCore) -> None:
    core.write_over = True
    core.hooks.write_closed()
    if core.read_over:
        core.hooks.finish(cut=False)


@Closing.upon(WriteHalf.fin_sent).to(WriteGone)
def _closed(half: WriteHalf, core: HalvesCore) -> None:
    core.write_over = True
    core.hooks.finish(cut=not core.read_over)


@WriteDone.upon(WriteHalf.close).to(WriteGone)
def _close_done(half: WriteHalf, core: HalvesCore) -> None:
    core.hooks.finish(cut=not core.read_over)


@Writing.upon(WriteHalf.gone).to(WriteGone)
@Ending.upon(WriteHalf.gone).to(WriteGone)
@Closing.upon(WriteHalf.gone).to(WriteGone)
@WriteDone.upon(WriteHalf.gone).to(WriteGone)
def _write_gone(half: WriteHalf, core: HalvesCore) -> None:
    core.can_write = False


@Writing.upon(WriteHalf.fin_sent).loop()
@Ending.upon(WriteHalf.end).loop()
@Closing.upon(WriteHalf.end).loop()
@Closing.upon(WriteHalf.close).loop()
@WriteDone.upon(WriteHalf.end).loop()
@WriteDone.upon(WriteHalf.fin_sent).loop()
@WriteGone.upon(WriteHalf.end).loop()
@WriteGone.upon(WriteHalf.close).loop()
@WriteGone.upon(WriteHalf.fin_sent).loop()
@WriteGone.upon(WriteHalf.gone).loop()
def _write_ignored(half: WriteHalf, core: HalvesCore) -> None:
    pass


_build_read = _reads.build()
_build_write = _writes.build()


def start_halves(hooks: StreamHalvesHooks) -> tuple[HalvesCore, ReadHalf, WriteHalf]:
    """A new stream's two halves, both open, as Automat machines."""
    core = HalvesCore(hooks)
    return core, _build_read(core), _build_write(core)
