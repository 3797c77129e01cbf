"""Measured CLIP-filter pass rates on the synthetic world, by edit kind (triplet difficulty).

    python bench/world_pass_rates.py                      # render 8 world triplets of each kind x 8 samples
    python bench/world_pass_rates.py --from-run           # summarise the `world` run's render partitions
    python bench/world_pass_rates.py --per-kind 4 --samples 4 --set render.steps=10   # a quicker look

Rendering goes through the render stage's own engine (`tasks.world.evaluate.render_triplets`: `Renderer`,
Prompt-to-Prompt sharing, the stage's seeds and CLIP scoring) with the preset's `render.*` settings, on
triplets drawn by the world generator (`tasks.world.edits`), balanced over the five edit kinds. For each
triplet the same seeds are also rendered with `render.attention=none` (two independent generations from
the same noise), so the share of image-image similarity that shared attention buys is measured too. The
world's own drawn pairs are scored as well: the ground truth, what a perfect renderer would get.

Writes `bench/results/world_pass_rates.json` (tables by kind, quantiles of every metric for ip2p, none
and the ground truth) and `bench/results/world_samples.parquet` (one row per sample, samples.parquet's
columns plus `kind` and `attention`): `bench/render_throughput.py --measured-pass-rates` reads that file
or a real run's `samples.parquet`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDITFORGE_CACHE", str(ROOT / ".cache" / "editforge"))

import pandas as pd

from tasks.common.config import load_config
from tasks.world.evaluate import (
    balanced_triplets,
    by_kind,
    equal_error_threshold,
    ground_truth_metrics,
    negative_metrics,
    quantiles,
    render_triplets,
)

EVAL_SEED = 3  # world seed of the evaluation triplets (the models train on seed 0)


def _table(df: pd.DataFrame) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in df.to_dict("records")]


def from_run(cfg) -> pd.DataFrame:
    from tasks.common import storage
    from tasks.common.contract import is_done
    from tasks.common.layout import SAMPLES_FILE, partition_file
    from tasks.registry import partition_ids, stage_hash

    h = stage_hash(cfg, "render")
    frames = [storage.read_parquet(partition_file(cfg.output_root, "render", h, i, SAMPLES_FILE))
              for i in partition_ids(cfg, "render") if is_done(cfg.output_root, "render", i, h)]
    if not frames:
        raise SystemExit(f"no finished render partition under {cfg.output_root} (render hash {h}); "
                         f"run `editforge run --preset {cfg.name}` first")
    return pd.concat(frames, ignore_index=True)


def print_table(title: str, table: pd.DataFrame) -> None:
    cols = ["kind", "triplets", "samples", "pass_rate", "triplets_with_a_pass", "pass_clip_sim_image", "pass_clip_sim_dir",
            "pass_clip_sim_0", "pass_clip_sim_1", "median_clip_sim_image", "median_clip_sim_dir"]
    print(title)
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="world")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--per-kind", type=int, default=8, help="world triplets of each edit kind")
    parser.add_argument("--samples", type=int, default=8, help="samples per triplet (seeds)")
    parser.add_argument("--no-none", action="store_true", help="skip the render.attention=none comparison")
    parser.add_argument("--from-run", action="store_true", help="summarise the preset's finished render partitions")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_pass_rates.json"))
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    selection = cfg.render.keep
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"command": " ".join(["world_pass_rates.py", *(argv if argv is not None else sys.argv[1:])]),
                    "preset": cfg.name, "thresholds": selection.model_dump(),
                    "render": {k: getattr(cfg.render, k) for k in ("steps", "height", "width", "scheduler", "attention")}
                    | {"cfg_range": list(cfg.render.cfg_range), "p_range": list(cfg.render.p_range)}}
    if args.from_run:
        samples = from_run(cfg)
        table = by_kind(samples, selection)
        print_table(f"{cfg.name} run, {len(samples)} samples (edit kind from the captions):", table)
        result |= {"source": "run", "by_kind": _table(table), "quantiles": quantiles(samples)}
    else:
        triplets = balanced_triplets(EVAL_SEED, args.per_kind)
        samples = render_triplets(cfg, triplets, args.samples).assign(attention=cfg.render.attention)
        table = by_kind(samples, selection)
        print_table(f"{cfg.render.attention}: {len(triplets)} world triplets x {args.samples} samples", table)
        result |= {"source": "world triplets", "world_seed": EVAL_SEED, "per_kind": args.per_kind,
                   "samples_per_triplet": args.samples, "by_kind": _table(table),
                   "quantiles": {"ip2p": quantiles(samples)}}
        frames = [samples]
        if not args.no_none and cfg.render.attention != "none":
            none = render_triplets(cfg, triplets, args.samples, attention="none").assign(attention="none")
            none_table = by_kind(none, selection)
            print_table("none (independent generations from the same noise):", none_table)
            result["by_kind_attention_none"] = _table(none_table)
            result["quantiles"]["none"] = quantiles(none)
            paired = samples["clip_sim_image"].to_numpy() - none["clip_sim_image"].to_numpy()
            result["ip2p_minus_none_clip_sim_image"] = {"mean": round(float(paired.mean()), 4),
                                                        "share_higher": round(float((paired > 0).mean()), 4)}
            frames.append(none)
        truth = ground_truth_metrics(cfg, balanced_triplets(EVAL_SEED, max(args.per_kind, 32)))
        negative = negative_metrics(cfg, balanced_triplets(EVAL_SEED, max(args.per_kind, 32)))
        result["quantiles"]["ground_truth"] = quantiles(truth)
        result["quantiles"]["negatives"] = quantiles(negative)
        result["ground_truth_by_kind"] = {k: quantiles(g) for k, g in truth.groupby("kind")}
        result["equal_error_thresholds"] = {}
        for metric in ("clip_sim_image", "clip_sim_0", "clip_sim_dir"):
            value, error = equal_error_threshold(truth[metric].to_numpy(), negative[metric].to_numpy())
            result["equal_error_thresholds"][metric] = {"threshold": round(value, 4), "error": round(error, 4)}
        print("ground truth vs negatives, equal-error thresholds: " + ", ".join(
            f"{m} {v['threshold']:.3f} (error {v['error']:.1%})" for m, v in result["equal_error_thresholds"].items()))
        pd.concat(frames, ignore_index=True).to_parquet(out.with_name("world_samples.parquet"), index=False)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"world_pass_rates: {result['wall_s']} s -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
