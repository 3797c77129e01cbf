"""Render stage: Prompt-to-Prompt pairs for every kept triplet, CLIP-scored in the same pass.

Per partition: every (triplet, sample) request is rendered in fixed batches of `render.batch_samples`
samples (UNet batch 4 x that), the pairs are scored with CLIP on the decoded tensors, and every
sample's metrics go to a checkpoint chunk. Images of samples that pass the thresholds are written
as lossless PNG under `images/`; at the end the top-k per triplet are marked `kept` and
`samples.parquet` is written. Because each sample is a pure function of (triplet, seed), a resumed
run produces exactly the rows and images of an uninterrupted one.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun, execute_partition
from tasks.common.models import load_clip, load_diffusion
from tasks.filter.scorer import ClipScorer
from tasks.filter.select import failure_reason, passes, select_top_k
from tasks.render.pairs import PairRequest, RenderSettings, render_pairs
from tasks.render.sampling import sample_seeds

STAGE = "render"
SAMPLE_COLUMNS = ["caption_id", "sample_key", "seed", "p2p_p", "cfg_scale", "clip_sim_0", "clip_sim_1",
                  "clip_sim_dir", "clip_sim_image", "passed", "image_stored", "kept", "input", "edit", "output"]


def sample_key(caption_id: str, seed: int) -> str:
    """WebDataset-safe key (no dots): `{caption_id}_{seed}`."""
    return f"{caption_id}_{seed}"


def image_name(key: str, which: str) -> str:
    return f"images/{key}_{which}.png"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def settings_from(cfg: PipelineConfig) -> RenderSettings:
    r = cfg.render
    return RenderSettings(steps=r.steps, height=r.height, width=r.width, cfg_range=tuple(r.cfg_range),
                          p_range=tuple(r.p_range), attention=r.attention)


class Renderer:
    """Models loaded once per process and reused across partitions."""

    def __init__(self, cfg: PipelineConfig):
        self.device = resolve_device(cfg.render.device)
        dtype = getattr(torch, cfg.render.dtype)
        self.dtype = dtype if self.device.type == "cuda" else torch.float32
        self.diffusion = load_diffusion(cfg.models.diffusion, cfg.models.diffusion_path, cfg.render.scheduler)
        self.diffusion.to(self.device, self.dtype)
        self.scorer = ClipScorer(load_clip(cfg.models.clip, cfg.models.clip_path), self.device)


_RENDERERS: dict[str, Renderer] = {}


def get_renderer(cfg: PipelineConfig) -> Renderer:
    """One Renderer (models on device) per process and render config, reused across partitions."""
    key = cfg.stage_hash(STAGE)
    if key not in _RENDERERS:
        _RENDERERS.clear()
        _RENDERERS[key] = Renderer(cfg)
    return _RENDERERS[key]


def run_render_partition(cfg: PipelineConfig, partition_id: int, renderer: Renderer | None = None,
                         logger: logging.Logger | None = None) -> dict:
    r = cfg.render
    logger = logger or logging.getLogger("editforge")

    def work(run: PartitionRun) -> None:
        triplets = storage.read_parquet(storage.url_join(run.input_dir("text"), "triplets.parquet"))
        run.stats.add("in", len(triplets))
        triplets = triplets[triplets["status"] == "ok"].sort_values("caption_id").reset_index(drop=True)
        requests = [
            (PairRequest(row.caption_id, row.input, row.output, seed), row.edit)
            for row in triplets.itertuples()
            for seed in sample_seeds(row.caption_id, r.samples_per_triplet, r.base_seed)
        ]
        batches = [requests[i: i + r.batch_samples] for i in range(0, len(requests), r.batch_samples)]
        checkpoint = run.checkpoint("sample_key")
        done = checkpoint.done_keys()
        pending = [b for b in batches if not {sample_key(q.key, q.seed) for q, _ in b} <= done]
        if len(pending) < len(batches):
            logger.info("render part-%05d: resuming, %d of %d batches already rendered",
                        partition_id, len(batches) - len(pending), len(batches))
        if pending:
            nonlocal renderer
            renderer = renderer or get_renderer(cfg)
            settings = settings_from(cfg)
            for batch in tqdm(pending, desc=f"render pairs p{partition_id}", unit="batch", leave=False):
                reqs = [q for q, _ in batch]
                with run.stats.timer("render"):
                    pairs = render_pairs(renderer.diffusion, reqs, settings, device=renderer.device,
                                         dtype=renderer.dtype)
                with run.stats.timer("clip"):
                    m = renderer.scorer.score_pairs(pairs.before, pairs.after, [q.input_caption for q in reqs],
                                                    [q.output_caption for q in reqs])
                rows = pd.DataFrame({
                    "caption_id": [q.key for q in reqs],
                    "sample_key": [sample_key(q.key, q.seed) for q in reqs],
                    "seed": [q.seed for q in reqs],
                    "p2p_p": [p.p2p_p for p in pairs.params],
                    "cfg_scale": [p.cfg_scale for p in pairs.params],
                    **{k: v.cpu().numpy().astype(float) for k, v in m.items()},
                    "input": [q.input_caption for q in reqs],
                    "edit": [e for _, e in batch],
                    "output": [q.output_caption for q in reqs],
                })
                rows["passed"] = passes(rows, cfg.filter).to_numpy()
                rows["image_stored"] = rows["passed"]
                for i in np.flatnonzero(rows["passed"].to_numpy()):
                    key = rows["sample_key"].iloc[i]
                    storage.write_bytes_atomic(run.path(image_name(key, "input")), to_png(pairs.before[i]))
                    storage.write_bytes_atomic(run.path(image_name(key, "edited")), to_png(pairs.after[i]))
                checkpoint.append(rows["sample_key"].iloc[0], rows)
        samples = checkpoint.load()
        if not len(samples):
            samples = pd.DataFrame(columns=SAMPLE_COLUMNS)
        samples = samples.sort_values(["caption_id", "seed"]).reset_index(drop=True)
        samples["kept"] = select_top_k(samples, cfg.filter, samples["image_stored"].astype(bool)).to_numpy()
        storage.write_parquet_atomic(run.output("samples.parquet"), samples[SAMPLE_COLUMNS])
        for key in samples.loc[samples["image_stored"].astype(bool), "sample_key"]:
            run.output(image_name(key, "input"))
            run.output(image_name(key, "edited"))
        run.stats.add("samples", len(samples))
        run.stats.add("unet_calls", len(batches) * r.steps)
        run.stats.add("passed", int(samples["passed"].sum()))
        run.stats.add("out", int(samples["kept"].sum()))
        run.stats.add("triplets_with_kept_pair", int(samples.loc[samples["kept"].astype(bool), "caption_id"].nunique()))
        for reason, n in failure_reason(samples, cfg.filter).dropna().value_counts().items():
            run.stats.reject(reason, n)
        for col in ("clip_sim_dir", "clip_sim_image", "clip_sim_0", "clip_sim_1"):
            run.stats.observe(col, samples[col].to_numpy(dtype=float))
        if "render" in run.stats.timings and len(samples):
            run.extra["samples_per_s"] = round(len(samples) / max(run.stats.timings["render"], 1e-9), 3)

    return execute_partition(STAGE, partition_id, cfg.output_root, cfg.stage_hash(STAGE), work, logger)
