"""
The benchmark's quick mode as a smoke test: every figure of the table is
measured, NOVA beside ssh -R and the Go peer (TLS 1.3 + hashicorp/yamux,
built from bench/goyamux), and nothing breaks.  No timing is asserted
(bench/README.md: the bars are for full runs on a quiet machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
        "agent_rss", "stream_rss_novas", "stream_rss_novac", "storm",
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
    # The bars against the Go peer are in the table beside those against ssh -R.
    assert {bar["peer"] for bar in rows["churn"]["bars"]} == {"ssh", "go"}
    assert {bar["peer"] for bar in rows["p50"]["bars"]} == {"ssh", "go"}
    # The one table, printed with every figure's label.
    for row in rows.values():
        assert row["label"] in proc.stdout
    header = [cell.strip() for cell in proc.stdout.splitlines()[0].split("|")]
    assert {"NOVA", "ssh -R", "Go", "NOVA/ssh", "NOVA/Go"} <= set(header), header
    # The shaped-link profiles take minutes: not part of --quick.
    assert not any(key.startswith("rtt") for key in rows)
