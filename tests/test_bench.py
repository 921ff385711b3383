"""
The benchmark's quick mode as a smoke test: every figure of the table is
measured, NOVA beside ssh -R and the Go peer (TLS 1.3 + hashicorp/yamux,
built from bench/goyamux), and nothing breaks.  No timing is asserted
(bench/README.md: the bars are for full runs on a quiet machine).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "bench" / "run"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"bench/run --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    assert result["errors"] == []
    # test.sh installs golang-go and golang-github-hashicorp-yamux-dev: the Go peer is built, not skipped.
    assert result["skipped"] == {}, result["skipped"]
    rows = result["rows"]
    assert set(rows) == {
        "bulk", "rps", "p50", "p99", "churn", "bulk_p50", "bulk_p99", "bulk_during",
        "agent_rss", "stream_rss_novas", "stream_rss_novac", "storm", "register",
    }  # fmt: skip
    for key, row in rows.items():
        assert row["error"] is None, f"{key}: {row['error']}"
        assert isinstance(row["nova"], float | int) and math.isfinite(row["nova"]) and row["nova"] > 0, (key, row)
        if row["bar_kind"].startswith("ratio") or key in ("p99", "bulk_p50", "bulk_p99", "bulk_during"):
            # Side by side: ssh -R and the Go peer measured in the same run, and NOVA's ratio to each.
            for peer, ratio in (("ssh", "ratio"), ("go", "ratio_go")):
                assert isinstance(row[peer], float | int) and row[peer] > 0, (key, peer, row)
                assert math.isclose(row[ratio], row["nova"] / row[peer], rel_tol=1e-9), (key, peer, row)
        else:
            assert row["ssh"] is None and row["go"] is None, (key, row)
        assert row["result"] in ("pass", "FAIL", "-"), (key, row)
        assert all(bar["passed"] in (True, False) for bar in row["bars"]), (key, row)
    # The brief's bars: new connections against both peers, latency against the Go peer.
    assert [(bar["peer"], bar["limit"]) for bar in rows["churn"]["bars"]] == [("ssh", 20.0), ("go", 1.0)]
    assert [(bar["peer"], bar["limit"]) for bar in rows["p50"]["bars"]] == [("go", 0.9)]
    # The one table, printed with every figure's label.
    for row in rows.values():
        assert row["label"] in proc.stdout
    header = [cell.strip() for cell in proc.stdout.splitlines()[0].split("|")]
    assert {"NOVA", "ssh -R", "Go", "NOVA/ssh", "NOVA/Go"} <= set(header), header
    # The shaped-link profiles and the 10,000 agents take minutes: not part of --quick.
    assert not any(key.startswith("rtt") for key in rows)
    # Nor is the cluster (three servers, PostgreSQL, HAProxy, minutes of discovery).
    assert not any(key.startswith("cluster_") for key in rows)
    assert not any(key.endswith("_big") for key in rows)


def _bench_module(name: str) -> Any:
    """A module of bench/ (not a package: its files import each other by plain name)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _report() -> Any:
    return _bench_module("report")


def test_row_with_bars_against_ssh_and_go_passes_only_when_both_are_met() -> None:
    report = _report()
    bars = (
        report.Bar(report.BarKind.RATIO_AT_LEAST, 10.0, peer="ssh"),
        report.Bar(report.BarKind.RATIO_AT_LEAST, 1.0, peer="go"),
    )
    row = report.Row("churn", "new conns/s", "conn/s", bars, nova=2000.0, ssh=100.0, go=2500.0)
    assert row.ratio == 20.0 and row.ratio_to("go") == 0.8
    assert row.results() == [True, False] and row.result == "FAIL"
    row.go = 1500.0
    assert row.result == "pass"
    # The Go peer not measured here (no go): its bar cannot be judged, the row is not a pass.
    skipped = report.Row("churn", "new conns/s", "conn/s", bars, nova=2000.0, ssh=100.0, skipped={"go": "no go"})
    assert skipped.results() == [True, None] and skipped.result == "n/a"
    assert "skipped" in report.table([skipped])
    data = skipped.as_dict()
    assert data["go"] is None and data["ratio_go"] is None and data["bar"] == ">= 10x ssh, >= 1x Go"
    # A figure with an absolute bar and no peer (memory) ignores the peers' columns.
    alone = report.Row("rss", "RSS", "KiB", (report.Bar(report.BarKind.AT_MOST, 10, "KiB"),), (), nova=4.0, ssh=9.0)
    assert alone.result == "pass" and alone.as_dict()["ssh"] is None


def test_spread_takes_ratios_per_run_and_marks_runs_that_did_not_measure_a_figure(tmp_path: Path) -> None:
    spread = _bench_module("spread")

    def run(date: str, nova: float, ssh: float, *, storm: bool) -> dict[str, Any]:
        rows = {
            "bulk": {
                "label": "bulk",
                "unit": "Gbit/s",
                "nova": nova,
                "ssh": ssh,
                "go": None,
                "ratio": nova / ssh,
                "ratio_go": None,
                "bar": ">= 1x ssh",
                "result": "pass" if nova >= ssh else "FAIL",
                "error": None,
            }
        }
        if storm:
            rows["storm"] = {
                "label": "storm",
                "unit": "s",
                "nova": 3.0,
                "ssh": None,
                "go": None,
                "ratio": None,
                "ratio_go": None,
                "bar": "<= 10 s",
                "result": "pass",
                "error": None,
            }
        return {
            "date": date,
            "seconds": 60,
            "command": "bench/run",
            "machine": {"loadavg": "1.00 1.00 1.00"},
            "rows": rows,
        }

    # A busy run halves both NOVA and ssh: the ratio, per run, does not move.
    (tmp_path / "a.json").write_text(json.dumps(run("2026-12-06T02:00", 2.0, 4.0, storm=True)))
    (tmp_path / "b.json").write_text(json.dumps({"runs": [run("2026-12-06T01:00", 4.0, 8.0, storm=False)]}))
    runs = spread.load([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["date"] for r in runs] == ["2026-12-06T01:00", "2026-12-06T02:00"]  # oldest first
    bulk, storm = spread.rows(runs)
    assert bulk[2] == "3.00 (2.00\u20134.00)" and bulk[5] == "0.50x"
    assert bulk[-1] == "FAIL FAIL"
    assert storm[2] == "3.00" and storm[-1] == "· pass"  # measured by the second run only
    assert "load average at start 1.00 1.00 1.00" in spread.describe(runs)


def test_opcount_counts_bytecodes_and_calls_by_package_and_function(tmp_path: Path) -> None:
    # bench/opcount.py, which bench/cpu.py --opcodes runs NOVAS and NOVAC
    # under: a run with three times the work counts three times the calls
    # of the function doing it, and more of its bytecodes in proportion.
    package = tmp_path / "nova"  # counted as the "nova" package: its path has /nova/
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "work.py").write_text(
        "import sys\n"
        "def step(n):\n"
        "    total = 0\n"
        "    for i in range(n):\n"
        "        total += i\n"
        "    return total\n"
        "if __name__ == '__main__':\n"
        "    for _ in range(int(sys.argv[1])):\n"
        "        step(10)\n"
    )
    counts = []
    for runs in (10, 30):
        out = tmp_path / f"counts-{runs}.json"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "opcount.py"), str(out), "-m", "nova.work", str(runs)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        counts.append(json.loads(out.read_text()))
    step = [next(v for k, v in c["functions"].items() if k.startswith("nova step work.py:")) for c in counts]
    assert [calls for _, calls in step] == [10, 30]
    assert step[1][0] == 3 * step[0][0] > 0  # the same bytecodes per call, exactly
    assert counts[1]["packages"]["nova"]["calls"] - counts[0]["packages"]["nova"]["calls"] == 20
    assert (ROOT / "bench" / "cpu.py").read_text().count("opcount.py") == 1  # what --opcodes runs
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(ROOT / "bench" / "opcount.py")], check=True, capture_output=True)
