"""Pack stage: one partition's kept pairs as WebDataset shards (+ Hugging Face parquet with ``pack.hf_export``).

    run(cfg, partition_id)  -> manifest of `pack/<hash>/part-XXXXX/{train,val}-NNNNNN.tar`

The samples and the shard writer are :mod:`tasks.pack.shards`; the run's index (the stage's finalize)
is :mod:`tasks.pack.index`, the dataset card :mod:`tasks.pack.card`.
"""

from __future__ import annotations

import logging

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun
from tasks.common.stage import execute
from tasks.pack.hf_export import write_hf_parquet
from tasks.pack.shards import sample_dict, split_of, write_shard
from tasks.pack.spec import STAGE as PACK


def _caption_meta(cfg: PipelineConfig, captions_url: str) -> dict:
    captions = storage.read_parquet(captions_url)
    models = {
        "diffusion": cfg.models.diffusion_path or cfg.models.diffusion,
        "clip": cfg.models.clip_path or cfg.models.clip,
        "lm": cfg.models.lm_path or cfg.models.lm,
    }
    return {
        r.caption_id: {"url": r.url, "aesthetic_score": r.aesthetic_score, "models": models}
        for r in captions.itertuples()
    }


def run(cfg: PipelineConfig, partition_id: int, *, logger: logging.Logger | None = None) -> dict:
    """Write one partition's kept pairs as shards (see module doc)."""
    p = cfg.pack

    def work(run: PartitionRun) -> None:
        kept = storage.read_parquet(run.input_path("filter", layout.KEPT_FILE))
        run.stats.add("in", len(kept))
        run.figures["shards"] = []
        if kept.empty:
            run.stats.add("out", 0)
            return
        meta = _caption_meta(cfg, run.input_path("captions", layout.CAPTIONS_FILE))
        render_dir = run.input_dir("render")  # kept pairs' images (relative layout: the run can move)
        kept = kept.sort_values("sample_key").reset_index(drop=True)
        kept["split"] = kept["caption_id"].map(lambda c: split_of(c, p.val_fraction))
        shards = []
        for split in ("train", "val"):
            rows = kept[kept["split"] == split]
            for n, start in enumerate(range(0, len(rows), p.shard_max_samples)):
                chunk = rows.iloc[start : start + p.shard_max_samples]
                name = f"{split}-{n:06d}.tar"
                samples = [sample_dict(r, render_dir, p, meta) for _, r in chunk.iterrows()]
                write_shard(run.output(name), samples)
                if p.hf_export:
                    write_hf_parquet(run.output(f"hf/{split}-{n:06d}.parquet"), samples, p.image_format)
                shards.append({"name": name, "split": split, "samples": len(chunk)})
                run.stats.add(f"{split}_samples", len(chunk))
        run.stats.add("out", len(kept))
        run.stats.add("shards", len(shards))
        run.figures["shards"] = shards

    return execute(cfg, PACK, partition_id, work, logger)
