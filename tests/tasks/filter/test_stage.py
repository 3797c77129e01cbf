"""The filter stage re-selects from samples.parquet without re-rendering, within the images render stored."""

import logging

import pandas as pd
import pytest

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.selection import select_top_k
from tasks.filter.stage import run as run_filter
from tasks.registry import partition_url, stage_hash

# one triplet, six fully rendered samples with hand-made metrics (paper thresholds: 0.75 / 0.2 / 0.2)
DIRS = [0.50, 0.40, 0.35, 0.30, 0.25, 0.10]  # the last fails the direction threshold
IMAGE = [0.90, 0.76, 0.90, 0.90, 0.90, 0.90]  # the second passes 0.75 but not a stricter 0.8


def render_output(root, save_images: str, overrides=()):
    cfg = load_config("paper", [f"output_root={root}", f"render.save_images={save_images}", *overrides])
    df = pd.DataFrame(
        {
            "caption_id": "c0",
            "sample_key": [f"c0_{i}" for i in range(6)],
            "seed": range(6),
            "clip_sim_0": 0.3,
            "clip_sim_1": 0.3,
            "clip_sim_dir": DIRS,
            "clip_sim_image": IMAGE,
            "early_rejected": False,
        }
    )
    from tasks.common.selection import passes

    df["passed"] = passes(df, cfg.render.keep)
    df["kept"] = select_top_k(df, cfg.render.keep)
    df["image_stored"] = {"kept": df["kept"], "passed": df["passed"], "all": pd.Series(True, index=df.index)}[
        save_images
    ]
    storage.write_parquet_atomic(f"{partition_url(cfg, 'render')}/samples.parquet", df)
    storage.write_json_atomic(
        f"{partition_url(cfg, 'render')}/_SUCCESS.json", {"config_hash": stage_hash(cfg, "render")}
    )
    return cfg


def kept(cfg) -> list[str]:
    return storage.read_parquet(f"{partition_url(cfg, 'filter')}/kept.parquet")["sample_key"].tolist()


def test_default_keeps_what_render_kept(tmp_path):
    cfg = render_output(tmp_path, "kept")
    manifest = run_filter(cfg, 0)
    assert kept(cfg) == ["c0_0", "c0_1", "c0_2", "c0_3"]  # the paper's top 4 by direction
    assert manifest["rejected"] == {"clip_direction": 1, "not_in_top_k": 1}


def test_smaller_top_k_and_stricter_threshold_re_select(tmp_path):
    render = render_output(tmp_path, "kept")
    cfg = load_config("paper", [f"output_root={tmp_path}", "filter.top_k=2"])
    assert stage_hash(cfg, "render") == stage_hash(render, "render")  # no re-render
    run_filter(cfg, 0)
    assert kept(cfg) == ["c0_0", "c0_1"]


def test_selection_beyond_stored_images_is_counted_not_replaced(tmp_path, caplog):
    render_output(tmp_path, "kept")
    # 0.8 drops c0_1; the new top 4 wants c0_4, whose images render did not keep
    cfg = load_config("paper", [f"output_root={tmp_path}", "filter.clip_image_threshold=0.8"])
    with caplog.at_level(logging.WARNING, logger="editforge"):
        manifest = run_filter(cfg, 0)
    assert kept(cfg) == ["c0_0", "c0_2", "c0_3"]
    assert manifest["rejected"]["image_not_stored"] == 1 and manifest["rejected"]["clip_image"] == 1
    assert "render.save_images=passed" in caplog.text


@pytest.mark.parametrize(
    "save_images, expected",
    [
        ("passed", ["c0_0", "c0_1", "c0_2", "c0_3", "c0_4"]),  # a larger top-k within the passing ones
        ("all", ["c0_0", "c0_1", "c0_2", "c0_3", "c0_4", "c0_5"]),  # and looser thresholds too
    ],
)
def test_stored_headroom_allows_larger_selections(tmp_path, save_images, expected):
    render_output(tmp_path, save_images)
    cfg = load_config(
        "paper",
        [
            f"output_root={tmp_path}",
            f"render.save_images={save_images}",
            "filter.top_k=6",
            "filter.clip_direction_threshold=0.0",
        ],
    )
    manifest = run_filter(cfg, 0)
    missing = {"passed": 1, "all": 0}[save_images]  # c0_5 failed render's threshold: no image under `passed`
    assert kept(cfg) == expected[: 6 - missing] and manifest["rejected"].get("image_not_stored", 0) == missing
