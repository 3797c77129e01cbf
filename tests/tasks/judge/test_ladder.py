"""The ladder as the selection owns it: reasons per rung in ladder order, unscored samples counted, the funnel,
the configurable top-k order, the verdict parser, and which settings each stage's hash covers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.common.config import ConfigError, Selection, load_config
from tasks.common.selection import failure_reason, funnel, passes, select_top_k
from tasks.judge.vlm import parse_verdict
from tasks.registry import stage_hash

RUNGS = ("clip", "dino", "ssim", "vlm")


def _ladder() -> pd.DataFrame:
    nan = np.nan
    return pd.DataFrame(
        {
            "caption_id": ["a"] * 8,
            "seed": range(8),
            "clip_sim_0": 0.3,
            "clip_sim_1": 0.3,
            "clip_sim_image": 0.9,
            "clip_sim_dir": [0.5, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4],
            "dino_similarity": [0.9, nan, 0.3, 0.9, 0.9, 0.9, 0.9, 0.8],
            "ssim": [0.5, nan, nan, 0.1, 0.99, 0.5, 0.5, 0.6],
            "vlm_status": ["ok", None, None, None, None, "unparseable", "ok", "ok"],
            "vlm_score": [8.0, nan, nan, nan, nan, nan, 2.0, 9.0],
        }
    )


def test_first_failing_rung_in_ladder_order_and_unscored_ones():
    sel = Selection(
        clip_direction_threshold=0.2, dino_threshold=0.4, ssim_min=0.2, ssim_max=0.95, vlm_threshold=5
    )
    df = _ladder()
    assert failure_reason(df, sel, RUNGS).tolist() == [
        None,
        "clip_direction",
        "dino_similarity",
        "ssim_low",
        "ssim_high",
        "vlm_unparseable",
        "vlm_score",
        None,
    ]
    assert passes(df, sel, RUNGS).tolist() == [True, False, False, False, False, False, False, True]
    assert passes(df, sel).tolist() == [
        True,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
    ]  # CLIP alone: the paper
    # a loosened lower rung lets through samples the higher rungs never scored: counted, not passed
    loose = sel.model_copy(update={"clip_direction_threshold": 0.0, "ssim_max": 1.0})
    assert failure_reason(df, loose, RUNGS).tolist()[1] == "dino_not_scored"
    assert failure_reason(df, loose, RUNGS).tolist()[4] == "vlm_not_judged"
    steps = funnel(df, sel, RUNGS)
    assert [(s["rung"], s["in"], s["passed"]) for s in steps] == [
        ("clip", 8, 7),
        ("dino", 7, 6),
        ("ssim", 6, 4),
        ("vlm", 4, 2),
    ]


def test_top_k_order_is_configurable():
    df = _ladder()
    sel = Selection(
        clip_direction_threshold=0.2,
        dino_threshold=0.4,
        ssim_min=0.2,
        ssim_max=0.95,
        vlm_threshold=1,
        top_k=1,
    )
    assert df[select_top_k(df, sel, rungs=RUNGS)]["seed"].tolist() == [0]  # by direction: 0.5 beats 0.4
    by_vlm = sel.model_copy(update={"rank_by": "vlm_score"})
    assert df[select_top_k(df, by_vlm, rungs=RUNGS)]["seed"].tolist() == [7]  # 9.0 beats 8.0 and 2.0


@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"instruction_followed": 7, "preservation": 9, "quality": 8, "reasoning": "fine"}', True),
        ('```json\n{"instruction_followed": 7, "preservation": 9, "quality": 8}\n```', True),
        (
            'Here you go: {"instruction_followed": 7.5, "preservation": 9, "quality": 8, "reasoning": "x"} Thanks!',
            True,
        ),
        ('{"instruction_followed": 7, "preservation": 9}', False),
        ('{"instruction_followed": 11, "preservation": 9, "quality": 8}', False),
        ('{"instruction_followed": "7", "preservation": 9, "quality": 8}', False),
        ("[7, 9, 8]", False),
        ("I would rate it 7/10.", False),
        ("", False),
    ],
)
def test_the_verdict_is_json_validated_with_pydantic(text, ok):
    verdict, error = parse_verdict(text)
    assert (verdict is not None) == ok and (error is None) == ok, error
    if ok:
        assert verdict.overall == pytest.approx(
            (min(verdict.instruction_followed, verdict.preservation) * verdict.quality) ** 0.5
        )


def test_hashes_cover_what_changes_outputs_and_not_what_re_selects():
    vlm = ["judges.vlm.enabled=true", "render.save_images=passed"]
    base = load_config("demo", vlm)
    same = {  # operational, or a threshold the filter applies: render and judge stay
        "judges.vlm.concurrency=3": ("render", "judge", "filter"),
        "judges.vlm.mode=batch": ("render", "judge", "filter"),
        "judges.vlm.prices.gpt-4o-mini.input_per_mtok=9": ("render", "judge", "filter"),
        "judges.vlm.api_key_env=OTHER": ("render", "judge", "filter"),
        "filter.vlm_threshold=2": ("render", "judge"),
        "filter.dino_threshold=0.9": ("render", "judge"),
        "filter.rank_by=vlm_score": ("render", "judge"),
        "render.keep.vlm_threshold=2": ("render", "judge"),
    }
    for override, stages in same.items():
        other = load_config("demo", [*vlm, override])
        assert all(stage_hash(other, s) == stage_hash(base, s) for s in stages), override
        if "filter" not in stages:
            assert stage_hash(other, "filter") != stage_hash(base, "filter"), override
    for override in ("judges.vlm.model=gpt-4o", "judges.vlm.temperature=0.5", "judges.vlm.image_size=256"):
        other = load_config("demo", [*vlm, override])  # another judgment: re-judged, not re-rendered
        assert stage_hash(other, "render") == stage_hash(base, "render") != None  # noqa: E711
        assert stage_hash(other, "judge") != stage_hash(base, "judge"), override
    for override in ("render.keep.dino_threshold=0.5", "judges.ssim.sigma=2.0", "models.dino=dinov2-small"):
        assert stage_hash(load_config("demo", [*vlm, override]), "render") != stage_hash(base, "render"), (
            override
        )
    # a rung that is off: its settings and thresholds change nothing
    off = ["judges.dino.enabled=false"]
    assert stage_hash(
        load_config("demo", [*off, "render.keep.dino_threshold=0.1", "models.dino=dinov2-small"]), "render"
    ) == stage_hash(load_config("demo", off), "render")
    assert stage_hash(load_config("demo", ["judges.vlm.model=gpt-4o"]), "judge") == stage_hash(
        load_config("demo"), "judge"
    )
    # the filter reads the judge stage only when the VLM rung is on
    from tasks import registry

    assert registry.get("filter").upstreams(base) == ("render", "judge")
    assert registry.get("filter").upstreams(load_config("demo")) == ("render",)


def test_ladder_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="render cannot rank by the VLM judge"):
        load_config("demo", ["render.keep.rank_by=vlm_score"])
    with pytest.raises(ConfigError, match="judges.vlm.enabled=true"):
        load_config("demo", ["filter.rank_by=vlm_quality"])
    with pytest.raises(ConfigError, match="ssim_min 0.9 is above ssim_max"):
        load_config("demo", ["filter.ssim_min=0.9", "filter.ssim_max=0.5"])
    with pytest.raises(ConfigError, match="judges.dino.enabled"):
        load_config("paper", ["render.keep.rank_by=dino_similarity"])
