"""The captions scale benchmark at its `--smoke` size: it runs every part, writes its JSON and its line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.component
def test_captions_scale_smoke(tmp_path):
    out = tmp_path / "captions_scale.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "captions_scale.py"), "--smoke", "--out", str(out),
                           "--tmp", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert any(line.startswith("captions_scale: smoke ") for line in proc.stdout.splitlines()), proc.stdout
    report = json.loads(out.read_text())
    assert report["ledger"][0]["taken"] == report["paper_counts"]["num_captions"] == 4000
    assert report["ledger_file"]["row_groups"] == report["paper_counts"]["num_partitions"]  # one per partition
    assert report["growth"]["read"] == "incremental" and report["growth"]["rows_read"] == 22_000
    assert report["floor"][0]["sampled"] == 4000 and report["stage"]["rss_mb"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the synthetic source and the output roots are gone
