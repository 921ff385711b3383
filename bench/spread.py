"""
The spread of several runs: one table of every figure over the C{--json}
files of several C{bench/run} runs (RESULTS.md's "range over the runs").

    python bench/spread.py RUN1.json RUN2.json ...

Each cell is the median, then the range, over the runs that measured the
figure; ratios are taken per run (NOVA and its peer under the same load) and
then summarised, so a busy run does not flatter or sink a ratio.  The last
column says, run by run, whether the figure met its bar.  A file may also be
an object with a C{runs} list (the shape of C{RESULTS-*.json}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from report import _number
from suite import Params, make_rows

Run = dict[str, Any]
COLUMNS = ("nova", "ssh", "go", "ratio", "ratio_go")
HEADER = ["figure", "unit", "NOVA", "ssh -R", "Go", "NOVA/ssh", "NOVA/Go", "bar", "per run"]


def load(paths: Iterable[Path]) -> list[Run]:
    """Every run in C{paths}, oldest first, judged against today's bars (L{rejudge})."""
    runs: list[Run] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.extend(data["runs"] if "runs" in data else [data])
    for run in runs:
        rejudge(run)
    return sorted(runs, key=lambda run: str(run.get("date", "")))


def rejudge(run: Run) -> None:
    """
    Judge a run's figures against the bars C{suite.py} sets today, so runs
    recorded before a bar changed are summarised alike.  A run without its
    parameters (or with ones this version does not know) keeps its own.
    """
    try:
        current = make_rows(Params(**run["params"]))
    except (KeyError, TypeError):
        return
    for key, data in run.get("rows", {}).items():
        row = current.get(key)
        if row is None:
            continue
        row.nova, row.ssh, row.go, row.error = data.get("nova"), data.get("ssh"), data.get("go"), data.get("error")
        data["bar"], data["result"] = row.bar_text, row.result


def summary(values: Sequence[float], ratio: bool = False) -> str:
    """C{median (min to max)}; one value alone; C{-} for none."""
    if not values:
        return "-"

    def fmt(v: float) -> str:
        return f"{v:.2f}x" if ratio else _number(v)

    if len(values) == 1:
        return fmt(values[0])
    low, mid, high = min(values), statistics.median(values), max(values)
    if fmt(low) == fmt(high):
        return fmt(mid)
    return f"{fmt(mid)} ({fmt(low)}\u2013{fmt(high)})"


def rows(runs: Sequence[Run]) -> list[list[str]]:
    """The table's rows: every figure any run measured, in the order the runs list them."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.get("rows", {}) if k not in keys)
    out = []
    for key in keys:
        seen = [run["rows"][key] for run in runs if key in run.get("rows", {})]
        first = seen[0]
        cells = [first["label"], first["unit"]]
        for column in COLUMNS:
            values = [r[column] for r in seen if r.get(column) is not None and r.get("error") is None]
            cells.append(summary(values, ratio=column.startswith("ratio")))
        results = [run["rows"][key]["result"] if key in run.get("rows", {}) else "·" for run in runs]
        cells.append(first["bar"])
        cells.append(" ".join(results))
        out.append(cells)
    return out


def markdown(table: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---|--:|--:|--:|--:|--:|---|---|"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in table)
    return "\n".join(lines)


def describe(runs: Sequence[Run]) -> str:
    """One line a run: when, how long, what it ran, what broke."""
    lines = []
    for i, run in enumerate(runs, 1):
        load = run.get("machine", {}).get("loadavg")
        broken = len(run.get("errors", []))
        lines.append(
            f"{i}. {run.get('date', '?')}, {run.get('seconds', 0):.0f} s, `{run.get('command', '?')}`"
            + (f", load average at start {load}" if load else "")
            + (f", {broken} broken" if broken else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path, help="--json outputs of bench/run")
    args = parser.parse_args(argv)
    runs = load(args.files)
    print(describe(runs))
    print()
    print(markdown(rows(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
