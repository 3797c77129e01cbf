"""Text-stage throughput: the concurrent openai backend vs the reference's sequential loop, in one run.

Both talk to the OpenAI-compatible fake (`tests/fakes/openai_server.py`, run as a separate process on
127.0.0.1) with an injected latency of 300-800 ms per generation request, about what a fine-tuned
model's completion takes. The reference code asked for one completion at a time; the concurrent run
is the text stage itself (`tasks.text.stage.run`, `text.backend=openai`, 64 requests in flight,
checkpointing included). Moderation is off on both sides (the reference loop has none here), so the
figures compare generation alone.

The sequential loop runs on a smaller sample (it is ~64x slower); the ratio compares per-item rates
(triplets per second). The fake's request log is checked: no caption may be answered twice.

    .venv/bin/python bench/text_throughput.py [--captions 768] [--sequential 24] [--concurrency 64]

Writes bench/results/text_throughput.json and prints one summary line.
"""

from __future__ import annotations

import argparse
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
import openai
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.captions.laion import caption_id
from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.layout import partition_dir
from tasks.finetune.stage import run as run_finetune
from tasks.registry import stage_hash
from tasks.text.format import parse_completion
from tasks.text.stage import run as run_text

KEY_ENV = "EDITFORGE_BENCH_OPENAI_KEY"
API_KEY = "bench-key"
MODEL = "ft:davinci-002:fake-org:editforge:bench"


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


def fake_reset(base_url: str) -> None:
    httpx.post(base_url.removesuffix("/v1") + "/_fake/reset", timeout=30).raise_for_status()


def captions(n: int, offset: int = 0) -> pd.DataFrame:
    texts = [f"a photograph of scene number {i}, in soft evening light" for i in range(offset, offset + n)]
    return pd.DataFrame({"caption_id": [caption_id(t) for t in texts], "text": texts})


def sequential_reference(base_url: str, df: pd.DataFrame) -> tuple[float, int]:
    """The reference loop: one blocking completion request per caption, the paper's settings."""
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=5)
    ok = 0
    start = time.perf_counter()
    for text in df["text"]:
        response = client.completions.create(
            model=MODEL,
            prompt=f"{text}\n##\n",
            temperature=0.7,
            top_p=1.0,
            frequency_penalty=0.1,
            max_tokens=256,
            stop=["\nEND"],
        )
        ok += parse_completion(response.choices[0].text).ok
    return time.perf_counter() - start, ok


def concurrent_stage(base_url: str, df: pd.DataFrame, concurrency: int, root: str) -> tuple[float, dict]:
    cfg = load_config(
        "demo",
        [
            f"output_root={root}",
            "text.backend=openai",
            f"text.openai.base_url={base_url}",
            f"text.openai.api_key_env={KEY_ENV}",
            f"text.openai.model={MODEL}",
            "text.openai.endpoint=completions",
            f"text.openai.concurrency={concurrency}",
            "text.openai.moderation=false",
            "text.max_new_tokens=256",
        ],
    )
    # the text stage's inputs: a finished captions partition and the (no-job) fine-tune
    folder = partition_dir(root, "captions", stage_hash(cfg, "captions"), 0)
    storage.write_parquet_atomic(storage.url_join(folder, "captions.parquet"), df)
    storage.write_json_atomic(
        storage.url_join(folder, "_SUCCESS.json"), {"config_hash": stage_hash(cfg, "captions")}
    )
    run_finetune(cfg)
    start = time.perf_counter()
    manifest = run_text(cfg, 0)
    return time.perf_counter() - start, manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=768, help="captions for the concurrent run")
    parser.add_argument("--sequential", type=int, default=24, help="captions for the sequential reference")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, nargs=2, default=(0.3, 0.8), metavar=("LO", "HI"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/text_throughput.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long size for the test suite (figures mean little)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.captions, args.sequential, args.concurrency, args.latency = 32, 4, 8, (0.02, 0.05)
    os.environ[KEY_ENV] = API_KEY

    proc, base_url = start_fake(tuple(args.latency))
    try:
        seq_s, seq_ok = sequential_reference(base_url, captions(args.sequential, offset=10_000_000))
        fake_reset(base_url)
        with tempfile.TemporaryDirectory() as root:
            conc_s, manifest = concurrent_stage(base_url, captions(args.captions), args.concurrency, root)
        log = fake_log(base_url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    answered = Counter(r["caption"] for r in log if r["caption"] is not None and r["status"] == 200)
    duplicates = sum(1 for n in answered.values() if n > 1)
    seq_rate, conc_rate = args.sequential / seq_s, args.captions / conc_s
    result = {
        "benchmark": "text_throughput",
        "fake_latency_s": list(args.latency),
        "sequential": {
            "captions": args.sequential,
            "wall_s": round(seq_s, 3),
            "triplets_per_s": round(seq_rate, 3),
            "parsed_ok": seq_ok,
            "mean_latency_s": round(seq_s / args.sequential, 3),
        },
        "concurrent": {
            "captions": args.captions,
            "concurrency": args.concurrency,
            "wall_s": round(conc_s, 3),
            "triplets_per_s": round(conc_rate, 3),
            "generate_s": manifest["timings_s"].get("generate"),
            "ideal_wall_s": round(args.captions * seq_s / args.sequential / args.concurrency, 3),
            "counts": manifest["counts"],
            "rejected": manifest["rejected"],
        },
        "speedup_per_item": round(conc_rate / seq_rate, 2),
        "ideal_speedup": args.concurrency,
        "requests_answered": sum(answered.values()),
        "captions_answered_twice": duplicates,
        "note": "per-item rates compared: the sequential reference runs on a smaller sample; moderation off on both",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"text_throughput: concurrent({args.concurrency}) {conc_rate:.1f} triplets/s on {args.captions} captions vs "
        f"sequential {seq_rate:.2f}/s on {args.sequential} (per-item rates) = {result['speedup_per_item']}x "
        f"(ideal {args.concurrency}x); captions answered twice: {duplicates}; -> {args.out}"
    )
    if duplicates or manifest["counts"].get("requests_answered") != args.captions:
        sys.exit(1)


if __name__ == "__main__":
    main()
