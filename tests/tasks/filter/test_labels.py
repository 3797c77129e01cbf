"""People's labels: what is accepted, how concurrent writers append without losing one, which pairs a label
still matches; and the review sample's strata and weights."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from tasks.common import storage
from tasks.common.config import Selection, load_config
from tasks.filter.labels import LabelError, LabelStore, check_label, latest, matched
from tasks.filter.review import assign_strata, review_queue, spread

KNOWN = {(0, f"cap{i}_1{i}"): {"render_hash": "abcd" * 4, "caption_id": f"cap{i}", "pair_sha256": f"h{i}",
                              "stratum": "kept", "weight": 1.5} for i in range(40)}


def _payload(i: int = 0, **changes) -> dict:
    return {"partition": 0, "sample_key": f"cap{i}_1{i}", "label": "good", "reviewer": "alice",
            "session": "s-0001-aaaa", **changes}


def test_a_valid_label_becomes_a_full_row():
    row = check_label(_payload(3, label="broken", pair_sha256="h3"), KNOWN)
    assert row == {"render_hash": "abcd" * 4, "partition": 0, "sample_key": "cap3_13", "caption_id": "cap3",
                   "pair_sha256": "h3", "label": "broken", "reviewer": "alice", "session": "s-0001-aaaa",
                   "stratum": "kept", "weight": 1.5}


@pytest.mark.parametrize("payload, field", [
    ([1, 2], "JSON object"),
    (_payload(label="meh"), "label"),
    (_payload(label=None), "label"),
    (_payload(partition=True), "partition"),
    (_payload(partition="0"), "partition"),
    (_payload(partition=-1), "partition"),
    (_payload(reviewer="../alice"), "reviewer"),
    (_payload(reviewer=""), "reviewer"),
    (_payload(reviewer="a" * 41), "reviewer"),
    (_payload(session="short"), "session"),
    (_payload(session="s/0001/aaaa"), "session"),
    (_payload(sample_key="../../_SUCCESS"), "sample_key"),
    (_payload(sample_key="cap99_199"), "not a pair of this review"),
    (_payload(partition=1), "not a pair of this review"),
    (_payload(pair_sha256="other"), "images"),
    ({**_payload(), "time": "2020-01-01"}, "unknown"),
    ({k: v for k, v in _payload().items() if k != "session"}, "missing"),
])
def test_a_malformed_label_is_refused_with_the_field_named(payload, field):
    with pytest.raises(LabelError, match=field):
        check_label(payload, KNOWN)


def test_two_writers_and_two_sessions_append_concurrently_without_losing_a_label(tmp_path):
    folder = str(tmp_path / "review" / "h" / "labels.parquet")
    stores = [LabelStore(folder, chunk_rows=7) for _ in range(2)]  # two servers on one run
    jobs = [(stores[0], "alice", "s-alice-0001"), (stores[0], "alice", "s-alice-0002"),
            (stores[1], "bob", "s-bob-00001"), (stores[1], "carol", "s-carol-0001")]
    start = threading.Barrier(len(jobs))

    def label(store, reviewer, session):
        start.wait()
        for i in range(20):
            store.append([check_label(_payload(i, reviewer=reviewer, session=session), KNOWN)])

    threads = [threading.Thread(target=label, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = LabelStore(folder).read()
    assert len(read) == 80 and read.groupby(["reviewer", "session"]).size().to_dict() == {
        ("alice", "s-alice-0001"): 20, ("alice", "s-alice-0002"): 20, ("bob", "s-bob-00001"): 20,
        ("carol", "s-carol-0001"): 20}
    # 20 labels in parts of at most 7 rows: 3 parts per session, each written by its session only
    assert len(storage.list_files(folder, "*.parquet")) == 12
    assert len(pd.read_parquet(folder)) == 80  # the folder reads as one parquet table
    assert str(read["time"].dtype).startswith("datetime64") and read["time"].dt.tz is not None


def test_a_failed_write_stores_nothing_and_the_next_one_works(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = LabelStore(str(blocker / "labels.parquet"))
    with pytest.raises(OSError):
        store.append([check_label(_payload(1), KNOWN)])
    assert store._rows[("alice", "s-0001-aaaa")] == []
    store.folder = str(tmp_path / "labels.parquet")
    store.append([check_label(_payload(2), KNOWN)])
    assert LabelStore(store.folder).read()["sample_key"].tolist() == ["cap2_12"]


def test_the_newest_label_counts_and_a_label_never_meets_other_images(tmp_path):
    store = LabelStore(str(tmp_path / "labels.parquet"))
    store.append([check_label(_payload(1, label="wrong"), KNOWN)], now=pd.Timestamp("2026-01-01", tz="UTC"))
    store.append([check_label(_payload(1, label="good"), KNOWN)], now=pd.Timestamp("2026-01-02", tz="UTC"))
    store.append([check_label(_payload(2), KNOWN)], now=pd.Timestamp("2026-01-02", tz="UTC"))
    newest = latest(store.read())
    assert dict(zip(newest["sample_key"], newest["label"])) == {"cap1_11": "good", "cap2_12": "good"}
    # pair 2's images changed (another render under the same hash): its label is left out
    samples = pd.DataFrame({"partition": [0, 0], "sample_key": ["cap1_11", "cap2_12"], "pair_sha256": ["h1", "new"],
                            "clip_sim_dir": [0.5, 0.6]})
    joined, left_out = matched(newest, samples)
    assert joined["sample_key"].tolist() == ["cap1_11"] and left_out == 1


def _sample_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"partition": np.repeat([0, 1], n // 2), "sample_key": [f"c{i // 8}_{i}" for i in range(n)],
                       "caption_id": [f"c{i // 8}" for i in range(n)], "seed": np.arange(n),
                       "clip_sim_dir": rng.uniform(0, 1, n), "clip_sim_image": rng.uniform(0, 1, n),
                       "clip_sim_0": rng.uniform(0, 1, n), "clip_sim_1": rng.uniform(0, 1, n),
                       "image_stored": rng.uniform(0, 1, n) < 0.9, "early_rejected": False})
    return df


def test_every_stored_pair_has_one_stratum_and_the_weights_add_up_to_the_pairs():
    cfg = load_config("world")
    df = _sample_frame()
    from tasks.filter.review import decide

    decide(df, cfg)
    strata = assign_strata(df, cfg.selection(), band=0.1)
    assert strata.notna().sum() == df["image_stored"].sum()  # one stratum each, none for a pair without images
    assert set(strata.dropna()) <= {"kept", "passed", "far", "near:clip_direction", "near:clip_caption",
                                    "near:clip_image"}
    near = df[strata == "near:clip_direction"]
    assert ((cfg.selection().clip_direction_threshold - near["clip_sim_dir"]).between(0, 0.1)).all()
    sizes = {"kept": 5, "passed": 5, "far": 10, "near:clip_direction": 4, "near:clip_caption": 4, "near:clip_image": 4}
    queue = review_queue(df, strata, sizes, seed="h")
    counts = strata.value_counts()
    for name, group in queue.groupby("stratum"):
        assert len(group) == min(sizes[name], counts[name])
        assert group["weight"].sum() == pytest.approx(counts[name])  # weighted, the sample stands for its stratum
    # any prefix of the queue covers the strata; the same seed draws the same sample
    assert set(queue["stratum"].head(len(sizes))) == set(sizes) & set(counts.index)
    assert queue["sample_key"].tolist() == review_queue(df, strata, sizes, seed="h")["sample_key"].tolist()
    assert queue["sample_key"].tolist() != review_queue(df, strata, sizes, seed="other")["sample_key"].tolist()


def test_spread_takes_partitions_over_the_whole_run():
    assert spread(range(455), 5) == [0, 114, 227, 340, 454]
    assert spread([3, 1, 2], 8) == [1, 2, 3]


def test_review_settings_are_in_no_stage_hash():
    from tasks import registry

    base = load_config("world")
    changed = load_config("world", ["review.kept_pairs=3", "review.band=0.3", "review.target_precision=0.5"])
    assert all(registry.stage_hash(base, s.name) == registry.stage_hash(changed, s.name) for s in registry.chain())
    assert Selection().clip_image_threshold == 0.75  # the paper's, which calibrate-filter reports against
