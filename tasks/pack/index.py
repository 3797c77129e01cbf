"""`pack/<hash>/index.json`: every shard of a run, per split — the pack stage's finalize, and how it is read.

Shard entries are relative to the index's folder (`part-00000/train-000000.tar`), so a run copied or
moved elsewhere (another disk, a bucket) still finds its shards; an absolute URL in an index is
taken as is. Read it with :func:`read_index`, which resolves them::

    index = read_index(index_url(cfg))  # runs/demo/pack/<hash>/index.json
    webdataset.WebDataset(index["splits"]["train"]["shards"])
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import figures
from tasks.common.errors import InputError, MissingFileError
from tasks.common.stage import stage_hash
from tasks.pack.card import write_card
from tasks.pack.spec import STAGE as PACK


def index_url(cfg: PipelineConfig) -> str:
    """This config's shard index: ``pack/<hash>/index.json`` (the one place its URL is made)."""
    return layout.index_url(cfg.output_root, stage_hash(cfg, PACK))


def _relative(manifest: dict[str, Any], name: str) -> str:
    return f"{layout.partition_name(manifest['partition_id'])}/{name}"


def write_index(cfg: PipelineConfig, manifests: list[dict], logger: logging.Logger | None = None) -> dict:
    """Write the index of the pack manifests' shards (URLs relative to it); return it resolved."""
    shards = [
        {
            "url": _relative(m, s["name"]),
            "split": s["split"],
            "samples": s["samples"],
            "partition_id": m["partition_id"],
        }
        for m in sorted(manifests, key=lambda m: m["partition_id"])
        for s in figures(m).get("shards", [])
    ]
    hf = (
        [
            _relative(m, f"hf/{s['name'].replace('.tar', '.parquet')}")
            for m in sorted(manifests, key=lambda m: m["partition_id"])
            for s in figures(m).get("shards", [])
        ]
        if cfg.pack.hf_export
        else []
    )
    index = {
        "format": "webdataset",
        "sample_layout": {
            "image_format": cfg.pack.image_format,
            "keys": ["input", "edited", "instruction.txt", "json"],
        },
        "splits": {
            split: {
                "shards": [s["url"] for s in shards if s["split"] == split],
                "samples": sum(s["samples"] for s in shards if s["split"] == split),
            }
            for split in ("train", "val")
        },
        "shards": shards,
        "hf_parquet": {split: [u for u in hf if f"/hf/{split}-" in u] for split in ("train", "val")}
        if hf
        else None,
        "config_hash": stage_hash(cfg, PACK),
    }
    url = index_url(cfg)
    storage.write_json_atomic(url, index)
    write_card(cfg, index)  # README.md beside it (with pack.hf_export): the dataset card
    return resolve(index, url)


def _absolute(base: str, entry: str) -> str:
    return entry if "://" in entry or entry.startswith("/") else storage.url_join(base, entry)


def resolve(index: dict[str, Any], index_url: str) -> dict[str, Any]:
    """A copy of ``index`` whose shard (and Hugging Face parquet) entries are full URLs."""
    base = index_url.rsplit("/", 1)[0] if "/" in index_url else "."
    out = copy.deepcopy(index)
    for split in out.get("splits", {}).values():
        split["shards"] = [_absolute(base, u) for u in split.get("shards", [])]
    for shard in out.get("shards", []):
        shard["url"] = _absolute(base, shard["url"])
    if out.get("hf_parquet"):
        out["hf_parquet"] = {k: [_absolute(base, u) for u in v] for k, v in out["hf_parquet"].items()}
    return out


def read_index(index_url: str, resolved: bool = True) -> dict[str, Any]:
    """The index at ``index_url`` (checked: it exists, its train split has shards), entries resolved
    to full URLs unless ``resolved=False`` (the entries as stored, e.g. to hash them)."""
    if not storage.exists(index_url):
        raise MissingFileError(
            f"no shard index at {index_url}: run the generate flow first "
            "(python -m flows.generate --preset ...) or pass the index of existing shards"
        )
    index = storage.read_json(index_url)
    if not index.get("splits", {}).get("train", {}).get("shards"):
        raise InputError(f"{index_url}: the train split has no shards")
    return resolve(index, index_url) if resolved else index
