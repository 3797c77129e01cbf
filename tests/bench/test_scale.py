"""`bench/scale.py --smoke`: the orchestration rehearsal at 40 partitions per stage on moto's S3 server against
a real Prefect server, so it cannot rot, and the bounds it measures hold at that size (they do not grow
with it: the full run shows 50 to 1,000)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.component
def test_scale_smoke_on_s3(tmp_path):
    out = tmp_path / "scale.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--smoke", "--stores", "s3", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert any(line.startswith("scale: ") for line in proc.stdout.splitlines()), proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["store"] == "s3" and run["partitions"] == 6 * 40 + 1 and run["child_runs"] >= 31
    per = run["requests_per_completion"]
    assert per["child_dashboard_max"] <= 2 and per["dashboard_and_driver_mean"] <= 10, per
    assert run["poll"]["requests_max"] <= 200
    # Prefect's database per partition (bytes, counted): ~17.1 KB here (blocks of 8, INFO logs), 16.6 KB at 455
    # partitions per stage; a task run per partition again (~+35 KB) or the progress artifacts' client events
    # (~+5 KB) would fail this
    assert 0 < run["prefect_db"]["bytes_per_partition"] <= 20_000, run["prefect_db"]
    assert set(run["rss"]["driver_by_stage"]) == {
        "captions",
        "finetune",
        "text",
        "render",
        "judge",
        "filter",
        "pack",
    }
