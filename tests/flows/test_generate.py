"""Flow tier: the whole DAG on the tiny preset under the Prefect test harness."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from tasks import registry
from tasks.common.config import load_config
from tasks.common.layout import artifact_key
from tasks.registry import stage_hash

pytestmark = pytest.mark.flow

SMALL = [
    "captions.num_captions=8",
    "text.finetune_steps=150",
    "text.batch_size=4",
    "render.samples_per_triplet=2",
    "render.batch_samples=2",
    "render.steps=3",
    "render.keep.clip_image_threshold=-1",
    "render.keep.clip_direction_threshold=-1",
    "render.keep.clip_caption_threshold=-1",
]


def _shard_hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "pack").rglob("*.tar"))
    }


def test_whole_dag_then_rerun_skips_everything(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    from flows.generate import generate

    overrides = [f"output_root={tmp_path}", "name=flowtest", *SMALL]
    result = generate("demo", overrides)
    stages = result["stages"]
    assert list(stages) == ["captions", "text", "render", "judge", "filter", "pack"]
    assert stages["captions"]["out"] == 8
    assert stages["text"]["out"] + sum(stages["text"]["rejected"].values()) == 8
    # with thresholds off, every rendered triplet keeps min(top_k, samples) pairs
    assert stages["pack"]["out"] == stages["filter"]["out"] > 0
    assert all(s["skipped"] == 0 for s in stages.values())

    index = result["index"]
    cfg = load_config("demo", overrides)
    assert index == registry.index_url(cfg) and Path(index).exists()
    shards = sorted(str(p) for p in (tmp_path / "pack").rglob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == stages["pack"]["out"]
    assert all("." not in s["__key__"] and s["input.jpg"].size == (64, 64) for s in samples)

    before = _shard_hashes(tmp_path)
    # as if finished by a version that wrote the stages' figures at the manifests' top level: still done,
    # and the dashboard rows and report below are built from those manifests
    for success in tmp_path.rglob("_SUCCESS.json"):
        m = json.loads(success.read_text())
        success.write_text(json.dumps({k: v for k, v in m.items() if k != "figures"} | m["figures"]))
    again = generate("demo", overrides)
    assert all(s["skipped"] == 2 for s in again["stages"].values())
    assert _shard_hashes(tmp_path) == before

    with get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="editforge-flowtest"))
            )
        }
    key = {s: artifact_key("flowtest", s, stage_hash(cfg, s)) for s in ("render", "pack")}
    assert {key["render"], key["pack"], artifact_key("flowtest", "summary", stage_hash(cfg, "pack"))} <= keys
    with get_client(sync_client=True) as client:
        render_table = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key["render"]]))
        )[0]
    rows = json.loads(render_table.data) if isinstance(render_table.data, str) else render_table.data
    # per partition on the dashboard: counts, and the stage's own figures and medians
    assert {
        "n_unet_calls",
        "unet_calls_per_kept_pair",
        "samples_per_s",
        "batch_samples",
        "median_clip_sim_dir",
    } <= set(rows[0])
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
        )
    # each partition task run has its own progress artifact (the rerun's too): the newest is the one shown
    described = {
        a.description.split(":")[0]: a.data
        for a in sorted(progress, key=lambda a: a.created)
        if a.description
    }
    assert described.get("render part-00000") == 100.0 and described.get("text part-00001") == 100.0
    # the live figures of a partition ride on its progress artifact's description
    assert any(
        a.description.startswith("render part-00000: ") and "pass rate" in a.description for a in progress
    )
    # a block's task run carries the GPU tag only where it holds a GPU (the demo renders on the CPU)
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="render-partition"))
        )
    assert runs and all(r.tags == [] for r in runs)
    _check_dashboard(cfg, key["render"], result, overrides)


def _check_dashboard(cfg, render_key, result, overrides):
    """Rows per partition as each finishes, the run-wide progress, the events, the report in a browser."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.browser import look
    from flows.dashboard import read_events

    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[render_key])),
            sort=ArtifactSort.CREATED_DESC,
        )[::-1]
        progress_key = artifact_key("flowtest", "progress", stage_hash(cfg, "pack"))
        progress = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[progress_key]))
        )
        events = read_events(client, "flowtest")
    # the render table was published as partition 0 finished (1 row), then with both; the latest is readable
    tables = [json.loads(v.data) if isinstance(v.data, str) else v.data for v in versions]
    assert [len(t) for t in tables][:2] == [1, 2], [len(t) for t in tables]
    assert list(tables[-1][0])[:6] == ["partition", "status", "in", "out", "pass_rate", "pass_rate_clip"]
    assert progress and progress[0].data == 100.0
    completed = [e for e in events if e["event"] == "editforge.partition.completed"]
    assert sorted(
        (e["payload"]["stage"], e["payload"]["partition"])
        for e in completed
        if e["payload"]["stage"] == "render"
    ) == [("render", 0), ("render", 1)]
    assert {"counts", "pass_rate", "wall_time_s"} <= set(completed[0]["payload"])
    assert [e["event"] for e in events].count("editforge.run.completed") >= 1
    # report.html in Chromium: every figure there and drawn (the run's second pass rebuilt it)
    shot = Path(result["report"]).with_name("screenshot.png")
    seen = look(result["report"], shot)
    assert {i["alt"] for i in seen["images"] if i["width"] > 100} == {
        "funnel",
        "metrics",
        "pass_rate",
        "best",
        "worst",
        "loss",
    }, seen["images"]
    assert "Survival funnel" in seen["text"] and shot.stat().st_size > 10_000
    # `editforge report --html` rebuilds it from disk
    from typer.testing import CliRunner

    from flows.cli import app

    Path(result["report"]).unlink()
    out = CliRunner().invoke(
        app, ["report", "--preset", "demo", *(a for o in overrides for a in ("--set", o)), "--html"]
    )
    assert out.exit_code == 0 and f"report: {result['report']} (6 figures beside it)" in out.output, (
        out.output
    )
    assert Path(result["report"]).stat().st_size > 100_000


def _laion(path, start, n):
    pd.DataFrame(
        {
            "URL": [f"https://example.com/{i}.jpg" for i in range(start, start + n)],
            "TEXT": [f"a watercolor painting of a lighthouse number {i}" for i in range(start, start + n)],
            "AESTHETIC_SCORE": [7.0] * n,
        }
    ).to_parquet(path)


def _files(root, stage):
    """Every file of ``stage`` (all versions) with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted((root / stage).rglob("*"))
        if p.is_file() and "_leases" not in p.parts
    }


def test_a_grown_source_adds_partitions_and_an_experiment_writes_its_own_version(prefect_harness, tmp_path):
    from flows.generate import generate
    from tasks.captions.generations import ledger

    source = tmp_path / "source"
    source.mkdir()
    _laion(source / "week-1.parquet", 0, 40)
    root = tmp_path / "run"
    base = [f"output_root={root}", "name=grow", f"captions.source={source}/*.parquet", *SMALL]
    first = generate("demo", base)
    assert first["stages"]["captions"]["out"] == 8
    cfg = load_config("demo", base)
    before = {stage: _files(root, stage) for stage in ("captions", "text", "render", "filter", "pack")}
    markers = {p: b for stage in before.values() for p, b in stage.items() if p.endswith("_SUCCESS.json")}

    # a week later the source has grown: only the new captions are processed, into new partitions
    _laion(source / "week-2.parquet", 1000, 40)
    second = generate("demo", base)
    gens = ledger(cfg)
    assert len(gens) == 2 and gens[1].first_partition == 2
    new_parts = list(gens[1].partitions)
    assert 0 < gens[1].record["taken"] < 40  # sampled at the first week's rate, not all taken
    for name, stage in second["stages"].items():
        if name != "pack" or stage["out"]:  # pack may keep nothing new from a handful of captions
            assert stage["skipped"] == 2, (name, stage)  # the first week's partitions
    assert second["stages"]["captions"]["out"] == 8 + gens[1].record["taken"]
    text_in = sum(m["counts"]["in"] for m in registry.manifests(cfg, "text", new_parts).values())
    assert text_in == gens[1].record["taken"]
    after = {stage: _files(root, stage) for stage in before}
    grown = (
        "index.json",
        "pack/{}/README.md".format(stage_hash(cfg, "pack")),
    )  # the index and the card list every generation
    for stage, files in before.items():  # every earlier file, marker and shard byte for byte
        assert {p: b for p, b in after[stage].items() if p in files and not p.endswith(grown)} == {
            p: b for p, b in files.items() if not p.endswith(grown)
        }, stage
    assert all(after[p.split("/")[0]][p] == b for p, b in markers.items())
    index = json.loads(Path(registry.index_url(cfg)).read_text())
    assert {s["partition_id"] for s in index["shards"]} >= {0, 1}

    base_index = Path(registry.index_url(cfg)).read_bytes()
    # an experiment (another top-k) reuses captions, text and render, and writes filter and pack apart
    experiment = [*base, "filter.top_k=1"]
    third = generate("demo", experiment)
    parts = registry.partition_ids(cfg, "render")
    assert all(third["stages"][s]["skipped"] == len(parts) for s in ("captions", "text", "render"))
    assert third["stages"]["filter"]["skipped"] == 0
    exp = load_config("demo", experiment)
    assert stage_hash(exp, "filter") != stage_hash(cfg, "filter")
    assert third["index"] == registry.index_url(exp) != registry.index_url(cfg)
    assert {p: b for p, b in _files(root, "pack").items() if p in after["pack"]} == after[
        "pack"
    ]  # base untouched
    assert Path(registry.index_url(cfg)).read_bytes() == base_index


def test_a_triplet_target_tops_the_captions_up_with_new_generations_and_resumes(prefect_harness, tmp_path):
    import logging

    from flows.generate import meet_target
    from flows.stages import FLOWS
    from flows.target import standing
    from tasks.captions.generations import ledger

    overrides = [f"output_root={tmp_path}", *SMALL, "text.target_triplets=12"]
    cfg = load_config("demo", overrides)
    assert stage_hash(cfg, "text") == stage_hash(load_config("demo", overrides[:-1]), "text")  # not hashed
    for stage in ("captions", "finetune", "text"):
        FLOWS[stage]("demo", overrides)
    first = standing(cfg)
    assert first.processed == 8 and first.accepted < 12
    meet_target(cfg, "demo", overrides, logging.getLogger("editforge"))
    met = standing(cfg)
    gens = ledger(cfg)
    assert met.accepted >= 12 and len(gens) >= 2 and met.processed == gens[-1].record["total_taken"]
    assert all(m is not None for m in registry.manifests(cfg, "text").values())  # every new partition done
    meet_target(cfg, "demo", overrides, logging.getLogger("editforge"))  # a re-run: met, nothing added
    assert len(ledger(cfg)) == len(gens) and standing(cfg) == met
