"""`pack/<hash>/README.md`: the dataset card beside the Hugging Face export (the pack stage's finalize).

A Hugging Face dataset card: YAML front matter naming the parquet files per split (so the folder
uploaded as a dataset repository loads with `datasets.load_dataset`), then what a reader of the data
needs: how many pairs and triplets, the CLIP thresholds and models that chose them, the config hashes
of every stage, the code version, and how it was made. Written only with ``pack.hf_export``.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from tasks.captions.generations import partition_ids
from tasks.captions.spec import STAGE as CAPTIONS
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import code_version
from tasks.common.stage import Stage, manifests, stage_hash
from tasks.filter.spec import STAGE as FILTER
from tasks.finetune.spec import FINETUNE
from tasks.judge.spec import STAGE as JUDGE
from tasks.pack.spec import STAGE as PACK
from tasks.render.spec import STAGE as RENDER
from tasks.text.spec import TEXT

CARD = "README.md"
# the generation chain the card's hash table lists (tasks.registry.chain(); a test holds them equal)
CHAIN: tuple[Stage, ...] = (CAPTIONS, FINETUNE, TEXT, RENDER, JUDGE, FILTER, PACK)


def _total(cfg: PipelineConfig, stage: Stage, key: str) -> int:
    found = manifests(cfg, stage, partition_ids(cfg, stage)).values()
    return sum((m or {}).get("counts", {}).get(key, 0) for m in found)


def card_text(cfg: PipelineConfig, index: dict[str, Any]) -> str:
    hf = index.get("hf_parquet") or {}
    front = {
        "license": "other",
        "task_categories": ["image-to-image"],
        "tags": ["image-editing", "instructpix2pix"],
        "pretty_name": f"EditForge {cfg.name}",
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": "train" if split == "train" else "validation", "path": paths}
                    for split, paths in hf.items()
                    if paths
                ],
            }
        ],
    }
    keep, chosen = cfg.render.keep, cfg.selection()
    splits = index["splits"]
    hashes = {s.name: stage_hash(cfg, s) for s in CHAIN}
    rows = [
        ("pairs (train / validation)", f"{splits['train']['samples']:,} / {splits['val']['samples']:,}"),
        ("captions sampled", f"{_total(cfg, CAPTIONS, 'out'):,}"),
        ("triplets (input caption, instruction, output caption)", f"{_total(cfg, TEXT, 'out'):,}"),
        (
            "samples rendered / passed the CLIP filter",
            f"{_total(cfg, RENDER, 'samples'):,} / {_total(cfg, RENDER, 'passed'):,}",
        ),
        ("triplets with a kept pair", f"{_total(cfg, FILTER, 'triplets_kept'):,}"),
        (
            "CLIP thresholds: image-image / directional / caption",
            f"{chosen.clip_image_threshold} / {chosen.clip_direction_threshold} / {chosen.clip_caption_threshold}",
        ),
        ("top k per triplet (by directional similarity)", str(chosen.top_k)),
        (
            "diffusion model",
            f"{cfg.models.diffusion} ({cfg.render.steps} steps, {cfg.render.scheduler}, "
            f"{cfg.render.samples_per_triplet} samples per triplet, {cfg.render.width}x{cfg.render.height})",
        ),
        ("CLIP model", cfg.models.clip),
        ("caption LM", cfg.models.lm),
        ("code version", code_version()),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    hash_table = "\n".join(
        ["| stage | config hash |", "|---|---|", *(f"| {k} | `{v}` |" for k, v in hashes.items())]
    )
    note = f"\n> Note: {cfg.filter.note}\n" if cfg.filter.note else ""
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# EditForge dataset `{cfg.name}`\n\n"
        f"Image-editing pairs (before image, instruction, after image) made the InstructPix2Pix way "
        f"(arXiv 2211.09800): captions sampled from `{cfg.captions.source}`, an edit instruction and output "
        f"caption written for each by a fine-tuned language model, each pair rendered with Stable Diffusion "
        f"and Prompt-to-Prompt shared attention (p ~ U{tuple(cfg.render.p_range)}, text guidance ~ U{tuple(cfg.render.cfg_range)}), kept "
        f"by CLIP similarity (render.keep: {keep.clip_image_threshold} / {keep.clip_direction_threshold} / "
        f"{keep.clip_caption_threshold}), written by EditForge on {time.strftime('%Y-%m-%d')}.\n{note}\n"
        f"{table}\n\nColumns: `original_prompt, original_image, edit_prompt, edited_prompt, edited_image` "
        f"(the released `instructpix2pix-clip-filtered` columns). The WebDataset shards of the same pairs are "
        f"listed in `{layout.INDEX_FILE}`.\n\n## How it was made\n\nEvery stage's outputs live in a folder named "
        f"by its config hash; each partition's `_SUCCESS.json` records its counts, rejections by reason and "
        f"the sha256 of its files.\n\n{hash_table}\n"
    )


def write_card(cfg: PipelineConfig, index: dict[str, Any]) -> str | None:
    """Write the card beside the index (with ``pack.hf_export``); its URL."""
    if not cfg.pack.hf_export:
        return None
    url = storage.url_join(layout.stage_dir(cfg.output_root, "pack", stage_hash(cfg, PACK)), CARD)
    storage.write_bytes_atomic(url, card_text(cfg, index).encode())
    return url
