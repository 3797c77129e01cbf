import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.layout import image_name
from tasks.pack.index import write_index
from tasks.pack.shards import split_of
from tasks.pack.stage import run as run_pack
from tasks.registry import partition_url, stage_hash


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _prepare(root, cfg, n=5):
    render_dir = partition_url(cfg, "render")
    rows = []
    for i in range(n):
        cid, seed = f"{i:016x}", 1000 + i
        key = f"{cid}_{seed}"
        storage.write_bytes_atomic(f"{render_dir}/{image_name(key, 'input')}", _png(10 * i))
        storage.write_bytes_atomic(f"{render_dir}/{image_name(key, 'edited')}", _png(10 * i + 5))
        rows.append(
            {
                "caption_id": cid,
                "sample_key": key,
                "seed": seed,
                "p2p_p": 0.5,
                "cfg_scale": 8.0,
                "clip_sim_0": 0.3,
                "clip_sim_1": 0.3,
                "clip_sim_dir": 0.25,
                "clip_sim_image": 0.8,
                "input": f"a house {i}",
                "edit": "make it red",
                "output": f"a red house {i}",
            }
        )
    storage.write_parquet_atomic(f"{partition_url(cfg, 'filter')}/kept.parquet", pd.DataFrame(rows))
    storage.write_parquet_atomic(
        f"{partition_url(cfg, 'captions')}/captions.parquet",
        pd.DataFrame(
            {
                "caption_id": [r["caption_id"] for r in rows],
                "url": [f"https://x/{i}.jpg" for i in range(n)],
                "aesthetic_score": [7.0] * n,
            }
        ),
    )
    # the partitions pack reads finished under this config (pack refuses unfinished or stale inputs)
    for stage in ("filter", "render", "captions"):
        storage.write_json_atomic(
            f"{partition_url(cfg, stage)}/_SUCCESS.json", {"config_hash": stage_hash(cfg, stage)}
        )


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        "demo",
        [
            f"output_root={tmp_path}",
            "captions.num_partitions=1",
            "pack.shard_max_samples=2",
            "pack.val_fraction=0.0",
        ],
    )


def test_shards_are_readable_by_webdataset(cfg, tmp_path):
    _prepare(str(tmp_path), cfg)
    manifest = run_pack(cfg, 0)
    assert manifest["counts"]["out"] == 5 and manifest["counts"]["shards"] == 3
    index = write_index(cfg, [manifest])
    urls = index["splits"]["train"]["shards"]
    assert len(urls) == 3 and index["splits"]["train"]["samples"] == 5
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 5
    s = samples[0]
    assert "." not in s["__key__"]
    assert {"input.jpg", "edited.jpg", "instruction.txt", "json"} <= set(s)
    assert s["input.jpg"].size == (8, 8)
    meta = s["json"]
    assert meta["input"] == "a house 0" and meta["output"] == "a red house 0" and meta["seed"] == 1000
    assert meta["url"] == "https://x/0.jpg" and "models" in meta and "clip_sim_dir" in meta
    assert s["instruction.txt"] == "make it red"


def test_reruns_are_byte_identical(cfg, tmp_path):
    _prepare(str(tmp_path), cfg)
    run_pack(cfg, 0)
    first = {p.name: p.read_bytes() for p in Path(partition_url(cfg, "pack")).glob("*.tar")}
    (Path(partition_url(cfg, "pack")) / "_SUCCESS.json").unlink()
    run_pack(cfg, 0)
    second = {p.name: p.read_bytes() for p in Path(partition_url(cfg, "pack")).glob("*.tar")}
    assert first == second


def test_no_empty_shard_when_nothing_kept(cfg, tmp_path):
    _prepare(str(tmp_path), cfg, n=0)
    manifest = run_pack(cfg, 0)
    assert manifest["counts"].get("shards", 0) == 0
    assert list(Path(partition_url(cfg, "pack")).glob("*.tar")) == []


def test_split_is_per_triplet_and_deterministic():
    assert split_of("abc", 0.0) == "train" and split_of("abc", 0.9999) == "val"
    ids = [f"{i:016x}" for i in range(2000)]
    frac = sum(split_of(c, 0.1) == "val" for c in ids) / len(ids)
    assert 0.07 < frac < 0.13
    assert json.dumps([split_of(c, 0.1) for c in ids]) == json.dumps([split_of(c, 0.1) for c in ids])


def test_hugging_face_export_has_the_released_columns(tmp_path):
    import pyarrow.parquet as pq

    cfg = load_config(
        "demo",
        [
            f"output_root={tmp_path}",
            "captions.num_partitions=1",
            "pack.hf_export=true",
            "pack.val_fraction=0.0",
        ],
    )
    _prepare(str(tmp_path), cfg, n=3)
    index = write_index(cfg, [run_pack(cfg, 0)])
    (url,) = index["hf_parquet"]["train"]
    table = pq.read_table(url)
    assert table.column_names == [
        "original_prompt",
        "original_image",
        "edit_prompt",
        "edited_prompt",
        "edited_image",
    ]
    assert b"huggingface" in table.schema.metadata
    row = table.to_pylist()[0]
    assert row["original_prompt"] == "a house 0" and row["edit_prompt"] == "make it red"
    assert Image.open(io.BytesIO(row["edited_image"]["bytes"])).size == (8, 8)
    # the dataset card beside it: front matter naming the parquet files, the counts, thresholds and hashes
    import yaml

    card = (Path(url).parents[2] / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    files = front["configs"][0]["data_files"]
    assert files == [{"split": "train", "path": ["part-00000/hf/train-000000.parquet"]}]
    assert (Path(url).parents[2] / files[0]["path"][0]).exists()
    assert "| pairs (train / validation) | 3 / 0 |" in card and stage_hash(cfg, "pack") in card
    assert f"{cfg.render.keep.clip_image_threshold} / {cfg.render.keep.clip_direction_threshold}" in card


def test_jpeg_quality_defaults_to_the_reference_100():
    from tasks.pack.shards import encode_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")

    def error(data: bytes) -> float:
        return float(np.abs(np.asarray(Image.open(io.BytesIO(data)), dtype=float) - pixels).mean())

    assert load_config("paper").pack.quality == 100
    best, default, low = (
        encode_image(buf.getvalue(), "jpg", 100),
        encode_image(buf.getvalue(), "jpg"),
        encode_image(buf.getvalue(), "jpg", 50),
    )
    assert best == default and error(best) < error(low)
    assert encode_image(buf.getvalue(), "png") == buf.getvalue()  # lossless stays byte-identical
