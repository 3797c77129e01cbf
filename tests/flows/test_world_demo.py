"""Flow tier: `make demo`'s pipeline on the tiny world (the `world` preset, its shipped models), smaller."""

import pandas as pd
import pytest
import webdataset as wds

from tasks.common.config import load_config
from tasks.world.edits import EDIT_KINDS
from tasks.world.grammar import edit_kind

pytestmark = pytest.mark.flow


def test_world_demo_keeps_recognisable_world_edits_and_draws_its_grid(prefect_harness, tmp_path):
    from flows.generate import generate
    from tasks.world_eval import figure

    overrides = [
        f"output_root={tmp_path}",
        "name=worldtest",
        "captions.num_captions=12",
        "captions.num_partitions=1",
        "text.finetune_steps=20",
    ]
    stages = generate("world", overrides)["stages"]
    assert stages["captions"]["out"] == 12 and stages["render"]["out"] > 0
    cfg = load_config("world", overrides)
    kept = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "filter").rglob("kept.parquet"))])
    assert len(kept) == stages["pack"]["out"]
    # the caption LM writes world edits, and the kept pairs pass the world thresholds (world.yaml)
    kinds = [edit_kind(a, b) for a, b in zip(kept["input"], kept["output"])]
    assert sum(k in EDIT_KINDS for k in kinds) >= 0.5 * len(kinds), kinds
    keep = cfg.render.keep
    assert (kept["clip_sim_dir"] >= keep.clip_direction_threshold).all()
    assert (kept[["clip_sim_0", "clip_sim_1"]] >= keep.clip_caption_threshold).all().all()
    shards = sorted(str(p) for p in (tmp_path / "pack").rglob("*.tar"))
    sample = next(iter(wds.WebDataset(shards, shardshuffle=False).decode("pil")))
    assert sample["input.png"].size == (64, 64) and sample["instruction.txt"]
    # the README's grid is redrawn from a run on disk
    out = tmp_path / "pairs.png"
    assert (
        figure.main(
            [
                "--set",
                f"output_root={tmp_path}",
                "--set",
                "captions.num_captions=12",
                "--set",
                "captions.num_partitions=1",
                "--set",
                "text.finetune_steps=20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 10_000
