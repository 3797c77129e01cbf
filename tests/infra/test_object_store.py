"""`output_root` on an S3 API (moto's server on 127.0.0.1): every stage of the registry end to end,
the shards read back with webdataset through the same `s3://` URLs, and a re-run that skips it all."""

from __future__ import annotations

import io
import json

import pytest

pytestmark = pytest.mark.integration

SMALL = ["captions.num_captions=8", "text.finetune_steps=150", "text.batch_size=4", "render.samples_per_triplet=2",
         "render.batch_samples=2", "render.steps=2", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1", "train.steps=2",
         "train.batch_size=2", "train.sample_steps=2", "train.shuffle_buffer=4", "train.num_workers=0"]


def _run_all(cfg) -> list[dict]:
    from tasks import registry

    manifests = []
    for name, stage in registry.STAGES.items():
        registry.prepare(cfg, name)
        done = [registry.entry(name)(cfg, pid) for pid in stage.partition_ids(cfg)]
        registry.finalize(cfg, name, done)
        manifests += done
    return manifests


def test_every_stage_runs_on_an_object_store_and_its_shards_read_back(s3):
    import webdataset as wds

    from tasks import registry
    from tasks.common.config import load_config
    from tasks.pack.index import read_index

    root = "s3://editforge-test/run"
    cfg = load_config("demo", [f"output_root={root}", *SMALL])
    manifests = _run_all(cfg)
    assert manifests and not any(m["skipped"] for m in manifests)
    for name, stage in registry.STAGES.items():
        for pid in stage.partition_ids(cfg):
            assert s3.glob(f"editforge-test/run/{name}/*/part-{pid:05d}/_SUCCESS.json"), (name, pid)
    assert not [k for k in s3.find("editforge-test/run") if ".tmp-" in k or "/_leases/part-" in k]

    index = read_index(registry.index_url(cfg))
    urls = index["splits"]["train"]["shards"]
    assert urls and all(u.startswith(f"{root}/pack/{registry.stage_hash(cfg, 'pack')}/part-") for u in urls)

    def opened(url):  # webdataset reads the s3:// URLs through fsspec, as the training loader does
        return io.BytesIO(s3.cat_file(url.removeprefix("s3://")))

    from webdataset.tariterators import group_by_keys, tar_file_expander

    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), _open_with(opened), tar_file_expander, group_by_keys))
    assert len(samples) == index["splits"]["train"]["samples"]
    assert all({"input.jpg", "edited.jpg", "instruction.txt", "json"} <= set(s) for s in samples)
    assert json.loads(samples[0]["json"])["caption_id"]

    assert all(m["skipped"] for m in _run_all(cfg))  # a second run on the bucket finds it all done


def _open_with(opener):
    """A webdataset stage that opens each shard URL with ``opener`` (here: through fsspec)."""
    def stage(shards):
        for shard in shards:
            yield {**shard, "stream": opener(shard["url"])}
    return stage
