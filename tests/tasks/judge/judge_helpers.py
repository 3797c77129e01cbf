"""Helpers for the judge ladder tests: a finished render partition with stored images (no diffusion model
needed) and configs whose VLM judge points at the OpenAI fake."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `fakes`

from fakes.openai_server import FakeOpenAIServer

from tasks.common import storage
from tasks.common.config import PipelineConfig, load_config
from tasks.common.layout import SAMPLES_FILE, image_name
from tasks.common.selection import passes, select_top_k
from tasks.registry import partition_url, stage_hash

API_KEY = "sk-editforge-judge-test-DO-NOT-LEAK-77e1b0"
KEY_ENV = "EDITFORGE_TEST_JUDGE_KEY"
MODEL = "gpt-4o-mini-2024-07-18"  # priced as gpt-4o-mini by the default table


def judge_overrides(fake: FakeOpenAIServer, root: Path | str, *overrides: str) -> list[str]:
    """The demo preset (CLIP, DINOv2, SSIM rungs) with the VLM rung on, pointed at the fake, fast retries."""
    return [
        f"output_root={root}",
        "render.save_images=passed",
        "judges.vlm.enabled=true",
        f"judges.vlm.base_url={fake.base_url}",
        f"judges.vlm.api_key_env={KEY_ENV}",
        f"judges.vlm.model={MODEL}",
        "judges.vlm.poll_interval_s=0.01",
        "judges.vlm.backoff_initial_s=0.005",
        "judges.vlm.backoff_max_s=0.05",
        "judges.vlm.max_retries=30",
        "judges.vlm.checkpoint_interval_s=0.2",
        "judges.vlm.request_timeout_s=20",
        "judges.vlm.concurrency=8",
        *overrides,
    ]


def judge_config(fake: FakeOpenAIServer, root: Path | str, *overrides: str) -> PipelineConfig:
    return load_config("demo", judge_overrides(fake, root, *overrides))


def png(seed: int, shift: float = 0.0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.random((64, 64, 3))
    array = (np.clip(base + shift, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def fake_render(
    cfg: PipelineConfig,
    triplets: int = 6,
    samples: int = 4,
    instructions: dict[int, str] | None = None,
    partition_id: int = 0,
) -> pd.DataFrame:
    """A finished render partition under ``cfg``'s render hash: hand-made metrics (some samples fail CLIP,
    DINOv2 or SSIM), ``passed`` / ``kept`` / ``image_stored`` as render would set them, PNGs stored."""
    rng = np.random.default_rng(partition_id)
    rows = []
    for t in range(triplets):
        cid = f"{partition_id:02d}{t:014x}"
        edit = (instructions or {}).get(t, f"make scene {t} snowy")
        for k in range(samples):
            rows.append(
                {
                    "caption_id": cid,
                    "sample_key": f"{cid}_{k}",
                    "seed": k,
                    "p2p_p": 0.5,
                    "cfg_scale": 7.5,
                    "clip_sim_0": 0.3,
                    "clip_sim_1": 0.3,
                    "clip_sim_dir": float(rng.uniform(-0.2, 0.5)),
                    "clip_sim_image": float(rng.uniform(0.45, 1.0)),
                    "dino_similarity": float(rng.uniform(0.7, 1.0)),
                    "dino_model": "tiny",
                    "ssim": float(rng.uniform(0.6, 0.99)),
                    "input": f"a photo of scene {t}",
                    "edit": edit,
                    "output": f"a snowy photo of scene {t}",
                    "sample_index": k,
                    "round": 0,
                    "unet_steps": 10,
                    "early_rejected": False,
                }
            )
    df = pd.DataFrame(rows)
    keep, rungs = cfg.render.keep, ("clip", *cfg.judges.image_rungs())
    df["passed"] = passes(df, keep, rungs).to_numpy()
    df.loc[~passes(df, keep, ("clip",)).to_numpy(), ["dino_similarity", "dino_model", "ssim"]] = [
        np.nan,
        None,
        np.nan,
    ]
    df.loc[~passes(df, keep, ("clip", "dino")).to_numpy(), "ssim"] = np.nan
    df["kept"] = select_top_k(df, keep, rungs=rungs).to_numpy()
    df["image_stored"] = df["passed"] if cfg.render.save_images == "passed" else df["kept"]
    folder = partition_url(cfg, "render", partition_id)
    for i, key in enumerate(df.loc[df["image_stored"], "sample_key"]):
        storage.write_bytes_atomic(storage.url_join(folder, image_name(key, "input")), png(i))
        storage.write_bytes_atomic(storage.url_join(folder, image_name(key, "edited")), png(i, 0.1))
    storage.write_parquet_atomic(storage.url_join(folder, SAMPLES_FILE), df)
    storage.write_json_atomic(
        storage.url_join(folder, "_SUCCESS.json"), {"config_hash": stage_hash(cfg, "render")}
    )
    return df


def judgments(cfg: PipelineConfig, partition_id: int = 0) -> pd.DataFrame:
    return storage.read_parquet(
        storage.url_join(partition_url(cfg, "judge", partition_id), "judgments.parquet")
    )


def kept(cfg: PipelineConfig, partition_id: int = 0) -> pd.DataFrame:
    return storage.read_parquet(storage.url_join(partition_url(cfg, "filter", partition_id), "kept.parquet"))
