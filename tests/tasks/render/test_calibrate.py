"""Early-rejection margin calibration: hand-computed table, tiny-model dry run, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from flows.calibrate_cli import calibrate_early, parse_margins
from tasks.common import storage
from tasks.common.config import Selection, load_config
from tasks.common.layout import partition_dir
from tasks.common.selection import METRICS, passes, thresholds
from tasks.registry import partition_url, stage_hash
from tasks.render.calibrate import (
    DEFAULT_MARGINS,
    TABLE_COLUMNS,
    CalibrationError,
    calibrate,
    calibration_table,
    early_drops,
    load_calibration_samples,
    recommend,
)
from tasks.render.early import early_keep, early_step_count
from tasks.render.renderer import Renderer
from tasks.render.stage import run as run_render

SELECTION = Selection(clip_image_threshold=0.75, clip_caption_threshold=0.2, clip_direction_threshold=0.2)
STEPS, AFTER = 10, 2
# (early direction, final direction) per sample; the other metrics pass comfortably, early and final, so
# the direction alone decides: final pass <=> final direction >= 0.2
HAND = [
    (0.05, 0.05),
    (0.10, 0.10),
    (0.12, 0.25),
    (0.16, 0.10),
    (0.17, 0.10),
    (0.18, 0.15),
    (0.22, 0.30),
    (0.30, 0.28),
]


def hand_samples() -> pd.DataFrame:
    rows = [{"early_clip_sim_dir": e, "clip_sim_dir": f} for e, f in HAND]
    rows += [
        {"early_clip_sim_dir": 0.01, "clip_sim_dir": np.nan},  # dropped by a real early rejection
        {"early_clip_sim_dir": np.nan, "clip_sim_dir": 0.30},
    ]  # not scored early
    df = pd.DataFrame(rows)
    for m in ("clip_sim_0", "clip_sim_1"):
        df[m], df[f"early_{m}"] = 0.3, 0.3
    df["clip_sim_image"], df["early_clip_sim_image"] = 0.9, 0.9
    df.loc[8, ["clip_sim_0", "clip_sim_1", "clip_sim_image"]] = np.nan
    df.loc[9, ["early_clip_sim_0", "early_clip_sim_1", "early_clip_sim_image"]] = np.nan
    df["early_rejected"] = [False] * 8 + [True, False]
    return df


def test_table_by_hand():
    table = calibration_table(
        hand_samples(), SELECTION, ["clip_sim_dir"], [0.0, 0.05, 0.09, 0.25], AFTER, STEPS
    )
    assert list(table.columns) == TABLE_COLUMNS
    assert (table["scored"] == 8).all() and (table["passing"] == 3).all() and (table["failing"] == 5).all()
    by = table.set_index("margin")
    # margin 0 (limit 0.2): drops the 6 samples below 0.2 early, 5 failing + 1 passing (early 0.12 -> final 0.25)
    # calls 2 x 10 + 6 x 2 = 32 of 80; 2 passing kept -> 16 per pass vs 80 / 3 -> 0.6
    assert by.loc[0.0, ["dropped", "dropped_failing", "dropped_passing", "unet_calls"]].tolist() == [
        6,
        5,
        1,
        32,
    ]
    assert by.loc[0.0, "recall"] == 1 and by.loc[0.0, "false_drop"] == pytest.approx(1 / 3)
    assert by.loc[0.0, "unet_fraction"] == pytest.approx(0.4) and by.loc[0.0, "unet_calls_per_pass"] == 16
    assert by.loc[0.0, "cost_per_pass"] == pytest.approx(0.6)
    # margin 0.05 (limit 0.15): 0.05, 0.10, 0.12 -> 2 failing + 1 passing; 5 x 10 + 3 x 2 = 56; 28 / (80 / 3)
    assert by.loc[0.05, ["dropped_failing", "dropped_passing", "unet_calls"]].tolist() == [2, 1, 56]
    assert by.loc[0.05, "recall"] == pytest.approx(0.4) and by.loc[0.05, "cost_per_pass"] == pytest.approx(
        1.05
    )
    # margin 0.09 (limit 0.11): 0.05, 0.10 -> 2 failing; 6 x 10 + 2 x 2 = 64; all 3 passing kept -> 64 / 80
    assert by.loc[0.09, ["dropped_failing", "dropped_passing", "unet_calls"]].tolist() == [2, 0, 64]
    assert by.loc[0.09, "false_drop"] == 0 and by.loc[0.09, "unet_fraction"] == pytest.approx(0.8)
    assert by.loc[0.09, "cost_per_pass"] == pytest.approx(0.8)
    # margin 0.25 (limit -0.05): nothing dropped, the cost of no early rejection
    assert by.loc[0.25, "dropped"] == 0 and by.loc[0.25, "recall"] == 0
    assert by.loc[0.25, "unet_fraction"] == 1 and by.loc[0.25, "cost_per_pass"] == 1

    assert recommend(table, 0.05) == 0.09  # the cheapest margin that loses no passing pair
    assert recommend(table, 0.4) == 0.0  # losing a third of the passes is allowed: margin 0 is cheaper
    assert recommend(table, -0.1) is None  # none qualifies
    assert recommend(table[table["margin"] < 0.09], 0.1) is None
    # ties (nothing dropped at both): the larger, safer margin
    assert (
        recommend(
            calibration_table(hand_samples(), SELECTION, ["clip_sim_dir"], [0.3, 0.25], AFTER, STEPS), 0
        )
        == 0.3
    )
    # the other metrics pass comfortably, so using all four changes nothing
    pd.testing.assert_frame_equal(
        calibration_table(hand_samples(), SELECTION, METRICS, table["margin"], AFTER, STEPS), table
    )


def test_table_edge_cases():
    df = hand_samples()
    failing_only = df[df["clip_sim_dir"] < 0.2]
    table = calibration_table(failing_only, SELECTION, ["clip_sim_dir"], [0.0], AFTER, STEPS)
    assert table.loc[0, "passing"] == 0 and np.isnan(table.loc[0, "false_drop"])
    assert np.isnan(table.loc[0, "cost_per_pass"]) and recommend(table, 1.0) is None  # false drops unknown
    every_pass_lost = calibration_table(df, SELECTION, ["clip_sim_dir"], [-0.2], AFTER, STEPS)
    assert every_pass_lost.loc[0, "false_drop"] == 1 and np.isinf(every_pass_lost.loc[0, "cost_per_pass"])
    with pytest.raises(ValueError, match="after_steps"):
        calibration_table(df, SELECTION, ["clip_sim_dir"], [0.0], STEPS, STEPS)
    assert (
        parse_margins(None) == list(DEFAULT_MARGINS)
        and DEFAULT_MARGINS[0] == -0.05
        and DEFAULT_MARGINS[-1] == 0.3
    )
    assert parse_margins("-0.05:0.05:0.025") == [-0.05, -0.025, 0.0, 0.025, 0.05]
    assert parse_margins("0.1,0.2") == [0.1, 0.2]


# --- tiny models ---------------------------------------------------------------------------------------

RENDER_STEPS, SAMPLES = 4, 6
TRIPLETS = pd.DataFrame(
    [
        {
            "caption_id": f"{i:016x}",
            "input": f"a photo of a cat number {i}",
            "edit": "make it a dog",
            "output": f"a photo of a dog number {i}",
            "status": "ok" if i != 3 else "rejected",
        }
        for i in range(5)
    ]
)
DRY = [
    "render.early_reject.at=0.5",
    "render.early_reject.dry_run=true",
    "render.early_reject.margin=0.0",
    "render.keep.clip_direction_threshold=0.15",
    "render.keep.ssim_max=1.0",
]  # the demo's image rungs stay on; these near-identical pairs pass them


def overrides(root, *extra) -> list[str]:
    text = partition_dir(str(root), "text", stage_hash(load_config("demo"), "text"), 0)
    storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
    storage.write_json_atomic(
        f"{text}/_SUCCESS.json", {"config_hash": stage_hash(load_config("demo"), "text")}
    )
    return [
        f"output_root={root}",
        f"render.steps={RENDER_STEPS}",
        "render.adaptive.enabled=false",
        "render.early_reject.at=null",
        f"render.samples_per_triplet={SAMPLES}",
        *extra,
    ]


def config(root, *extra):
    return load_config("demo", overrides(root, *extra))


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_config("demo"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, renderer):
    """The root of one dry-run render partition and its config overrides."""
    root = tmp_path_factory.mktemp("dry")
    run_render(config(root, *DRY), 0, renderer=renderer)
    return root, overrides(root, *DRY)


@pytest.mark.component
def test_dry_run_calibration_matches_the_render_stage(tmp_path, dry_run, renderer):
    root, sets = dry_run
    cfg = load_config("demo", sets)
    rendered = storage.read_parquet(f"{partition_url(cfg, 'render')}/samples.parquet")
    assert not rendered["early_rejected"].any() and (~rendered["passed"]).any() and rendered["passed"].any()
    data = load_calibration_samples(cfg)
    assert len(data.samples) == len(rendered) and data.partitions == [0] and data.skipped == [1]
    assert data.early_rejected == 0 and data.unscored == 0

    keep, used = cfg.render.keep, cfg.render.early_reject.metrics
    early = {m: torch.tensor(rendered[f"early_{m}"].to_numpy()) for m in used}
    # a margin that drops nothing: every early metric clears its threshold - margin
    none_dropped = max(thresholds(keep)[m] - float(early[m].min()) for m in used) + 0.01
    margins = sorted({*DEFAULT_MARGINS, none_dropped, 0.0})
    table, _ = calibrate(cfg, margins)
    assert (table["scored"] == len(rendered)).all() and (table["passing"] == rendered["passed"].sum()).all()
    # final pass = the stage's own (CLIP and the image rungs render applies)
    assert passes(data.samples, keep, ("clip", *cfg.judges.image_rungs())).equals(data.samples["passed"])
    row = table.set_index("margin").loc[none_dropped]
    assert (
        row["dropped"] == 0 and row["recall"] == 0 and row["unet_fraction"] == 1 and row["cost_per_pass"] == 1
    )
    for margin, row in table.set_index("margin").iterrows():
        drop = ~early_keep(early, keep, margin, used).numpy()
        passed = rendered["passed"].to_numpy()
        assert row["dropped"] == drop.sum() and row["dropped_passing"] == (drop & passed).sum()
        assert row["dropped_failing"] == (drop & ~passed).sum()
        assert (
            row["unet_calls"]
            == drop.sum() * early_step_count(0.5, RENDER_STEPS) + (~drop).sum() * RENDER_STEPS
        )
    assert table.set_index("margin").loc[0.0, "dropped"] > 0

    # a real early rejection at margin 0 drops exactly the samples the dry run's table drops at margin 0
    real = tmp_path / "real"
    dropping = [s for s in DRY if "dry_run" not in s]
    real_manifest = run_render(config(real, *dropping), 0, renderer=renderer)
    real_rows = storage.read_parquet(f"{real}/{real_manifest['path']}/samples.parquet")
    assert real_rows["sample_key"].tolist() == rendered["sample_key"].tolist()
    assert real_rows["early_rejected"].to_numpy().tolist() == early_drops(rendered, keep, used, 0.0).tolist()
    # calibrating on it uses the survivors only and counts the rest as left out
    biased = load_calibration_samples(config(real, *dropping))
    assert biased.early_rejected == int(real_rows["early_rejected"].sum()) > 0
    assert len(biased.samples) == len(real_rows) - biased.early_rejected


def test_errors(tmp_path):
    with pytest.raises(CalibrationError, match="render.early_reject.at is not set"):
        load_calibration_samples(config(tmp_path))
    cfg = config(tmp_path, "render.early_reject.at=0.5")
    with pytest.raises(CalibrationError, match="no render partition .* is finished under this config"):
        load_calibration_samples(cfg)
    # a finished partition whose samples were all dropped early (real rejection): no final metrics at all
    dropped = hand_samples().iloc[[8, 8]].assign(early_rejected=True)
    storage.write_parquet_atomic(f"{partition_url(cfg, 'render')}/samples.parquet", dropped)
    storage.write_json_atomic(
        f"{partition_url(cfg, 'render')}/_SUCCESS.json", {"config_hash": stage_hash(cfg, "render")}
    )
    with pytest.raises(
        CalibrationError, match=r"none of the 2 samples .*2 were dropped.*render.early_reject.dry_run=true"
    ):
        load_calibration_samples(cfg)


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, as in flows/cli.py."""

    app.command("calibrate-early")(calibrate_early)
    return app


@pytest.mark.component
def test_cli_prints_recommendation_and_writes_json(tmp_path, dry_run):
    root, sets = dry_run
    out = tmp_path / "calibration.json"
    args = [
        "calibrate-early",
        "--preset",
        "demo",
        *(a for s in sets for a in ("--set", s)),
        "--partitions",
        "0",
        "--max-false-drop",
        "0.5",
        "--json",
        str(out),
    ]
    runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps at the terminal width
    result = runner.invoke(cli(), args)
    assert result.exit_code == 0, result.output
    assert "samples scored early and finally" in result.output and "per passing pair" in result.output
    report = json.loads(out.read_text())
    best = report["recommended_margin"]
    assert best is not None and f"--set render.early_reject.margin={best:g}" in result.output
    assert report["partitions"] == [0] and report["after_steps"] == 2 and report["steps"] == RENDER_STEPS
    table = pd.DataFrame(report["table"])
    assert set(DEFAULT_MARGINS) <= set(table["margin"]) and list(table.columns) == TABLE_COLUMNS
    assert recommend(table, 0.5) == best

    strict = runner.invoke(cli(), [*args[:-2], "--max-false-drop", "-1", "--margins", "0,0.05"])
    assert (
        strict.exit_code == 0
        and "no recommendation" in strict.output
        and "--set render.early_reject.margin" not in strict.output
    )
    off = runner.invoke(
        cli(), ["calibrate-early", "--set", f"output_root={root}", "--set", "render.early_reject.at=null"]
    )
    assert off.exit_code == 2 and "render.early_reject.at is not set" in off.output
