"""The run's pictures (matplotlib, Agg): what `report.html` and the dashboard's report artifact show.

Every figure is made from what is on disk for one config (manifests, ``samples.parquet``, ``kept.parquet``,
the kept pairs' PNGs, the loss curves), so ``editforge report --html`` rebuilds them at any time: the CLIP
metrics' histograms, pass rate against p and cfg, the survival funnel, the best and worst kept pairs and
the loss curves. A large run reads at most ``max_partitions`` render/filter partitions for the sample
figures, and says so.

Each figure: docs/monitoring.md ("In the code").
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from flows.dashboard import finished  # noqa: E402
from tasks import registry  # noqa: E402
from tasks.common import contract, layout, storage  # noqa: E402
from tasks.common.config import PipelineConfig  # noqa: E402
from tasks.common.selection import METRICS, RUNGS, thresholds  # noqa: E402

LABELS = {
    "clip_sim_0": "image 0 vs input caption",
    "clip_sim_1": "image 1 vs output caption",
    "clip_sim_dir": "directional similarity",
    "clip_sim_image": "image 0 vs image 1",
}
DPI = 90
RUNG_NAMES = {"clip": "CLIP", "dino": "DINOv2", "ssim": "SSIM", "vlm": "the VLM judge"}
# a rejection reason -> the rung that counts it (reasons of no rung: top-k, images not stored)
REASON_RUNG = {
    "clip_direction": "clip",
    "clip_caption": "clip",
    "clip_image": "clip",
    "early_rejected": "clip",
    "dino_similarity": "dino",
    "dino_not_scored": "dino",
    "ssim_low": "ssim",
    "ssim_high": "ssim",
    "ssim_not_scored": "ssim",
    "vlm_score": "vlm",
    "vlm_unparseable": "vlm",
    "vlm_refused": "vlm",
    "vlm_not_judged": "vlm",
}


@dataclass
class RunData:
    """What the figures read, gathered once."""

    cfg: PipelineConfig
    manifests: dict[str, list[dict]]
    samples: pd.DataFrame
    kept: pd.DataFrame  # with `render_dir`: the render partition holding its images
    partitions_read: int
    partitions_total: int
    source: dict = field(default_factory=dict)
    train: dict | None = None


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def gather(cfg: PipelineConfig, max_partitions: int = 20) -> RunData:
    from flows.report import source_stats

    manifests = {s.name: finished(cfg, s.name) for s in registry.chain()}
    render = _spread(manifests["render"], max_partitions)
    frames = [
        storage.read_parquet(storage.url_join(cfg.output_root, m["path"], layout.SAMPLES_FILE))
        for m in render
    ]
    samples = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["caption_id", *METRICS])
    )
    render_dirs = {
        m["partition_id"]: storage.url_join(cfg.output_root, m["path"]) for m in manifests["render"]
    }
    kept_frames = []
    for m in _spread(manifests["filter"], max_partitions):
        if m["partition_id"] in render_dirs:
            df = storage.read_parquet(storage.url_join(cfg.output_root, m["path"], layout.KEPT_FILE))
            kept_frames.append(df.assign(render_dir=render_dirs[m["partition_id"]]))
    kept = pd.concat(kept_frames, ignore_index=True) if kept_frames else pd.DataFrame()
    return RunData(
        cfg,
        manifests,
        samples,
        kept,
        len(render),
        len(manifests["render"]),
        source_stats(cfg),
        _train_manifest(cfg),
    )


def _train_manifest(cfg: PipelineConfig) -> dict | None:
    """The training flow's manifest for this run's shards, when it has run."""
    from tasks.pack.index import read_index
    from tasks.train.stage import train_hash

    url = registry.index_url(cfg)
    if not storage.exists(url):
        return None
    found = registry.manifests(
        cfg, "train", [0], config_hash=train_hash(cfg, read_index(url, resolved=False))
    )
    return found.get(0)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def jpeg(fig) -> bytes:
    """Photos (the pair grids) as JPEG: a PNG of rendered images is ten times the size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=72, bbox_inches="tight", pil_kwargs={"quality": 80})
    plt.close(fig)
    return buf.getvalue()


def _note(data: RunData) -> str:
    return (
        f"{len(data.samples):,} samples from {data.partitions_read} of {data.partitions_total} render "
        f"partitions"
        if data.partitions_read < data.partitions_total
        else f"{len(data.samples):,} samples"
    )


def metrics_figure(data: RunData) -> bytes:
    keep, chosen = thresholds(data.cfg.render.keep), thresholds(data.cfg.selection())
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, metric in zip(axes.flat, ("clip_sim_dir", "clip_sim_image", "clip_sim_0", "clip_sim_1")):
        values = pd.to_numeric(data.samples.get(metric, pd.Series(dtype=float)), errors="coerce").dropna()
        if len(values):
            ax.hist(values, bins=40, color="#4c72b0", alpha=0.85)
            share = float((values >= chosen[metric]).mean())
            ax.set_title(f"{LABELS[metric]} ({metric}): {share:.0%} ≥ threshold", fontsize=10)
        else:
            ax.set_title(f"{LABELS[metric]}: no scored samples", fontsize=10)
        ax.axvline(keep[metric], color="#c44e52", linestyle="--", label=f"render.keep {keep[metric]:g}")
        if chosen[metric] != keep[metric]:
            ax.axvline(chosen[metric], color="#dd8452", linestyle=":", label=f"filter {chosen[metric]:g}")
        ax.legend(fontsize=8)
        ax.set_ylabel("samples")
    fig.suptitle(f"CLIP metrics of the scored samples — {_note(data)}", fontsize=11)
    fig.tight_layout()
    return png(fig)


def _binned(df: pd.DataFrame, column: str, bins: int) -> pd.DataFrame:
    values = pd.to_numeric(df[column], errors="coerce")
    if values.nunique() <= bins:
        groups = df.groupby(values)
        centers = np.asarray(list(groups.groups))
    else:
        cut = pd.cut(values, bins)
        groups = df.groupby(cut, observed=True)
        centers = np.asarray([interval.mid for interval in groups.groups])
    out = groups["passed"].agg(["mean", "size"]).reset_index(drop=True)
    out["x"] = centers
    return out.sort_values("x")


def pass_rate_figure(data: RunData) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    df = data.samples.assign(passed=data.samples.get("passed", pd.Series(dtype=bool)).astype(bool))
    for ax, column, label in (
        (axes[0], "p2p_p", "Prompt-to-Prompt p (share of steps with shared attention)"),
        (axes[1], "cfg_scale", "text guidance (cfg)"),
    ):
        if column in df and len(df):
            rows = _binned(df, column, 8)
            width = (rows["x"].max() - rows["x"].min()) / max(len(rows), 1) * 0.8 or 0.05
            ax.bar(rows["x"], rows["mean"], width=width, color="#55a868")
            for x, y, n in zip(rows["x"], rows["mean"], rows["size"]):
                ax.annotate(f"n={n}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("pass rate")
        ax.set_ylim(0, 1.05)
    fig.suptitle(
        f"Pass rate (every CLIP threshold met; early-rejected samples count as failed) — {_note(data)}",
        fontsize=10,
    )
    fig.tight_layout()
    return png(fig)


def funnel_rows(data: RunData) -> list[dict]:
    """Each step of the funnel: its count and the rejections (by reason) that led to it."""

    def total(stage: str, key: str) -> int:
        return sum(m.get("counts", {}).get(key, 0) for m in data.manifests.get(stage, []))

    def rejected(*stages: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage in stages:
            for m in data.manifests.get(stage, []):
                for k, v in m.get("rejected", {}).items():
                    out[k] = out.get(k, 0) + v
        return out

    filter_rej = rejected("filter")
    ladder = [
        r
        for r in RUNGS
        if any(f"ladder_{r}_in" in m.get("counts", {}) for m in data.manifests.get("filter", []))
    ]
    rows = [
        {"step": "source rows read", "count": data.source.get("counts", {}).get("rows_read"), "rejected": {}},
        {
            "step": "captions sampled",
            "count": total("captions", "out"),
            "rejected": data.source.get("rejected", {}),
        },
        {"step": "triplets generated", "count": total("text", "out"), "rejected": rejected("text")},
        {"step": "samples rendered", "count": total("render", "samples"), "rejected": {}},
    ]
    if ladder:  # each rung of the judge ladder, as the filter applied it (tasks/common/selection.py)
        rows += [
            {
                "step": f"passed {RUNG_NAMES.get(r, r)}",
                "count": total("filter", f"ladder_{r}_passed"),
                "rejected": {k: v for k, v in filter_rej.items() if REASON_RUNG.get(k) == r},
            }
            for r in ladder
        ]
    else:
        rows.append(
            {
                "step": "passed the CLIP filter",
                "count": total("render", "passed"),
                "rejected": rejected("render"),
            }
        )
    rows += [
        {
            "step": "kept pairs",
            "count": total("filter", "out"),
            "rejected": {k: v for k, v in filter_rej.items() if REASON_RUNG.get(k) is None},
        },
        {"step": "triplets with a kept pair", "count": total("filter", "triplets_kept"), "rejected": {}},
        {"step": "pairs packed", "count": total("pack", "out"), "rejected": rejected("pack")},
    ]
    return [r for r in rows if r["count"] is not None]


def funnel_figure(data: RunData) -> bytes:
    rows = funnel_rows(data)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1))
    y = np.arange(len(rows))[::-1]
    counts = [r["count"] for r in rows]
    ax.barh(y, counts, color="#8172b3")
    ax.set_xscale("symlog")
    ax.set_yticks(y, [r["step"] for r in rows])
    for yi, r in zip(y, rows):
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(r["rejected"].items(), key=lambda kv: -kv[1])[:4])
        ax.annotate(
            f" {r['count']:,}" + (f"   (rejected: {why})" if why else ""),
            (max(r["count"], 1), yi),
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0.5, max(max(counts, default=1), 1) * 60)
    ax.set_xlabel("count (log scale)")
    ax.set_title(
        "Survival funnel: from captions to kept pairs, each rung of the judge ladder with its rejections",
        fontsize=11,
    )
    fig.tight_layout()
    return png(fig)


def _image(url: str) -> np.ndarray | None:
    try:
        return np.asarray(Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB"))
    except (OSError, ValueError):
        return None


def pairs_figure(data: RunData, best: bool, n: int = 6) -> bytes:
    kept = data.kept
    if len(kept):
        kept = kept.sort_values(["clip_sim_dir", "sample_key"], ascending=[not best, True]).head(n)
    rows = max(len(kept), 1)
    fig, axes = plt.subplots(
        rows, 3, figsize=(10, 2.3 * rows), gridspec_kw={"width_ratios": [1, 1, 2.2]}, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, (_, r) in enumerate(kept.iterrows()):
        for j, which in enumerate(("input", "edited")):
            img = _image(storage.url_join(r["render_dir"], layout.image_name(r["sample_key"], which)))
            if img is not None:
                axes[i, j].imshow(img)
            axes[i, j].set_title("before" if which == "input" else "after", fontsize=8)
        text = (
            f"edit: {r['edit']}\n\ninput: {r['input']}\noutput: {r['output']}\n\n"
            f"directional {r['clip_sim_dir']:.3f}   image-image {r['clip_sim_image']:.3f}\n"
            f"caption 0 {r['clip_sim_0']:.3f}   caption 1 {r['clip_sim_1']:.3f}   p {r['p2p_p']:.2f}   "
            f"cfg {r['cfg_scale']:.1f}"
        )
        axes[i, 2].text(0, 0.5, text, va="center", fontsize=8, wrap=True)
    if not len(kept):
        axes[0, 2].text(0, 0.5, "no kept pairs", fontsize=10)
    which = "highest" if best else "lowest"
    fig.suptitle(
        f"Kept pairs with the {which} directional similarity (before | after | instruction, scores)",
        fontsize=11,
    )
    fig.tight_layout()
    return jpeg(fig)


def loss_figure(data: RunData) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    finetune = contract.figures(next(iter(data.manifests.get("finetune", [])), {})).get("finetune", {})
    curves = (
        (
            axes[0],
            finetune.get("loss_curve") or [],
            f"caption LM fine-tune ({finetune.get('base_model', '-')})",
        ),
        (axes[1], contract.figures(data.train or {}).get("loss_curve") or [], "editing model training"),
    )
    for ax, curve, title in curves:
        if curve:
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], color="#c44e52")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        else:
            ax.text(
                0.5,
                0.5,
                "not run yet" if "training" in title else "no loss curve (API fine-tune)",
                ha="center",
                va="center",
            )
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png(fig)


# name -> (title, file name, how it is made)
FIGURES = {
    "funnel": ("Survival funnel", "funnel.png", funnel_figure),
    "metrics": ("CLIP metrics", "metrics.png", metrics_figure),
    "pass_rate": ("Pass rate against p and cfg", "pass_rate.png", pass_rate_figure),
    "best": ("Best kept pairs", "pairs_best.jpg", lambda d: pairs_figure(d, best=True)),
    "worst": ("Worst kept pairs", "pairs_worst.jpg", lambda d: pairs_figure(d, best=False)),
    "loss": ("Loss curves", "loss.png", loss_figure),
}


def make_all(data: RunData) -> dict[str, bytes]:
    """Every figure's bytes (PNG, or JPEG for the pair grids), by name."""
    return {name: make(data) for name, (_, _, make) in FIGURES.items()}
