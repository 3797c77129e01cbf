"""CPU smoke of bench/gpu/checks.py (the GPU checks of issue 4): every check has a result or a skip reason."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("env", "dtype", "auto_batch", "oom", "compile")


@pytest.mark.component
def test_gpu_checks_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_checks.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu" / "checks.py"),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--steps",
            "3",
            "--samples",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("gpu_checks: ") and "->" in line]
    assert summary, proc.stdout

    result = json.loads(out.read_text())
    checks = result["checks"]
    assert set(checks) == set(CHECKS)
    for name in CHECKS:
        entry = checks[name]
        assert "error" not in entry, (name, entry.get("error"), entry.get("traceback"))
        assert "seconds" in entry
    for name in ("auto_batch", "oom", "compile"):  # memory, OOM and compile need CUDA
        assert checks[name]["skipped"].startswith("cpu"), checks[name]

    assert checks["env"]["torch"] and checks["env"]["gpu"] is None
    dtype = checks["dtype"]
    for name in ("float32", "float16", "bfloat16"):
        assert "error" not in dtype[name], dtype[name]
        assert dtype[name]["finite"] is True
        assert dtype[name]["effective_dtype"] == "float32"  # the Renderer runs float32 on CPU
    for name in ("float16", "bfloat16"):
        assert dtype[name]["weights_match_float32"] is True
        assert math.isfinite(dtype[name]["max_abs_pixel_diff"])
        assert dtype[name]["max_abs_pixel_diff"] <= 1e-5  # same dtype on CPU, same weights, same seeds
        assert set(dtype[name]["max_abs_clip_metric_diff"]) == {
            "clip_sim_0",
            "clip_sim_1",
            "clip_sim_dir",
            "clip_sim_image",
        }
    assert result["summary"] in summary[-1]
