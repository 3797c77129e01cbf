"""Fan-out on one box: the demo DAG through one worker vs two, and the orchestration cost per block.

Starts a real Prefect server on 127.0.0.1 with the process pools and workers (`--limit 1`): one on the
driver pool holds the `editforge-generate/demo` parent flow run, two on the CPU pool and two on the GPU
pool run its child flow runs. The stage pools' concurrency limits decide how many children of a pool
run at once (1: one worker each; 2: two), so both measurements use the same processes, side by side
in one run:

- **one vs two workers**: wall time of ONE `prefect deployment run editforge-generate/demo` with
  ``run.mode=fan-out`` on a fresh output root, blocks of one partition;
- **overhead per block**: the same run again on the finished root with one child worker — every
  child flow run finds its partitions done and skips them (a no-op stage), so the parent flow run's
  time over the number of blocks is what Prefect costs per block (submit, worker poll, process
  start, skip); the JSON also has the median submit-to-start wait and run time of the children.

    python bench/fanout.py [--smoke] [--out bench/results/fanout.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.local_cluster import BIN, prefect_cluster  # noqa: E402

SIZES = {
    "full": ["captions.num_captions=16", "captions.num_partitions=4", "text.finetune_steps=150",
             "render.samples_per_triplet=2", "render.batch_samples=2", "render.steps=4"],
    "smoke": ["captions.num_captions=4", "captions.num_partitions=2", "text.finetune_steps=20",
              "render.samples_per_triplet=1", "render.batch_samples=1", "render.steps=2"],
}
COMMON = ["text.batch_size=4", "render.keep.clip_image_threshold=-1", "render.keep.clip_direction_threshold=-1",
          "render.keep.clip_caption_threshold=-1", "run.mode=fan-out", "run.block_size=1", "run.poll_s=0.5"]
POOLS = ("editforge-cpu", "editforge-gpu")  # the stage pools (the parent has the driver pool to itself)
CHILDREN = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows(limit=200)}
    runs = c.read_flow_runs(limit=200, sort=FlowRunSort.EXPECTED_START_TIME_DESC)  # the newest first
print(json.dumps([{"flow": flows.get(r.flow_id), "state": r.state_type.value, "overrides": r.parameters.get("overrides"),
                   "created": r.created.timestamp() if r.created else None,
                   "start": r.start_time.timestamp() if r.start_time else None,
                   "end": r.end_time.timestamp() if r.end_time else None} for r in runs]))
"""


def pool_limit(env: dict, n: int) -> None:
    for pool in POOLS:
        subprocess.run([str(BIN / "prefect"), "work-pool", "set-concurrency-limit", pool, str(n)], env=env, check=True,
                       capture_output=True, timeout=60)


def deployment_run(env: dict, root: Path, name: str, size: str, timeout: int = 900) -> dict:
    """One `prefect deployment run editforge-generate/demo` (fan-out), watched to the end; its figures."""
    overrides = [f"output_root={root}", f"name={name}", *SIZES[size], *COMMON]
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "editforge-generate/demo", "--params",
                          json.dumps({"preset": "demo", "overrides": overrides}), "--watch", "--watch-interval", "1",
                          "--watch-timeout", str(timeout)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout + 60)
    wall = time.perf_counter() - t0
    if out.returncode != 0 or "Completed" not in out.stdout:
        raise RuntimeError(f"the {name} run did not complete: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    listed = subprocess.run([str(BIN / "python"), "-c", CHILDREN], env=env, capture_output=True, text=True, timeout=120)
    if listed.returncode != 0:
        raise RuntimeError(f"listing the flow runs failed: {listed.stderr[-2000:]}")
    ours = [r for r in json.loads(listed.stdout) if f"name={name}" in (r["overrides"] or [])]
    children = [r for r in ours if r["flow"] != "editforge-generate"]
    (parent,) = [r for r in ours if r["flow"] == "editforge-generate"]
    durations = [r["end"] - r["start"] for r in children if r["start"] and r["end"]]
    waits = [r["start"] - r["created"] for r in children if r["start"] and r["created"]]
    return {"wall_s": round(wall, 2), "parent_run_s": round(parent["end"] - parent["start"], 2),
            "child_runs": len(children),
            "child_run_median_s": round(statistics.median(durations), 2) if durations else None,
            "child_submit_to_start_median_s": round(statistics.median(waits), 2) if waits else None,
            "states": sorted({r["state"] for r in children})}


def measure(env: dict, workdir: Path, size: str, one_worker: bool = True) -> dict:
    """Two workers on a fresh root, (one worker on another,) then the no-op re-run; the figures as a dict."""
    pool_limit(env, 2)  # two children of each stage pool at once
    two = deployment_run(env, workdir / "two", "bench-two", size)
    one = None
    pool_limit(env, 1)  # one child of each stage pool
    if one_worker:
        one = deployment_run(env, workdir / "one", "bench-one", size)
    noop = deployment_run(env, workdir / "two", "bench-noop", size)  # everything done: each block only skips
    blocks = noop["child_runs"]
    report = {
        "size": size, "config": [*SIZES[size], *COMMON],
        "two_workers": two, "one_worker": one, "noop_rerun": noop,
        "speedup_two_vs_one": round(one["wall_s"] / two["wall_s"], 2) if one else None,
        # the parent's own run time over its blocks, each a no-op child flow run, one at a time
        "overhead_per_block_s": round(noop["parent_run_s"] / blocks, 2) if blocks else None,
        "goals": {"overhead_per_block_s": "< 3", "speedup_two_vs_one": ">= 1.5"},
    }
    pool_limit(env, 2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the bench works")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fanout.json"))
    args = parser.parse_args()
    size = "smoke" if args.smoke else "full"
    with tempfile.TemporaryDirectory(prefix="editforge-fanout-") as tmp:
        with prefect_cluster(Path(tmp) / "home", workers=2, gpu_workers=2) as cluster:
            report = measure(cluster.env, Path(tmp), size, one_worker=not args.smoke)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    one = report["one_worker"]
    return (f"fanout: {report['size']}: two workers {report['two_workers']['wall_s']} s"
            + (f", one worker {one['wall_s']} s ({report['speedup_two_vs_one']}x)" if one else "")
            + f"; overhead {report['overhead_per_block_s']} s per block ({report['noop_rerun']['child_runs']} no-op "
              f"child runs: median {report['noop_rerun']['child_submit_to_start_median_s']} s from submission to "
              f"start, {report['noop_rerun']['child_run_median_s']} s running)")


if __name__ == "__main__":
    sys.exit(main())
