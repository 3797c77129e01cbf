"""The pairs people review: a render version's samples, their standing under the filter, a weighted sample.

:func:`load_samples` reads the finished render partitions of a config (``samples.parquet``, the VLM judge's
scores when it is on) with each pair's image hashes from the partition's manifest (``pair_sha256``: what a
label is tied to), and decides every sample under the filter's selection (``cfg.selection()``, the ladder's
rungs): ``filter_reason`` (the first check it fails, None: passes), ``filter_kept`` (kept: top-k, one per
seed with p-branching, images stored — what the filter stage keeps).

:func:`assign_strata` puts every pair whose two images are stored in one stratum: ``kept``; ``passed``
(passing, left out by top-k); ``near:<reason>`` (rejected by ``reason`` with its score less than ``band``
below the threshold); ``far`` (rejected further away, or for a reason without a score). :func:`review_queue`
draws ``sizes[stratum]`` pairs of each (a hash order of the keys: the same sample for the same run, and a
pair stays in it when partitions are added), each with its weight (pairs in the stratum / pairs drawn), the
strata taken in turn (one pair of each, then the next of each, ...) so that any prefix covers every stratum:
weighted, the labels estimate the precision and recall of every stored pair of the partitions read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import read_success
from tasks.common.selection import (
    DINO,
    SSIM,
    VLM_SCORE,
    failure_reason,
    per_seed_eligible,
    select_top_k,
    thresholds,
)

IMAGES = ("input", "edited")
STRATUM_ORDER = {"kept": 0, "near": 1, "passed": 2, "far": 3}  # within a round of the queue
# rejection reason -> how far below its threshold a sample is (score units; the VLM's 0-10 score scaled to 0-1)
_DISTANCE = {
    "clip_direction": lambda df, s: s.clip_direction_threshold - df["clip_sim_dir"],
    "clip_caption": lambda df, s: s.clip_caption_threshold - np.fmin(df["clip_sim_0"], df["clip_sim_1"]),
    "clip_image": lambda df, s: s.clip_image_threshold - df["clip_sim_image"],
    "dino_similarity": lambda df, s: s.dino_threshold - df[DINO],
    "ssim_low": lambda df, s: s.ssim_min - df[SSIM],
    "ssim_high": lambda df, s: df[SSIM] - s.ssim_max,
    "vlm_score": lambda df, s: (s.vlm_threshold - df[VLM_SCORE]) / 10,
}


class NoRenderError(ValueError):
    """No finished render partition to review (names the config and what to run)."""


def finished_partitions(cfg: PipelineConfig) -> list[int]:
    """The render partitions finished under this config's render hash."""
    from tasks import registry

    return sorted(pid for pid, m in registry.manifests(cfg, "render").items() if m)


def spread(ids: Sequence[int], most: int) -> list[int]:
    """At most ``most`` of ``ids``, evenly spread over them (the first and the last included)."""
    ids = sorted(ids)
    if len(ids) <= most:
        return ids
    return sorted({ids[int(round(i))] for i in np.linspace(0, len(ids) - 1, most)})


def pair_sha256(input_sha: str, edited_sha: str) -> str:
    """One hash for a pair's two images (from the sha256 of each file)."""
    return hashlib.sha256(f"{input_sha}:{edited_sha}".encode()).hexdigest()


def load_samples(cfg: PipelineConfig, partitions: Sequence[int] | None = None) -> pd.DataFrame:
    """The samples of ``partitions`` (default: up to ``review.max_partitions`` of the finished ones) with
    ``partition``, the image hashes and the filter's decision (see the module doc)."""
    from tasks import registry

    render_hash = registry.stage_hash(cfg, "render")
    done = finished_partitions(cfg)
    if not done:
        raise NoRenderError(f"no render partition of '{cfg.name}' is finished under {cfg.output_root} (render hash "
                            f"{render_hash}): run `editforge run --preset ...` with the same --set first")
    if partitions is None:
        partitions = spread(done, cfg.review.max_partitions)
    missing = sorted(set(partitions) - set(done))
    if missing:
        raise NoRenderError(f"render partitions {missing} of '{cfg.name}' are not finished under render hash "
                            f"{render_hash}; finished: {done}")
    rungs = cfg.judges.rungs()
    frames = []
    for pid in partitions:
        folder = layout.partition_dir(cfg.output_root, "render", render_hash, pid)
        df = storage.read_parquet(storage.url_join(folder, layout.SAMPLES_FILE))
        if "vlm" in rungs:
            df = _judged(cfg, pid, df)
        outputs = (read_success(folder) or {}).get("outputs", {})
        for which in IMAGES:
            df[f"{which}_sha256"] = [outputs.get(layout.image_name(k, which)) for k in df["sample_key"]]
        frames.append(df.assign(partition=pid))
    samples = pd.concat(frames, ignore_index=True)
    stored = samples["input_sha256"].notna() & samples["edited_sha256"].notna()
    samples["pair_sha256"] = [pair_sha256(a, b) if ok else None for a, b, ok in
                              zip(samples["input_sha256"], samples["edited_sha256"], stored)]
    samples["image_stored"] = stored.to_numpy()  # what the manifest holds, not what the row says
    decide(samples, cfg)
    return samples


def _judged(cfg: PipelineConfig, pid: int, samples: pd.DataFrame) -> pd.DataFrame:
    """``samples`` with the VLM judge's scores joined by sample key (NaN: not judged, or the judge partition
    is not finished), as the filter stage joins them."""
    from tasks import registry

    judge_hash = registry.stage_hash(cfg, "judge")
    if not registry.manifests(cfg, "judge", [pid], config_hash=judge_hash).get(pid):
        return samples
    judgments = storage.read_parquet(layout.partition_file(cfg.output_root, "judge", judge_hash, pid,
                                                           layout.JUDGMENTS_FILE))
    judgments = judgments.drop(columns=[c for c in ("caption_id",) if c in judgments])
    return samples.merge(judgments, on="sample_key", how="left", validate="one_to_one")


def decide(samples: pd.DataFrame, cfg: PipelineConfig, selection=None) -> pd.DataFrame:
    """Set ``filter_reason`` and ``filter_kept`` under ``selection`` (default: the filter's), in place."""
    selection = selection or cfg.selection()
    rungs = cfg.judges.rungs()
    samples["filter_reason"] = failure_reason(samples, selection, rungs).to_numpy()
    samples["filter_kept"] = reselect(samples, cfg, selection)[0].to_numpy()
    return samples


def reselect(samples: pd.DataFrame, cfg: PipelineConfig, selection) -> tuple[pd.Series, int]:
    """What the filter stage keeps under ``selection`` (as its ``run`` decides it), and how many pairs it
    would want whose images were not stored (``image_not_stored``)."""
    rungs = cfg.judges.rungs()
    if not len(samples):
        return pd.Series(False, index=samples.index), 0
    eligible = per_seed_eligible(samples, selection, cfg.render.keep_per_seed, rungs)
    wanted = select_top_k(samples, selection, eligible, rungs=rungs)
    stored = samples["image_stored"].astype(bool)
    return wanted & stored, int((wanted & ~stored).sum())


def assign_strata(samples: pd.DataFrame, selection, band: float) -> pd.Series:
    """Each pair's stratum (see the module doc); None for a pair without both images stored."""
    reviewable = samples["image_stored"].astype(bool) & ~samples.get("early_rejected", False).astype(bool)
    reason = samples["filter_reason"]
    stratum = pd.Series("far", index=samples.index, dtype=object)
    for name, distance in _DISTANCE.items():
        hit = (reason == name).to_numpy()
        if hit.any():
            d = np.asarray(distance(samples.loc[hit], selection), dtype=float)
            stratum[np.flatnonzero(hit)[d <= band]] = f"near:{name}"
    stratum[reason.isna().to_numpy()] = "passed"
    stratum[samples["filter_kept"].astype(bool).to_numpy()] = "kept"
    stratum[~reviewable.to_numpy()] = None
    return stratum


def stratum_sizes(cfg: PipelineConfig, strata: Sequence[str]) -> dict[str, int]:
    """How many pairs to draw from each stratum (``review.*_pairs``)."""
    r = cfg.review
    sizes = {"kept": r.kept_pairs, "passed": r.passed_pairs, "far": r.far_pairs}
    return {s: sizes.get(s, r.near_pairs) for s in strata}


def _order(seed: str, df: pd.DataFrame) -> np.ndarray:
    """A fixed pseudo-random order of the pairs: a keyed hash (SipHash, the key from ``seed``) of each
    ``partition:sample_key``, vectorised."""
    keys = (df["partition"].astype(str) + ":" + df["sample_key"].astype(str)).to_numpy(dtype=object)
    return pd.util.hash_array(keys, hash_key=hashlib.sha256(seed.encode()).hexdigest()[:16])


def review_queue(samples: pd.DataFrame, strata: pd.Series, sizes: Mapping[str, int], seed: str) -> pd.DataFrame:
    """The pairs to review, in review order, with ``stratum`` and ``weight`` (see the module doc)."""
    df = samples.assign(stratum=strata.to_numpy())
    df = df[df["stratum"].notna()]
    df = df.assign(_order=_order(seed, df))
    parts = []
    for name, group in df.groupby("stratum", sort=True):
        n = min(len(group), int(sizes.get(name, 0)))
        if n == 0:
            continue
        drawn = group.sort_values("_order").head(n)
        parts.append(drawn.assign(weight=len(group) / n, _position=np.arange(n), stratum_pairs=len(group)))
    if not parts:
        return df.iloc[:0].assign(weight=[], stratum_pairs=[]).drop(columns="_order")
    queue = pd.concat(parts)
    first = queue["stratum"].map(lambda s: STRATUM_ORDER.get(s.split(":")[0], len(STRATUM_ORDER)))
    queue = queue.assign(_first=first.to_numpy()).sort_values(["_position", "_first", "stratum"], kind="stable")
    queue = queue.drop(columns="_first")
    return queue.drop(columns=["_order", "_position"]).reset_index(drop=True)


def queue_for(cfg: PipelineConfig, partitions: Sequence[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the review queue, every sample read) for a config."""
    samples = load_samples(cfg, partitions)
    strata = assign_strata(samples, cfg.selection(), cfg.review.band)
    from tasks import registry

    queue = review_queue(samples, strata, stratum_sizes(cfg, strata.dropna().unique()),
                         registry.stage_hash(cfg, "render"))
    return queue, samples.assign(stratum=strata.to_numpy())


def threshold_table(cfg: PipelineConfig) -> dict[str, float]:
    """The filter's thresholds of the score columns the page shows (rungs that are on)."""
    s = cfg.selection()
    table = dict(thresholds(s))
    rungs = cfg.judges.rungs()
    if "dino" in rungs:
        table[DINO] = s.dino_threshold
    if "vlm" in rungs:
        table[VLM_SCORE] = s.vlm_threshold
    return table
