"""Render stage: Prompt-to-Prompt pairs for every kept triplet, CLIP-scored in the same pass.

Per partition a :class:`~tasks.render.scheduling.RenderPlan` picks the samples to render and groups them into
cohorts; each cohort is rendered, scored with CLIP against ``render.keep`` and the judge ladder's image rungs
while in memory, and checkpointed. At the end the top-k per triplet are ``kept``, their images move to
``images/`` and ``samples.parquet`` is written. A resumed run replays the checkpoint into the plan and writes
the rows of an uninterrupted run.

The cohorts, resume, p-branching and the manifest's counts in full: docs/render.md ("In the code").
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
from tasks.common.contract import Checkpoint, PartitionRun
from tasks.common.errors import MissingFileError
from tasks.common.layout import SAMPLES_FILE, TRIPLETS_FILE, image_name, sample_key
from tasks.common.selection import (
    DINO,
    METRICS,
    SSIM,
    failure_reason,
    funnel,
    passes,
    per_seed_eligible,
    select_top_k,
    thresholds,
)
from tasks.common.stage import execute
from tasks.render.early import early_step_count
from tasks.render.pairs import PairRequest
from tasks.render.renderer import BatchSizer, Renderer, ScoredBatch, get_renderer, is_oom, settings_from
from tasks.render.scheduling import PlannedSample, RenderPlan, SamplingPolicy
from tasks.render.spec import STAGE as RENDER
from tasks.scoring.image_rungs import SSIM_LIBRARY, score_image_rungs

STAGE = "render"
SAMPLE_COLUMNS = [
    "caption_id",
    "sample_key",
    "seed",
    "p2p_p",
    "cfg_scale",
    *METRICS,
    DINO,
    "dino_model",
    SSIM,
    "passed",
    "image_stored",
    "kept",
    "input",
    "edit",
    "output",
    "sample_index",
    "round",
    "unet_steps",
    "early_rejected",
    *(f"early_{m}" for m in METRICS),
    "branch",
    "unet_images",
]


def to_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def render_rungs(cfg: PipelineConfig) -> tuple[str, ...]:
    """The ladder's rungs render applies: CLIP and the enabled image rungs (DINOv2, SSIM)."""
    return ("clip", *cfg.judges.image_rungs())


def cohort_rows(
    cohort: list[PlannedSample],
    triplets: pd.DataFrame,
    scored: ScoredBatch,
    cfg: PipelineConfig,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """One row per rendered sample (``kept`` is decided at the end of the partition): the CLIP metrics,
    then the image rungs on the samples that passed CLIP (DINOv2, then SSIM on those DINOv2 passed)."""
    pairs = scored.pairs
    info = [triplets.loc[s.caption_id] for s in cohort]
    rows = pd.DataFrame(
        {
            "caption_id": [s.caption_id for s in cohort],
            "sample_key": [
                sample_key(s.caption_id, s.seed, s.branch if cfg.render.p_branches > 1 else None)
                for s in cohort
            ],
            "seed": [s.seed for s in cohort],
            "p2p_p": [p.p2p_p for p in pairs.params],
            "cfg_scale": [p.cfg_scale for p in pairs.params],
            **{k: scored.metrics[k].numpy().astype(float) for k in METRICS},
            "input": [t["input"] for t in info],
            "edit": [t["edit"] for t in info],
            "output": [t["output"] for t in info],
            "sample_index": [s.index for s in cohort],
            "round": [s.round for s in cohort],
            "unet_steps": pairs.unet_steps,
            "early_rejected": pairs.early_rejected,
            **{
                f"early_{k}": (
                    pairs.early_metrics[k].numpy().astype(float)
                    if pairs.early_metrics
                    else np.full(len(cohort), np.nan)
                )
                for k in METRICS
            },
            "branch": [s.branch for s in cohort],
            "unet_images": pairs.unet_images,
        }
    )
    clip_passed = passes(rows, cfg.render.keep).to_numpy()
    rungs = score_image_rungs(rows, pairs.before, pairs.after, cfg, torch.device(device), clip_passed)
    for name, values in rungs.items():
        rows[name] = values
    rows["passed"] = passes(rows, cfg.render.keep, render_rungs(cfg)).to_numpy()
    return rows


def staged(checkpoint: Checkpoint, key: str, which: str) -> str:
    """Where a sample's image waits (beside the checkpoint chunks) until the partition decides on it."""
    return storage.url_join(checkpoint.dir, image_name(key, which))


def to_stage(rows: pd.DataFrame, cfg: PipelineConfig) -> np.ndarray:
    """Positions of the rows whose images may end up stored: passing ones, or all rendered ones."""
    if cfg.render.save_images == "all":
        return np.flatnonzero(~rows["early_rejected"].astype(bool).to_numpy())
    return np.flatnonzero(rows["passed"].to_numpy())


def stored_images(samples: pd.DataFrame, cfg: PipelineConfig) -> pd.Series:
    """Which samples' images the partition writes, per ``render.save_images``."""
    mode = cfg.render.save_images
    if mode == "kept":
        return samples["kept"].astype(bool)
    if mode == "passed":
        return samples["passed"].astype(bool)
    return ~samples["early_rejected"].astype(bool)


def publish_images(run: PartitionRun, checkpoint: Checkpoint, keys: list[str]) -> None:
    """Move the staged images of ``keys`` to ``images/`` and register them (idempotent after a crash)."""
    # one listing, not a lookup per image (a round trip each on an object store)
    waiting = {
        url.rsplit("/", 1)[-1] for url in storage.list_files(storage.url_join(checkpoint.dir, "images"))
    }
    for key in keys:
        for which in ("input", "edited"):
            source, target = staged(checkpoint, key, which), run.output(image_name(key, which))
            if source.rsplit("/", 1)[-1] in waiting:
                storage.move(source, target)
            elif not storage.exists(target):
                raise MissingFileError(
                    f"render part-{run.partition_id:05d}: the {which} image of sample {key} is neither staged "
                    f"({source}) nor stored ({target}); delete {checkpoint.dir} to re-render the partition"
                )


def load_rows(checkpoint: Checkpoint, logger: logging.Logger) -> pd.DataFrame:
    """Rows of the chunks written so far, one per sample (a duplicate sample key is dropped, logged)."""
    rows = checkpoint.load()
    if not len(rows):
        return rows
    duplicated = rows["sample_key"].duplicated()
    if duplicated.any():
        logger.warning("render: %d duplicate sample rows in the checkpoint dropped", int(duplicated.sum()))
        rows = rows[~duplicated]
    return rows.reset_index(drop=True)


def render_cohorts(
    run: PartitionRun,
    cfg: PipelineConfig,
    plan: RenderPlan,
    triplets: pd.DataFrame,
    renderer: Renderer,
    checkpoint: Checkpoint,
    logger: logging.Logger,
    previous: pd.DataFrame | None = None,
) -> dict[str, int]:
    """Render the plan's cohorts until every triplet is finished; return this run's own counts
    (``previous``: the rows a resumed partition had checkpointed, for the running figures)."""
    r = cfg.render
    settings = settings_from(cfg)
    size = (
        r.batch_samples
        if r.batch_samples != "auto"
        else renderer.auto_batch_samples(settings, r.batch_samples_max)
    )
    sizer = BatchSizer(size, logger)
    early_after = early_step_count(r.early_reject.at, r.steps)
    done = {"unet_calls_this_run": 0, "samples_this_run": 0, "cohorts": 0}
    live = LiveFigures(
        plan, r.keep.top_k, previous if previous is not None else pd.DataFrame(), r.keep_per_seed
    )
    progress = tqdm(desc=f"render p{run.partition_id}", unit="sample", leave=False)
    while cohort := plan.next_cohort(sizer.size):
        requests = [
            PairRequest(
                s.caption_id,
                triplets.at[s.caption_id, "input"],
                triplets.at[s.caption_id, "output"],
                s.seed,
                s.branch,
                r.p_branches,
            )
            for s in cohort
        ]
        try:
            with run.stats.timer("render"):
                scored = renderer.render_scored(
                    requests,
                    settings,
                    r.keep,
                    early_after,
                    r.early_reject.margin,
                    r.early_reject.metrics,
                    early_drop=not r.early_reject.dry_run,
                )
        except Exception as err:
            if not is_oom(err):
                raise
            sizer.shrink(err)
            continue
        rows = cohort_rows(cohort, triplets, scored, cfg, renderer.device)
        for i in to_stage(rows, cfg):  # images first, then the chunk: a recorded row's image exists
            key = rows["sample_key"].iloc[i]
            storage.write_bytes_atomic(staged(checkpoint, key, "input"), to_png(scored.pairs.before[i]))
            storage.write_bytes_atomic(staged(checkpoint, key, "edited"), to_png(scored.pairs.after[i]))
        checkpoint.append(rows["sample_key"].iloc[0], rows)
        plan.record(zip(rows["caption_id"], rows["sample_index"], rows["passed"]))
        done["unet_calls_this_run"] += int(rows["unet_steps"].sum())
        done["samples_this_run"] += len(rows)
        run.report_progress(
            sum(plan.status_counts().values()) / max(1, len(plan.triplets)),
            live.update(rows, done, run.stats.timings.get("render", 0.0)),
        )
        done["cohorts"] += 1
        progress.update(len(cohort))
    progress.close()
    done["batch_samples"] = sizer.size
    done["oom_halvings"] = sizer.halvings
    return done


class LiveFigures:
    """The partition's running figures for the dashboard, as it checkpoints: samples, pass rate, pairs
    it will keep so far (min(passed, top_k) per triplet), UNet calls per kept pair, samples/s."""

    def __init__(self, plan: RenderPlan, top_k: int, earlier: pd.DataFrame, per_seed: int | None = None):
        self.plan, self.top_k, self.per_seed = plan, top_k, per_seed  # `earlier`: a resumed partition's rows
        self.samples, self.passed, self.unet_calls = 0, 0, 0
        self.passed_by_seed: dict[tuple[str, int], int] = {}
        if len(earlier):
            self._add(earlier)

    def _add(self, rows: pd.DataFrame) -> None:
        self.samples += len(rows)
        self.passed += int(rows["passed"].sum())
        self.unet_calls += int(rows["unet_steps"].sum())
        for (cid, seed), n in (
            rows.loc[rows["passed"].astype(bool), ["caption_id", "seed"]].value_counts().items()
        ):
            self.passed_by_seed[cid, int(seed)] = self.passed_by_seed.get((cid, int(seed)), 0) + int(n)

    def update(self, rows: pd.DataFrame, done: dict[str, int], seconds: float) -> dict:
        self._add(rows)
        by_triplet: dict[str, int] = {}
        for (cid, _), n in self.passed_by_seed.items():  # at most keep_per_seed of a seed's branches
            by_triplet[cid] = by_triplet.get(cid, 0) + (n if self.per_seed is None else min(n, self.per_seed))
        kept = sum(min(n, self.top_k) for n in by_triplet.values())
        return {
            "triplets_done": sum(self.plan.status_counts().values()),
            "triplets": len(self.plan.triplets),
            "samples": self.samples,
            "passed": self.passed,
            "pass_rate": round(self.passed / self.samples, 4) if self.samples else None,
            "kept_so_far": kept,
            "unet_calls": self.unet_calls,
            "unet_calls_per_kept_pair": round(self.unet_calls / kept, 1) if kept else None,
            "samples_per_s": round(done["samples_this_run"] / seconds, 3) if seconds > 0 else None,
        }


def run(
    cfg: PipelineConfig,
    partition_id: int,
    *,
    renderer: Renderer | None = None,
    logger: logging.Logger | None = None,
) -> dict:
    """Render one partition's triplets (see module doc); ``renderer`` replaces the models (tests)."""
    r = cfg.render
    logger = logger or logging.getLogger("editforge")

    def work(run: PartitionRun) -> None:
        triplets = storage.read_parquet(run.input_path("text", TRIPLETS_FILE))
        run.stats.add("in", len(triplets))
        triplets = (
            triplets[triplets["status"] == "ok"].drop_duplicates("caption_id").sort_values("caption_id")
        )
        triplets = triplets.set_index("caption_id", drop=False)
        plan = RenderPlan(triplets["caption_id"].tolist(), SamplingPolicy.from_config(cfg), r.base_seed)
        checkpoint = run.checkpoint("sample_key")
        previous = load_rows(checkpoint, logger)
        if len(previous):
            plan.record(zip(previous["caption_id"], previous["sample_index"], previous["passed"]))
            logger.info(
                "render part-%05d: resuming with %d samples already rendered", partition_id, len(previous)
            )
        if not plan.finished:
            nonlocal renderer
            renderer = renderer or get_renderer(cfg, logger)
            run.figures.update(
                render_cohorts(run, cfg, plan, triplets, renderer, checkpoint, logger, previous)
            )

        samples = load_rows(checkpoint, logger)
        if not len(samples):
            samples = pd.DataFrame(columns=SAMPLE_COLUMNS)
        samples = samples.sort_values(["caption_id", "sample_index"]).reset_index(drop=True)
        eligible = per_seed_eligible(samples, r.keep, r.keep_per_seed, render_rungs(cfg))
        samples["kept"] = select_top_k(samples, r.keep, eligible, rungs=render_rungs(cfg)).to_numpy()
        samples["image_stored"] = stored_images(samples, cfg).to_numpy()
        publish_images(
            run, checkpoint, samples.loc[samples["image_stored"].astype(bool), "sample_key"].tolist()
        )
        storage.write_parquet_atomic(run.output(SAMPLES_FILE), samples[SAMPLE_COLUMNS])
        record_stats(run, cfg, plan, samples)

    return execute(cfg, RENDER, partition_id, work, logger)


def record_stats(run: PartitionRun, cfg: PipelineConfig, plan: RenderPlan, samples: pd.DataFrame) -> None:
    """Counts, rejections, quantiles and throughput of the partition for the manifest and dashboard."""
    kept = samples["kept"].astype(bool)
    early = samples["early_rejected"].astype(bool)
    unet_calls = int(samples["unet_steps"].sum())
    run.stats.add("samples", len(samples))
    run.stats.add("unet_calls", unet_calls)
    run.stats.add("unet_images", int(samples["unet_images"].sum()))
    run.stats.add(
        "unet_calls_reference", len(plan.triplets) * cfg.render.samples_per_triplet * cfg.render.steps
    )
    run.stats.add("passed", int(samples["passed"].sum()))
    run.stats.add("early_rejected", int(early.sum()))
    run.stats.add("out", int(kept.sum()))
    run.stats.add("triplets_with_kept_pair", int(samples.loc[kept, "caption_id"].nunique()))
    for status, n in plan.status_counts().items():
        run.stats.add(f"triplets_{status}", n)
    if early.any():
        run.stats.reject("early_rejected", int(early.sum()))
    run.stats.add("images_stored", int(samples["image_stored"].sum()))
    rungs = render_rungs(cfg)
    for reason, n in failure_reason(samples[~early], cfg.render.keep, rungs).dropna().value_counts().items():
        run.stats.reject(reason, n)
    for step in funnel(samples, cfg.render.keep, rungs):  # how many reached each rung, how many passed it
        run.stats.add(f"ladder_{step['rung']}_in", step["in"])
        run.stats.add(f"ladder_{step['rung']}_passed", step["passed"])
    if len(rungs) > 1:
        run.figures["judges"] = {
            "dino": cfg.models.dino_path or cfg.models.dino if "dino" in rungs else None,
            "ssim": SSIM_LIBRARY if "ssim" in rungs else None,
        }
    for col in (*METRICS, DINO, SSIM):
        run.stats.observe(col, samples[col].to_numpy(dtype=float))
    # pass rates: of every sample drawn, and per criterion of those scored at the end (not early-rejected)
    if len(samples):
        run.figures["pass_rate"] = round(float(samples["passed"].astype(bool).mean()), 4)
    scored = samples[~early]
    if len(scored):
        limits = thresholds(cfg.render.keep)
        for col in METRICS:
            run.figures[f"pass_rate_{col}"] = round(float((scored[col] >= limits[col]).mean()), 4)
    if kept.any():
        run.figures["unet_calls_per_kept_pair"] = round(unet_calls / int(kept.sum()), 2)
    seconds = run.stats.timings.get("render", 0.0)
    if seconds > 0 and run.figures.get("samples_this_run"):
        run.figures["samples_per_s"] = round(run.figures["samples_this_run"] / seconds, 3)
        run.figures["unet_calls_per_s"] = round(run.figures["unet_calls_this_run"] / seconds, 3)
