"""
Run a Python program and count, by package, the bytecode instructions its
frames execute and the Python calls it makes: a measure of interpreter work
that, unlike a timed profile, does not depend on the machine's load.

    python bench/opcount.py OUT.json -m twisted novas ...

Counting uses C{sys.settrace} with opcode events (every thread), so the
program runs many times slower; the counts are written to C{OUT.json} at
exit (the program must exit normally: twist does on SIGTERM).  Used by
C{bench/cpu.py --opcodes}, which subtracts a run without requests from a
run with them.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import threading
from types import CodeType, FrameType
from typing import Any

PACKAGES = ("nova", "twisted", "OpenSSL")

# package -> [opcodes, calls]
_counts: dict[str, list[int]] = {}
_tracers: dict[CodeType, Any] = {}


def package_of(filename: str) -> str:
    for package in PACKAGES:
        if f"/{package}/" in filename:
            return package
    return "other"


# code object -> [opcodes, calls], for the breakdown by function
_functions: dict[CodeType, list[int]] = {}


def _local_for(code: CodeType) -> tuple[Any, list[int], list[int]]:
    package = _counts.setdefault(package_of(code.co_filename), [0, 0])
    function = _functions.setdefault(code, [0, 0])

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            package[0] += 1
            function[0] += 1
        return local

    return local, package, function


def _global(frame: FrameType, event: str, arg: object) -> Any:
    code = frame.f_code
    entry = _tracers.get(code)
    if entry is None:
        entry = _tracers[code] = _local_for(code)
    local, package, function = entry
    package[1] += 1
    function[1] += 1
    frame.f_trace_lines = False
    frame.f_trace_opcodes = True
    return local


def _write(path: str) -> None:
    sys.settrace(None)
    threading.settrace(None)
    functions = {
        f"{package_of(code.co_filename)} {code.co_name} {code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}": c
        for code, c in list(_functions.items())
    }
    with open(path, "w") as f:
        packages = {p: {"opcodes": c[0], "calls": c[1]} for p, c in list(_counts.items())}
        json.dump({"packages": packages, "functions": functions}, f)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: opcount.py OUT.json -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    atexit.register(_write, out)
    threading.settrace(_global)
    sys.settrace(_global)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
