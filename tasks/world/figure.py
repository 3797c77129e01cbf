"""A grid of a run's kept pairs (before | after, the instruction, the scores), drawn with matplotlib.

    python -m tasks.world.figure                          # the `world` run -> docs/world-pairs.png
    python -m tasks.world.figure --preset world --set output_root=/tmp/w --out /tmp/pairs.png

Reads the finished render partitions of the config (``samples.parquet`` and the PNGs of the kept
pairs, ``render.save_images``) and shows up to ``--pairs`` kept pairs, spread over the edit kinds
(:func:`tasks.world.grammar.edit_kind` of the captions), best directional similarity first within a kind.
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
from tasks.world.evaluate import with_kinds

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
        raise SystemExit(f"no finished render partition under {cfg.output_root}: run `editforge run --preset {cfg.name}`")
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
        ax.set_title(f"{row.edit}\n[{row.kind}] dir {row.clip_sim_dir:.2f}  img {row.clip_sim_image:.2f}", fontsize=7.5)
    fig.suptitle(f"{cfg.name}: kept pairs (before | after), render {stage_hash(cfg, 'render')[:8]}", fontsize=9)
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    kept = kept_pairs(cfg)
    pairs = pick(kept, args.pairs)
    draw_grid(cfg, pairs, args.out, args.columns)
    print(f"wrote {args.out}: {len(pairs)} of {len(kept)} kept pairs "
          f"({', '.join(f'{k} {n}' for k, n in pairs['kind'].value_counts().sort_index().items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
