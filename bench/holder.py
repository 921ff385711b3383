"""
Idle connections for the memory benchmark, in separate processes so that
neither side's memory is mixed with NOVA's.

    python bench/holder.py serve
        Listen on a free loopback port (printed as "listening PORT"), send
        one byte on every accepted connection and hold it open until the
        peer closes.

    python bench/holder.py open --port PORT --count N [--concurrency C]
        Open N connections to PORT, each one complete only once the byte
        from the far end arrived through it; print "opened N" and hold them
        until the process is terminated.  Any failure is
        printed and the process exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
import time

LOOPBACK = "127.0.0.1"


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def serve() -> None:
    held = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held
        held += 1
        try:
            writer.write(b"x")
            await writer.drain()
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            held -= 1
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    await _until_terminated()
    server.close()


async def open_many(port: int, count: int, concurrency: int, timeout: float) -> int:
    writers: list[asyncio.StreamWriter] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(i: int) -> None:
        async with gate:
            if failures:
                return
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
                byte = await asyncio.wait_for(reader.readexactly(1), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                failures.append(f"connection {i}: {type(e).__name__}: {e}")
                return
            if byte != b"x":
                failures.append(f"connection {i}: got {byte!r}")
            writers.append(writer)

    await asyncio.gather(*(one(i) for i in range(count)))
    if failures:
        print(f"failed: {len(failures)} of {count} connections; first: {failures[0]}", flush=True)
        return 1
    print(f"opened {len(writers)} in {time.monotonic() - start:.2f}s", flush=True)
    await _until_terminated()
    for writer in writers:
        writer.close()
    return 0


async def _until_terminated() -> None:
    """Until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    opener = sub.add_parser("open")
    opener.add_argument("--port", type=int, required=True)
    opener.add_argument("--count", type=int, required=True)
    opener.add_argument("--concurrency", type=int, default=100)
    opener.add_argument("--timeout", type=float, default=60.0, help="seconds for each connection to complete")
    args = parser.parse_args(argv)
    _raise_nofile(65536)
    if args.command == "serve":
        asyncio.run(serve())
        return 0
    return asyncio.run(open_many(args.port, args.count, args.concurrency, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
