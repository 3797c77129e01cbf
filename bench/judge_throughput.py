"""VLM-judge throughput: the judge stage with 64 requests in flight vs one at a time, in one run.

Both are the judge stage itself (`tasks.judge.stage.run`, checkpointing included) against the
OpenAI-compatible fake (`tests/fakes/openai_server.py`, a separate process on 127.0.0.1) answering vision
chat requests with an injected latency of 1-3 s each, about what a hosted VLM takes to grade two images.
The one-at-a-time run (`judges.vlm.concurrency=1`) judges a smaller sample (it is ~64x slower); the
ratio compares per-item rates (judged samples per second). The fake's request log is checked: no sample
may be judged twice, every candidate once.

    .venv/bin/python bench/judge_throughput.py [--candidates 512] [--sequential 8] [--concurrency 64]

Writes bench/results/judge_throughput.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.contract import figures
from tasks.common.layout import SAMPLES_FILE, image_name
from tasks.judge.stage import run as run_judge
from tasks.registry import partition_url, stage_hash

KEY_ENV = "EDITFORGE_BENCH_JUDGE_KEY"
API_KEY = "bench-judge-key"


def start_fake(latency: tuple[float, float]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/fakes/openai_server.py"),
            "--latency",
            str(latency[0]),
            str(latency[1]),
            "--api-key",
            API_KEY,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline().strip() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake OpenAI server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def fake_log(base_url: str) -> list[dict]:
    return httpx.get(base_url.removesuffix("/v1") + "/_fake/log", timeout=30).json()["requests"]


def png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def config(base_url: str, root: str, concurrency: int):
    return load_config(
        "demo",
        [
            f"output_root={root}",
            "judges.vlm.enabled=true",
            f"judges.vlm.base_url={base_url}",
            f"judges.vlm.api_key_env={KEY_ENV}",
            f"judges.vlm.concurrency={concurrency}",
            "judges.vlm.model=gpt-4o-mini",
            "judges.vlm.request_timeout_s=60",
        ],
    )


def render_partition(cfg, n: int, offset: int) -> None:
    """A finished render partition of ``n`` candidate pairs (stored noise images), as the judge reads it."""
    rng = np.random.default_rng(offset)
    keys = [f"{offset + i:016x}_0" for i in range(n)]
    df = pd.DataFrame(
        {
            "caption_id": [k.split("_")[0] for k in keys],
            "sample_key": keys,
            "seed": 0,
            "passed": True,
            "image_stored": True,
            "kept": True,
            "early_rejected": False,
            "input": "a photo of a house",
            "edit": [f"make house {i} snowy" for i in range(n)],
            "output": "a photo of a snowy house",
        }
    )
    folder = partition_url(cfg, "render")
    for key in keys:
        storage.write_bytes_atomic(storage.url_join(folder, image_name(key, "input")), png(rng))
        storage.write_bytes_atomic(storage.url_join(folder, image_name(key, "edited")), png(rng))
    storage.write_parquet_atomic(storage.url_join(folder, SAMPLES_FILE), df)
    storage.write_json_atomic(
        storage.url_join(folder, "_SUCCESS.json"), {"config_hash": stage_hash(cfg, "render")}
    )


def timed_judge(base_url: str, n: int, concurrency: int, offset: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as root:
        cfg = config(base_url, root, concurrency)
        render_partition(cfg, n, offset)
        start = time.perf_counter()
        manifest = run_judge(cfg, 0)
        return time.perf_counter() - start, manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=512, help="candidate pairs for the concurrent run")
    parser.add_argument("--sequential", type=int, default=8, help="candidate pairs judged one at a time")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, nargs=2, default=(1.0, 3.0), metavar=("LO", "HI"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/judge_throughput.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long size for the test suite (figures mean little)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.candidates, args.sequential, args.concurrency, args.latency = 24, 3, 8, (0.02, 0.05)
    os.environ[KEY_ENV] = API_KEY

    proc, base_url = start_fake(tuple(args.latency))
    try:
        seq_s, seq_manifest = timed_judge(base_url, args.sequential, 1, offset=10_000_000)
        conc_s, manifest = timed_judge(base_url, args.candidates, args.concurrency, offset=0)
        log = fake_log(base_url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    judged = Counter(r["judge"] for r in log if r.get("judge") and r["status"] == 200)
    twice = sum(1 for n in judged.values() if n > 1)
    seq_rate, conc_rate = args.sequential / seq_s, args.candidates / conc_s
    mean_latency = sum(args.latency) / 2
    result = {
        "benchmark": "judge_throughput",
        "fake_latency_s": list(args.latency),
        "sequential": {
            "candidates": args.sequential,
            "concurrency": 1,
            "wall_s": round(seq_s, 3),
            "judged_per_s": round(seq_rate, 3),
            "counts": seq_manifest["counts"],
        },
        "concurrent": {
            "candidates": args.candidates,
            "concurrency": args.concurrency,
            "wall_s": round(conc_s, 3),
            "judged_per_s": round(conc_rate, 3),
            "judge_s": manifest["timings_s"].get("judge"),
            "ideal_judged_per_s": round(args.concurrency / mean_latency, 3),
            "counts": manifest["counts"],
            "rejected": manifest["rejected"],
            "vlm_cost_usd": figures(manifest).get("vlm_cost_usd"),
            "vlm_cost_per_judged_usd": figures(manifest).get("vlm_cost_per_judged_usd"),
        },
        "speedup_per_item": round(conc_rate / seq_rate, 2),
        "ideal_speedup": args.concurrency,
        "requests_answered": sum(judged.values()),
        "samples_judged_twice": twice,
        "note": "per-item rates compared: the one-at-a-time run judges a smaller sample; both are the judge stage",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"judge_throughput: {args.concurrency} in flight {conc_rate:.2f} judged/s on {args.candidates} pairs vs one "
        f"at a time {seq_rate:.3f}/s on {args.sequential} (per-item rates, latency {args.latency[0]:g}-"
        f"{args.latency[1]:g} s) = {result['speedup_per_item']}x (ideal {args.concurrency}x); judged twice: {twice}; "
        f"-> {args.out}"
    )
    if (
        twice
        or manifest["counts"].get("vlm_judged") != args.candidates
        or seq_manifest["counts"].get("vlm_judged") != args.sequential
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
