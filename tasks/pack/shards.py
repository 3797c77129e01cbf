"""WebDataset shards of kept pairs (`train-*.tar`, `val-*.tar`): the pack stage's samples and how a shard is
written (the stage's entry is :mod:`tasks.pack.stage`; the run's index is :mod:`tasks.pack.index`).

Sample layout: key `{caption_id}_{seed}` (no dots), `input.{ext}`, `edited.{ext}`,
`instruction.txt`, `json` (captions, seed, p, cfg, CLIP metrics, the judge ladder's scores that were
computed — `dino_similarity`, `ssim`, `vlm_score` and its criteria, `vlm_model` —, url, model versions).

Each shard is built in memory with `webdataset.TarWriter` (mtime fixed, so identical input gives
byte-identical shards) and written atomically under its final name — unlike `ShardWriter`, a crash
never leaves a partial shard and no empty shard is ever created. The split is decided per triplet
(hash of caption_id), so all samples of one edit land in the same split.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

from PIL import Image

from tasks.common import storage
from tasks.common.config import PackConfig
from tasks.common.layout import image_name
from tasks.common.selection import DINO, METRICS, SSIM, VLM_COLUMNS

JUDGE_SCORES = (DINO, SSIM, *VLM_COLUMNS)
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def split_of(caption_id: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha1(caption_id.encode()).hexdigest()[:8], 16) % 10_000
    return "val" if bucket < val_fraction * 10_000 else "train"


def encode_image(png_bytes: bytes, fmt: str, quality: int = 100) -> bytes:
    """Render's lossless PNG as the shard format (JPEG at quality 100, as the reference saves its pairs)."""
    if fmt == "png":
        return png_bytes
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes)).convert("RGB").save(buf, format=PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def judge_scores(row) -> dict:
    """The judge ladder's scores of a kept pair that were computed (DINOv2, SSIM, the VLM judge's)."""
    scores = {}
    for name in JUDGE_SCORES:
        value = row.get(name)
        if value is not None and not math.isnan(float(value)):
            scores[name] = float(value)
    if scores.get("vlm_score") is not None and row.get("vlm_model"):
        scores["vlm_model"] = str(row["vlm_model"])
    return scores


def sample_dict(row, render_dir: str, cfg: PackConfig, meta: dict) -> dict:
    key = row["sample_key"]
    ext = cfg.image_format
    record = {
        "input": row["input"],
        "edit": row["edit"],
        "output": row["output"],
        "caption_id": row["caption_id"],
        "seed": int(row["seed"]),
        "p2p_p": float(row["p2p_p"]),
        "cfg_scale": float(row["cfg_scale"]),
        **{k: float(row[k]) for k in METRICS},
        **judge_scores(row),
        **meta.get(row["caption_id"], {}),
    }
    return {
        "__key__": key,
        f"input.{ext}": encode_image(
            storage.read_bytes(storage.url_join(render_dir, image_name(key, "input"))), ext, cfg.quality
        ),
        f"edited.{ext}": encode_image(
            storage.read_bytes(storage.url_join(render_dir, image_name(key, "edited"))), ext, cfg.quality
        ),
        "instruction.txt": row["edit"].encode("utf-8"),
        "json": json.dumps(record, sort_keys=True).encode("utf-8"),
    }


def write_shard(url: str, samples: list[dict]) -> None:
    import webdataset as wds  # here: the package imports torch (webdataset.pytorch), the rest of pack needs none

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    storage.write_bytes_atomic(url, buf.getvalue())
