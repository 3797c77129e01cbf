"""Kill every stage at seeded points, resume it, and compare every output byte with an uninterrupted run.

    python bench/reliability.py                # 20 kill points per stage (make reliability)
    python bench/reliability.py --smoke        # 2 per stage, for the test suite

One small demo run — the VLM judge rung on, against the OpenAI-compatible fake served in this process
(`tests/fakes/openai_server.py`), so the judge stage asks and checkpoints answers — is made
uninterrupted, stage by stage through the registry's own entries. Then,
for each stage, a copy of that run without the stage (and what follows) is made, and the stage is
run with a crash at the k-th *kill point* — a write through `tasks.common.storage` (before it, or in
the middle of it: the temporary file is left behind as a SIGKILL would leave it), or, for training,
an optimizer step — the points drawn with a seeded RNG from all of the stage's kill points; from the
kill point on, every write fails as it would in a dead process (the judge's pool cannot flush). The
crashed stage is then run again in the same process with fresh model caches (what a new process
has) and its outputs are compared with the uninterrupted run's: every file the manifest lists, byte
for byte, the rows of its parquet outputs (lost, duplicated) and what was left over (temporary
files, checkpoints). Real SIGKILLs of whole processes are covered by tests/flows/test_kill_and_resume.py.

Writes bench/results/reliability.json and prints a table and one summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("EDITFORGE_CACHE", str(ROOT / ".cache" / "editforge"))

import pandas as pd  # noqa: E402

from tasks import registry  # noqa: E402
from tasks.common import storage  # noqa: E402
from tasks.common.config import load_config  # noqa: E402
from tasks.common.models import MODELS  # noqa: E402

# the smoke size: a few kill points per stage
SMALL = ["captions.num_captions=10", "text.finetune_steps=150", "text.finetune_checkpoint_every=50",
         "text.batch_size=3", "render.samples_per_triplet=4", "render.batch_samples=2", "render.steps=4",
         "render.keep.clip_image_threshold=-1", "render.keep.clip_direction_threshold=-1",
         "render.keep.clip_caption_threshold=-1", "train.steps=6", "train.batch_size=2", "train.sample_steps=2",
         "train.shuffle_buffer=4", "train.num_workers=0", "train.checkpoint_every=2"]
# the full size: 10 partitions and fine checkpoints, so that every stage has at least 20 kill points
FULL = ["captions.num_captions=24", "captions.num_partitions=10", "text.finetune_steps=150",
        "text.finetune_checkpoint_every=10", "text.batch_size=1", "render.samples_per_triplet=2", "render.batch_samples=1",
        "render.steps=2", "render.keep.clip_image_threshold=-1", "render.keep.clip_direction_threshold=-1",
        "render.keep.clip_caption_threshold=-1", "pack.shard_max_samples=1", "train.steps=24", "train.batch_size=2",
        "train.sample_steps=2", "train.shuffle_buffer=4", "train.num_workers=0", "train.checkpoint_every=2"]
# the VLM judge rung against the in-process fake: chunks of exactly 3 answers (a kill point per chunk); its
# threshold 0 keeps what it judged (the fake's scores are arbitrary: the small runs would pack no shard)
JUDGE_KEY_ENV = "EDITFORGE_BENCH_JUDGE_KEY"
VLM = ["render.save_images=passed", "judges.vlm.enabled=true", f"judges.vlm.api_key_env={JUDGE_KEY_ENV}",
       "judges.vlm.model=gpt-4o-mini-2024-07-18", "judges.vlm.concurrency=4", "judges.vlm.checkpoint_every=3",
       "judges.vlm.checkpoint_interval_s=3600", "judges.vlm.backoff_initial_s=0.005", "judges.vlm.backoff_max_s=0.05",
       "render.keep.vlm_threshold=0"]
# the rows of a stage's parquet output, by their key column
ROW_KEYS = {"captions.parquet": "caption_id", "triplets.parquet": "caption_id", "samples.parquet": "sample_key",
            "judgments.parquet": "sample_key", "kept.parquet": "sample_key"}
# files whose bytes carry timings, compared without them
VOLATILE = {"train": {"metrics.json"}}


class Killed(BaseException):
    """The simulated kill (a BaseException: no `except Exception` in the code under test may catch it)."""


def dead_pid() -> int:
    """The pid of a process that has ended (the writer a SIGKILL took)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class KillSwitch:
    """Counts kill points (storage writes, training steps) and crashes at the ``at``-th one."""

    def __init__(self, at: int | None = None, mid_write: bool = False):
        self.at, self.mid_write, self.seen = at, mid_write, 0
        self._write = storage.write_bytes_atomic

    def point(self) -> bool:
        self.seen += 1
        return self.at is not None and self.seen == self.at

    def write(self, url: str, data: bytes) -> None:
        if self.at is not None and self.seen >= self.at:  # dead: a killed process writes nothing more
            raise Killed(f"after kill point {self.at}: writing {url}")
        if "/_leases/" in url:  # a lease's heartbeat comes from a timer thread: never a kill point (not counted)
            self._write(url, data)
            return
        if self.point():
            fs, path = storage.filesystem(url)
            if self.mid_write and url.startswith("/"):  # a kill inside the write leaves its temporary file
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Path(f"{path}{storage.TEMP_MARK}{dead_pid()}-deadbeef").write_bytes(data[: len(data) // 2])
            raise Killed(f"kill point {self.at}: writing {url}")
        self._write(url, data)

    def step(self, record: dict) -> None:
        if self.point():
            raise Killed(f"kill point {self.at}: training step {record['step']}")

    def __enter__(self) -> KillSwitch:
        storage.write_bytes_atomic = self.write
        return self

    def __exit__(self, *exc) -> None:
        storage.write_bytes_atomic = self._write


def run_stage(cfg, name: str, switch: KillSwitch | None = None) -> None:
    stage = registry.get(name)
    seams = {"on_step": switch.step} if name == "train" and switch else {}
    registry.prepare(cfg, name)
    manifests = [registry.entry(name)(cfg, pid, **seams) for pid in stage.partition_ids(cfg)]
    registry.finalize(cfg, name, manifests)


def fresh_process_state() -> None:
    """What a new process would start with: no loaded models (and no cached caption embeddings)."""
    MODELS.clear()


def digest(path: Path, name: str) -> str:
    if path.name in VOLATILE.get(name, set()):  # training metrics: the same figures, not the same clock
        data = json.loads(path.read_text())
        summary = {k: v for k, v in data["summary"].items() if k not in ("steps_per_s", "wall_time_s", "resumed_from")}
        history = [{k: v for k, v in h.items() if k != "time_s"} for h in data["history"]]
        return hashlib.sha256(json.dumps({"summary": summary, "history": history}, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(root: Path, name: str) -> dict[str, str]:
    """Every file the stage's manifests list, by path, with its digest."""
    found = {}
    for marker in sorted((root / name).glob("*/part-*/_SUCCESS.json")):  # <stage>/<hash>/part-N
        for out in json.loads(marker.read_text())["outputs"]:
            found[f"{marker.parent.parent.name}/{marker.parent.name}/{out}"] = digest(marker.parent / out, name)
    return found


def rows(root: Path, name: str) -> pd.DataFrame:
    frames = []
    for marker in sorted((root / name).glob("*/part-*/_SUCCESS.json")):
        for out in json.loads(marker.read_text())["outputs"]:
            if out in ROW_KEYS:
                frames.append(storage.read_parquet(str(marker.parent / out))[[ROW_KEYS[out]]].set_axis(["key"], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"key": []})


def without(src: Path, dst: Path, stages: list[str]) -> None:
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if Path(folder) == src and n in stages])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill points per stage")
    parser.add_argument("--stages", default=",".join(registry.STAGES), help="comma list (default: every stage)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 kill points per stage (the test suite's size)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    args = parser.parse_args(argv)
    size = SMALL if args.smoke else FULL
    if args.smoke:
        args.kills = 2
    names = [n for n in args.stages.split(",") if n]
    order = list(registry.STAGES)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    table = []
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.openai_server import FakeOpenAIServer, Knobs

    fake = FakeOpenAIServer(Knobs(api_key="sk-editforge-bench-judge")).start()
    os.environ[JUDGE_KEY_ENV] = fake.knobs.api_key
    size = [*size, *VLM, f"judges.vlm.base_url={fake.base_url}"]
    with tempfile.TemporaryDirectory(prefix="editforge-reliability-") as tmp:
        clean = Path(tmp) / "clean"
        points = {}
        for name in order:  # the uninterrupted run, counting each stage's kill points
            counter = KillSwitch()
            with counter:
                run_stage(load_config("demo", [f"output_root={clean}", *size]), name, counter)
            points[name] = counter.seen
        for name in names:
            later = order[order.index(name):]
            reference, reference_rows = outputs(clean, name), rows(clean, name)
            kills = sorted(rng.sample(range(1, points[name] + 1), min(args.kills, points[name])))
            result = {"stage": name, "kill_points": points[name], "kills": 0, "resumed": 0, "identical": 0,
                      "rows_lost": 0, "rows_duplicated": 0, "leftover_temp_files": 0, "leftover_checkpoints": 0,
                      "answers_asked_again": 0, "different": []}
            for i, at in enumerate(kills):
                root = Path(tmp) / f"{name}-{i}"
                without(clean, root, later)
                cfg = load_config("demo", [f"output_root={root}", *size])
                fresh_process_state()
                asked_from = len(fake.state.requests)
                try:
                    with KillSwitch(at, mid_write=bool(i % 2)) as switch:
                        run_stage(cfg, name, switch)
                    result.setdefault("not_reached", []).append(at)  # the run wrote less than the clean one
                except Killed:
                    result["kills"] += 1
                fresh_process_state()
                run_stage(cfg, name)
                result["resumed"] += 1
                asked = [r["judge"] for r in fake.state.requests[asked_from:] if r.get("judge") and r["status"] == 200]
                result["answers_asked_again"] += len(asked) - len(set(asked))  # answered, lost with the kill
                got, got_rows = outputs(root, name), rows(root, name)
                same = got == reference
                result["identical"] += same
                if not same:
                    result["different"].append({"kill_point": at, "files": sorted(
                        k for k in set(got) | set(reference) if got.get(k) != reference.get(k))[:10]})
                result["rows_lost"] += len(set(reference_rows["key"]) - set(got_rows["key"]))
                result["rows_duplicated"] += int(got_rows["key"].duplicated().sum())
                result["leftover_temp_files"] += len(list((root / name).rglob(f"*{storage.TEMP_MARK}*")))
                result["leftover_checkpoints"] += len([p for p in (root / name).rglob("_progress") if any(p.iterdir())])
                shutil.rmtree(root)
            table.append(result)
            print(f"  {name:9s} kills {result['kills']:3d}  resumed {result['resumed']:3d}  identical "
                  f"{result['identical']:3d}  rows lost {result['rows_lost']}  duplicated {result['rows_duplicated']}  "
                  f"temp files left {result['leftover_temp_files']}  checkpoints left {result['leftover_checkpoints']}"
                  f"  answers asked again {result['answers_asked_again']}  (of {result['kill_points']} kill points)",
                  flush=True)
    fake.stop()
    ok = all(r["identical"] == r["resumed"] == r["kills"] and not (r["rows_lost"] or r["rows_duplicated"]
             or r["leftover_temp_files"] or r["leftover_checkpoints"]) for r in table)
    report = {"benchmark": "reliability", "seed": args.seed, "kills_per_stage": args.kills, "stages": table,
              "all_identical": ok, "wall_s": round(time.perf_counter() - t0, 1),
              "config": [item for item in size if "base_url" not in item],
              "judge_requests_answered": sum(fake.state.judged().values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    kills = sum(r["kills"] for r in table)
    identical = sum(r["identical"] for r in table)
    print(f"reliability: {kills} kills over {len(table)} stages, {identical} resumed byte-identical, "
          f"{'all identical' if ok else 'NOT ALL IDENTICAL'} ({report['wall_s']} s) -> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
