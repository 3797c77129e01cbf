"""Figures of the world: a run's kept pairs, and what Prompt-to-Prompt sharing does, drawn with matplotlib.

    python -m tasks.world_eval.figure                          # the `world` run -> docs/world-pairs.png
    python -m tasks.world_eval.figure --preset world --set output_root=/tmp/w --out /tmp/pairs.png
    python -m tasks.world_eval.figure --sharing                # -> docs/world-sharing.png (renders; ~1 CPU-minute)

Kept pairs: reads the finished render partitions of the config (``samples.parquet`` and the PNGs of the
kept pairs, ``render.save_images``) and shows up to ``--pairs`` kept pairs, spread over the edit kinds
(:func:`tasks.world.grammar.edit_kind` of the captions), best directional similarity first within a kind.

Sharing (``--sharing``): world triplets of every edit kind (world seed 3, which the models never trained
on), each rendered from one seed and one CFG scale as the render stage renders it (its ``Renderer``):
the before image, the after image without sharing (``attention=none``), and the after image with the
before image's self-attention shared for the first p of the steps, for a few p.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.common import storage
from tasks.common.config import PipelineConfig, load_config
from tasks.common.contract import finished
from tasks.common.layout import SAMPLES_FILE, image_name, partition_dir, partition_file
from tasks.registry import partition_ids, stage_hash
from tasks.world_eval.evaluate import with_kinds

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "world-pairs.png"


def kept_pairs(cfg: PipelineConfig) -> pd.DataFrame:
    """The kept samples of every finished render partition, with ``partition`` and ``kind``."""
    h = stage_hash(cfg, "render")
    frames = []
    for i in partition_ids(cfg, "render"):
        if finished(partition_dir(cfg.output_root, "render", h, i), h):
            df = storage.read_parquet(partition_file(cfg.output_root, "render", h, i, SAMPLES_FILE))
            frames.append(df[df["kept"].astype(bool) & df["image_stored"].astype(bool)].assign(partition=i))
    if not frames:
        raise SystemExit(
            f"no finished render partition under {cfg.output_root}: run `editforge run --preset {cfg.name}`"
        )
    return with_kinds(pd.concat(frames, ignore_index=True))


def pick(kept: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` pairs, one triplet at most once, taking the kinds in turn (best directional similarity first)."""
    best = kept.sort_values("clip_sim_dir", ascending=False).drop_duplicates("caption_id")
    queues = {k: list(g.index) for k, g in best.groupby("kind", sort=True)}
    chosen = []
    while len(chosen) < n and any(queues.values()):
        for kind in sorted(queues):
            if queues[kind] and len(chosen) < n:
                chosen.append(queues[kind].pop(0))
    return best.loc[chosen]


def _image(cfg: PipelineConfig, row, which: str) -> np.ndarray:
    folder = partition_dir(cfg.output_root, "render", stage_hash(cfg, "render"), int(row.partition))
    data = storage.read_bytes(storage.url_join(folder, image_name(row.sample_key, which)))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def draw_grid(cfg: PipelineConfig, pairs: pd.DataFrame, out: Path, columns: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(pairs) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.35 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, pairs.itertuples()):
        before, after = _image(cfg, row, "input"), _image(cfg, row, "edited")
        gap = np.full((before.shape[0], 3, 3), 255, dtype=np.uint8)
        ax.imshow(np.concatenate([before, gap, after], axis=1), interpolation="nearest")
        ax.set_title(
            f"{row.edit}\n[{row.kind}] dir {row.clip_sim_dir:.2f}  img {row.clip_sim_image:.2f}", fontsize=7.5
        )
    fig.suptitle(
        f"{cfg.name}: kept pairs (before | after), render {stage_hash(cfg, 'render')[:8]}", fontsize=9
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


SHARING_OUT = DEFAULT_OUT.with_name("world-sharing.png")
SHARING_PS = (0.3, 0.5, 0.7, 0.9)


def render_sharing(cfg: PipelineConfig, per_kind: int = 2, ps: tuple[float, ...] = SHARING_PS, seed: int = 3):
    """(triplets, seeds, cfg scales, before, {column: after}) for :func:`draw_sharing`: ``per_kind`` triplets of
    each edit kind, one seed each, rendered without sharing and with sharing at each p (the same seed, so
    the same noise and CFG scale; the before image is the same in every column)."""
    from dataclasses import replace

    import torch

    from tasks.render.pairs import PairRequest
    from tasks.render.renderer import Renderer, settings_from
    from tasks.render.sampling import sample_seeds
    from tasks.world_eval.evaluate import balanced_triplets, triplet_id

    triplets = balanced_triplets(seed, per_kind)
    renderer = Renderer(cfg)
    base = settings_from(cfg)
    requests = [
        PairRequest(
            triplet_id(t.input, t.output),
            t.input,
            t.output,
            sample_seeds(triplet_id(t.input, t.output), 1, cfg.render.base_seed)[0],
        )
        for t in triplets
    ]
    columns: dict[str, torch.Tensor] = {}
    before = None
    for name, settings in [
        ("no sharing", replace(base, attention="none")),
        *((f"shared, p = {p:g}", replace(base, attention="ip2p", p_range=(p, p))) for p in ps),
    ]:
        pairs = renderer.render(requests, settings)
        before = pairs.before if before is None else before
        columns[name] = pairs.after
        cfgs = [q.cfg_scale for q in pairs.params]
    return triplets, [r.seed for r in requests], cfgs, before, columns


def draw_sharing(triplets, seeds, cfgs, before, columns: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["before", *columns]
    fig, axes = plt.subplots(
        len(triplets), len(names), figsize=(1.45 * len(names) + 2.6, 1.5 * len(triplets)), squeeze=False
    )
    for i, t in enumerate(triplets):
        images = [before[i], *(columns[n][i] for n in columns)]
        for j, (ax, image) in enumerate(zip(axes[i], images)):
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=8)
        axes[i][0].set_ylabel(f"[{t.kind}] cfg {cfgs[i]:.1f}", fontsize=7)
        axes[i][-1].yaxis.set_label_position("right")
        axes[i][-1].set_ylabel(t.edit, fontsize=7, rotation=0, ha="left", va="center")
    fig.suptitle(
        "one seed, one CFG scale per row: the after image without and with shared self-attention", fontsize=9
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="world")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default: {DEFAULT_OUT} ({SHARING_OUT} with --sharing)"
    )
    parser.add_argument("--sharing", action="store_true", help="render the with / without sharing figure")
    parser.add_argument("--per-kind", type=int, default=2, help="--sharing: triplets of each edit kind")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    if args.sharing:
        out = draw_sharing(*render_sharing(cfg, args.per_kind), args.out or SHARING_OUT)
        print(
            f"wrote {out}: {args.per_kind} triplets of each edit kind, without sharing and at p = "
            + ", ".join(f"{p:g}" for p in SHARING_PS)
        )
        return 0
    args.out = args.out or DEFAULT_OUT
    kept = kept_pairs(cfg)
    pairs = pick(kept, args.pairs)
    draw_grid(cfg, pairs, args.out, args.columns)
    print(
        f"wrote {args.out}: {len(pairs)} of {len(kept)} kept pairs "
        f"({', '.join(f'{k} {n}' for k, n in pairs['kind'].value_counts().sort_index().items())})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
