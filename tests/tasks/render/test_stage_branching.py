"""The render stage with p-branching on tiny models: rows and keys, UNet calls, the per-seed keep rule, resume
byte-identical, batch independence, config validation and hashes."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.common import storage
from tasks.common.config import ConfigError, load_config
from tasks.common.contract import Checkpoint
from tasks.common.layout import partition_dir, sample_key
from tasks.common.selection import RANK_BY, passes, per_seed_eligible, select_top_k
from tasks.registry import stage_hash
from tasks.render.attention import AttentionControl
from tasks.render.renderer import Renderer
from tasks.render.stage import SAMPLE_COLUMNS
from tasks.render.stage import run as run_render

pytestmark = pytest.mark.component

STEPS = 4
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
# as tests/tasks/render/test_stage.py: adaptive rounds of 2, give up after 4, early rejection at half the steps
SAVERS = [
    "render.adaptive.enabled=true",
    "render.adaptive.round_size=2",
    "render.adaptive.give_up_after=4",
    "render.early_reject.at=0.5",
    "render.early_reject.margin=0.0",
    "render.keep.clip_direction_threshold=0.15",
]


def config(root, *overrides, samples=4, branches=2):
    text = partition_dir(str(root), "text", stage_hash(load_config("demo"), "text"), 0)
    storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
    storage.write_json_atomic(
        f"{text}/_SUCCESS.json", {"config_hash": stage_hash(load_config("demo"), "text")}
    )
    return load_config(
        "demo",
        [
            f"output_root={root}",
            f"render.steps={STEPS}",
            "render.adaptive.enabled=false",
            "render.early_reject.at=null",
            f"render.samples_per_triplet={samples}",
            f"render.p_branches={branches}",
            "judges.dino.enabled=false",
            "judges.ssim.enabled=false",
            *overrides,
        ],
    )  # CLIP alone, as test_stage.py


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_config("demo"))


def render_dir(root) -> Path:
    (found,) = Path(root).glob("render/*/part-00000")
    return found


def samples(root) -> pd.DataFrame:
    return storage.read_parquet(str(render_dir(root) / "samples.parquet"))


def seed_calls(ps: list[float], steps: int) -> int:
    """UNet calls (sample-steps) of one seed's branches: the pair's n steps + each other lane's own steps."""
    stops = sorted(set(AttentionControl.for_samples(ps).stop_steps(steps)))
    return steps + sum(steps - s for s in stops[:-1])


def test_rows_keys_accounting_and_one_kept_pair_per_seed(tmp_path, renderer):
    from tasks.filter.stage import run as run_filter

    cfg = config(tmp_path, "render.save_images=passed", "render.keep.top_k=2", samples=8, branches=4)
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(tmp_path)
    assert list(df.columns) == SAMPLE_COLUMNS and len(df) == 4 * 8 and df["sample_key"].is_unique
    assert (df["branch"] == df["sample_index"] % 4).all()
    assert df["sample_key"].tolist() == [
        sample_key(c, s, b) for c, s, b in zip(df["caption_id"], df["seed"], df["branch"])
    ]
    assert all("." not in k and k.rsplit("_", 1)[0] == c for k, c in zip(df["sample_key"], df["caption_id"]))
    by_seed = df.groupby(["caption_id", "seed"])
    assert (by_seed.size() == 4).all() and by_seed.ngroups == 4 * 2
    assert (by_seed["cfg_scale"].nunique() == 1).all() and (by_seed["p2p_p"].nunique() == 4).all()
    lo, hi = cfg.render.p_range
    width = (hi - lo) / 4
    assert (
        (df["p2p_p"] >= lo + df["branch"] * width) & (df["p2p_p"] <= lo + (df["branch"] + 1) * width)
    ).all()
    # UNet calls: n for the pair + the other lanes' own steps, per seed; exact images (pairs 4, solo rows 2 a step)
    for (_, _), rows in by_seed:
        assert rows["unet_steps"].sum() == seed_calls(rows["p2p_p"].tolist(), STEPS)
        assert rows["unet_steps"].max() == STEPS
    counts = manifest["counts"]
    assert (
        counts["unet_calls"] == int(df["unet_steps"].sum()) < counts["unet_calls_reference"] == 4 * 8 * STEPS
    )
    assert counts["unet_images"] == int(df["unet_images"].sum()) < 4 * counts["unet_calls"]
    # kept: at most one per seed (the best passing branch by direction), then the top 2 of the triplet
    kept = df[df["kept"]]
    assert (
        kept.groupby(["caption_id", "seed"]).size().max() == 1
        and kept.groupby("caption_id").size().max() <= 2
    )
    passing = df[df["passed"]]
    assert passing.groupby(["caption_id", "seed"]).size().max() > 1, (
        "need a seed with several passing branches"
    )
    for (cid, seed), rows in kept.groupby(["caption_id", "seed"]):
        best = passing[(passing["caption_id"] == cid) & (passing["seed"] == seed)][RANK_BY].max()
        assert rows[RANK_BY].iloc[0] == best
    # the filter stage's re-selection applies the same rule: by default it keeps exactly what render kept
    run_filter(cfg, 0)
    (kept_file,) = Path(tmp_path).glob("filter/*/part-00000/kept.parquet")
    assert sorted(storage.read_parquet(str(kept_file))["sample_key"]) == sorted(kept["sample_key"])


def test_keep_per_seed_rule():
    df = pd.DataFrame(
        {
            "caption_id": ["a"] * 6 + ["b"] * 2,
            "seed": [1, 1, 1, 2, 2, 3, 9, 9],
            "branch": [0, 1, 2, 0, 1, 0, 0, 1],
            RANK_BY: [0.9, 0.8, 0.1, 0.7, 0.95, 0.5, 0.3, 0.4],
            "clip_sim_image": [0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9],
            "clip_sim_0": 0.3,
            "clip_sim_1": 0.3,
        }
    )
    keep = load_config("paper").render.keep.model_copy(update={"top_k": 2})  # 0.75 / 0.2 / 0.2
    assert passes(df, keep).tolist() == [True, True, False, True, False, True, True, True]
    one = select_top_k(df, keep, per_seed_eligible(df, keep, 1))
    # a: seed 1's best (0.9), seed 2's best passing (0.7; its 0.95 fails image-image); b: one of seed 9 only
    assert df.index[one].tolist() == [0, 3, 7]
    assert df.index[select_top_k(df, keep, per_seed_eligible(df, keep, None))].tolist() == [0, 1, 6, 7]
    assert per_seed_eligible(df, keep, None) is None
    two = per_seed_eligible(df, keep, 2)
    assert two.tolist() == [True, True, True, True, True, True, True, True]
    # with the SSIM rung on, seed 1's best by direction fails it: its next passing branch is the candidate
    df["ssim"] = [0.99, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    rungs = ("clip", "ssim")
    eligible = per_seed_eligible(df, keep, 1, rungs)
    assert df.index[select_top_k(df, keep, eligible, rungs=rungs)].tolist() == [1, 3, 7]


def test_resume_mid_partition_with_branches_is_byte_identical(tmp_path, renderer, monkeypatch):
    clean = tmp_path / "clean"
    run_render(config(clean, *SAVERS), 0, renderer=Renderer(load_config("demo")))
    crashed = tmp_path / "crashed"
    cfg = config(crashed, *SAVERS)
    append, calls = Checkpoint.append, []

    def dying_append(self, batch_id, df):
        calls.append(batch_id)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        append(self, batch_id, df)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "append", dying_append)
        with pytest.raises(KeyboardInterrupt):
            run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    assert (render_dir(crashed) / "samples.parquet").read_bytes() == (
        render_dir(clean) / "samples.parquet"
    ).read_bytes()
    images = {p.name: p.read_bytes() for p in (render_dir(clean) / "images").iterdir()}
    assert images and {p.name: p.read_bytes() for p in (render_dir(crashed) / "images").iterdir()} == images
    df = samples(clean)
    assert df["early_rejected"].any() and (df.loc[~df["early_rejected"], "unet_steps"] < STEPS).any()  # forks


def test_branching_results_do_not_depend_on_the_batch_size(tmp_path, renderer):
    frames = []
    for size in (
        1,
        3,
        8,
    ):  # 1: below one seed's 2 branches (a cohort is one seed); 3: one seed + no half seed
        root = tmp_path / f"b{size}"
        run_render(config(root, *SAVERS, f"render.batch_samples={size}"), 0, renderer=renderer)
        frames.append(samples(root))
    for other in frames[1:]:
        exact = [
            "sample_key",
            "seed",
            "branch",
            "sample_index",
            "round",
            "unet_steps",
            "unet_images",
            "early_rejected",
            "passed",
            "kept",
            "image_stored",
        ]
        pd.testing.assert_frame_equal(other[exact], frames[0][exact])
        floats = [c for c in frames[0].columns if frames[0][c].dtype == float]
        # CLIP's directional similarity amplifies float reassociation (~2e-5 here), the images are within 1e-5
        np.testing.assert_allclose(other[floats].to_numpy(), frames[0][floats].to_numpy(), atol=1e-4, rtol=0)


def test_config_validation_and_hashes(tmp_path):
    base = config(tmp_path, branches=1)
    two = config(tmp_path, branches=2)
    assert stage_hash(base, "render") != stage_hash(two, "render")
    assert stage_hash(two, "render") != stage_hash(
        config(tmp_path, "render.keep_per_seed=2", branches=2), "render"
    )
    assert stage_hash(two, "render") != stage_hash(
        config(tmp_path, "render.keep_per_seed=null", branches=2), "render"
    )
    # operational settings stay out of it
    assert stage_hash(two, "render") == stage_hash(
        config(tmp_path, "render.batch_samples=7", branches=2), "render"
    )
    for bad, message in [
        (["render.attention=p2p-refine"], "needs attention ip2p"),
        (["render.samples_per_triplet=6"], "samples_per_triplet 6 is not a multiple of p_branches 4"),
        (["render.adaptive.enabled=true", "render.adaptive.round_size=6"], "round_size 6 is not a multiple"),
        (
            ["render.adaptive.give_up_after=6", "render.adaptive.round_size=4"],
            "give_up_after 6 is not a multiple",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, *bad, samples=8, branches=4)
    config(
        tmp_path, "render.adaptive.round_size=3", samples=8, branches=4
    )  # rounds off: round_size is unused
