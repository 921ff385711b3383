"""
The benchmark's quick mode as a smoke test: every figure of the table is
measured, NOVA beside ssh -R, and nothing breaks.  No timing is asserted
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
    rows = result["rows"]
    assert set(rows) == {
        "bulk", "rps", "p50", "p99", "churn", "bulk_p50", "bulk_p99", "bulk_during",
        "agent_rss", "stream_rss_novas", "stream_rss_novac", "storm",
    }  # fmt: skip
    for key, row in rows.items():
        assert row["error"] is None, f"{key}: {row['error']}"
        assert isinstance(row["nova"], float | int) and math.isfinite(row["nova"]) and row["nova"] > 0, (key, row)
        if row["bar_kind"].startswith("ratio") or key in ("p99", "bulk_p50", "bulk_during"):
            # Side by side: ssh -R measured in the same run, and the ratio from both.
            assert isinstance(row["ssh"], float | int) and row["ssh"] > 0, (key, row)
            assert math.isclose(row["ratio"], row["nova"] / row["ssh"], rel_tol=1e-9), (key, row)
        assert row["result"] in ("pass", "FAIL", "-"), (key, row)
    # The one table, printed with every figure's label.
    for row in rows.values():
        assert row["label"] in proc.stdout
