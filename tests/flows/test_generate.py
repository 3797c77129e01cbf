"""Flow tier: the whole DAG on the tiny preset under the Prefect test harness."""

import hashlib
import json

import pytest
import webdataset as wds

pytestmark = pytest.mark.flow

SMALL = ["captions.num_captions=8", "text.finetune_steps=150", "text.batch_size=4", "render.samples_per_triplet=2",
         "render.batch_samples=2", "render.steps=3", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1"]


def _shard_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "pack").rglob("*.tar"))}


def test_whole_dag_then_rerun_skips_everything(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    from flows.generate import generate

    overrides = [f"output_root={tmp_path}", "name=flowtest", *SMALL]
    result = generate("demo", overrides)
    stages = result["stages"]
    assert list(stages) == ["captions", "text", "render", "filter", "pack"]
    assert stages["captions"]["out"] == 8
    assert stages["text"]["out"] + sum(stages["text"]["rejected"].values()) == 8
    # with thresholds off, every rendered triplet keeps min(top_k, samples) pairs
    assert stages["pack"]["out"] == stages["filter"]["out"] > 0
    assert all(s["skipped"] == 0 for s in stages.values())

    index = result["index"]
    assert index and (tmp_path / "pack" / "index.json").exists()
    shards = sorted(str(p) for p in (tmp_path / "pack").rglob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == stages["pack"]["out"]
    assert all("." not in s["__key__"] and s["input.jpg"].size == (64, 64) for s in samples)

    before = _shard_hashes(tmp_path)
    again = generate("demo", overrides)
    assert all(s["skipped"] == 2 for s in again["stages"].values())
    assert _shard_hashes(tmp_path) == before

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="editforge-flowtest")))}
    assert {"editforge-flowtest-render", "editforge-flowtest-pack", "editforge-flowtest-summary"} <= keys
    with get_client(sync_client=True) as client:
        render_table = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["editforge-flowtest-render"])))[0]
    rows = json.loads(render_table.data) if isinstance(render_table.data, str) else render_table.data
    # per partition on the dashboard: counts, and the stage's own figures and medians
    assert {"n_unet_calls", "unet_calls_per_kept_pair", "samples_per_s", "batch_samples",
            "median_clip_sim_dir"} <= set(rows[0])
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    described = {a.description: a.data for a in progress}
    assert described.get("render part-00000") == 100.0 and described.get("text part-00001") == 100.0
    # each partition task run carries its stage's resource tags (the demo renders on the CPU: no GPU tag)
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="render-partition")))
    assert runs and all({"editforge", "editforge-render"} <= set(r.tags) and "editforge-gpu" not in r.tags
                        for r in runs)
