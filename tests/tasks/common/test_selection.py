"""The selection: thresholds, counted rejection reasons and top-k over samples.parquet rows."""

import pandas as pd

from tasks.common.config import Selection
from tasks.common.selection import failure_reason, passes, select_top_k


def _samples():
    rows = []
    for cid, dirs in {"a": [0.5, 0.4, 0.3, 0.25, 0.9], "b": [0.1, 0.6]}.items():
        for seed, d in enumerate(dirs):
            rows.append(
                {
                    "caption_id": cid,
                    "seed": seed,
                    "clip_sim_dir": d,
                    "clip_sim_0": 0.3,
                    "clip_sim_1": 0.3,
                    "clip_sim_image": 0.8,
                }
            )
    rows[4]["clip_sim_image"] = 0.5  # a/4 has the best direction but fails the image-image threshold
    return pd.DataFrame(rows)


def test_paper_thresholds_and_top_k():
    cfg = Selection()  # paper defaults: 0.75 / 0.2 / 0.2, top 4
    df = _samples()
    assert passes(df, cfg).tolist() == [True, True, True, True, False, False, True]
    kept = select_top_k(df, cfg)
    assert df[kept]["seed"].tolist() == [0, 1, 2, 3, 1]
    top2 = select_top_k(df, Selection(top_k=2))
    assert df[top2].groupby("caption_id")["seed"].apply(list).to_dict() == {"a": [0, 1], "b": [1]}
    assert failure_reason(df, cfg).tolist() == [None, None, None, None, "clip_image", "clip_direction", None]


def test_top_k_respects_eligibility():
    df = _samples()
    eligible = pd.Series([False] + [True] * 6)
    kept = select_top_k(df, Selection(top_k=1), eligible)
    assert df[kept]["seed"].tolist() == [1, 1]


def test_early_rejected_samples_are_counted_as_such():
    df = _samples()
    df["early_rejected"] = [False] * 6 + [True]
    df.loc[6, ["clip_sim_dir", "clip_sim_0", "clip_sim_1", "clip_sim_image"]] = float("nan")
    cfg = Selection()
    assert failure_reason(df, cfg).tolist()[-1] == "early_rejected"
    assert not select_top_k(df, cfg)[6]
