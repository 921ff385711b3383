"""
The functions a py-spy profile spent its samples in, from the collapsed
stacks that C{bench/run --profile DIR} writes (C{DIR/*.folded}).

    python bench/profile_top.py DIR/rps-novas.folded [--top 25]

Prints each function's share of all samples: "self" where it was the
innermost frame (the time spent in it), "total" where it was anywhere on the
stack (in it or in what it called).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy frames look like "name (path/to/file.py:LINE)"; the line differs
# from sample to sample, so functions are keyed without it.
_LINE = re.compile(r":\d+\)$")


def load(path: Path) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_LINE.sub(")", f) for f in stack.split(";") if f]
        # The thread's name leads some stacks ("process 123:..."): not a function.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return own, total, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("folded", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.folded:
        own, total, samples = load(path)
        print(f"{path}: {samples} samples")
        if not samples:
            continue
        print(f"{'self':>6} {'total':>6}  function")
        for frame, n in own.most_common(args.top):
            print(f"{100 * n / samples:5.1f}% {100 * total[frame] / samples:5.1f}%  {frame}")
        print()


if __name__ == "__main__":
    main()
