"""Every benchmark runs at its `--smoke` size, so none can rot: it exits 0, writes its JSON, prints its line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.component
@pytest.mark.parametrize(
    "bench, keys",
    [
        ("text_throughput", {"speedup_per_item", "captions_answered_twice"}),
        ("render_throughput", {"throughput", "unet_calls", "goals", "p_branching"}),
        ("judge_throughput", {"speedup_per_item", "samples_judged_twice"}),
        (
            "world_pass_rates",
            {
                "by_kind",
                "p_branching",
                "equal_error_thresholds",
                "ip2p_minus_none_clip_sim_image",
                "sharing",
                "early_rejection",
            },
        ),
    ],
)
def test_benchmark_smoke(tmp_path, bench, keys):
    out = tmp_path / f"{bench}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{bench}.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert any(line.startswith(f"{bench}: ") for line in proc.stdout.splitlines()), proc.stdout
    assert keys <= set(json.loads(out.read_text()))


@pytest.mark.component
def test_reliability_smoke_resumes_every_stage_byte_identical(tmp_path):
    out = tmp_path / "reliability.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reliability.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["all_identical"], proc.stdout[-3000:]
    from tasks import registry

    assert [s["stage"] for s in report["stages"]] == list(registry.STAGES)
    assert all(s["kills"] == s["identical"] == 2 for s in report["stages"])
