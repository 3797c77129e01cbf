"""bench/review_world.py: the world's own truth as labels, calibrate-filter on half of them, the other half as
the check (its --smoke size), and the truth itself checked on the world's drawn pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.component


def _bench():
    spec = importlib.util.spec_from_file_location("bench_review_world", ROOT / "bench" / "review_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_world_truth_tells_drawn_edits_from_wrong_ones():
    bench = _bench()
    accuracy = bench.oracle_accuracy(120)
    assert accuracy["drawn_pairs_good"] >= 0.97  # the world's own before/after pairs are good edits
    assert accuracy["other_triplet_after_rejected"] >= 0.95  # another scene as the after image is not
    assert accuracy["wrong_edit_after_rejected"] >= 0.85  # another edit of the same scene mostly not (style: unseen)
    from tasks.world.edits import sample_triplet
    from tasks.world.scene import image_array

    t = sample_triplet(3, 7, "background")
    good = bench.world_label(image_array(t.before), image_array(t.after), t.input, t.edit, t.output)
    swapped = bench.world_label(image_array(t.after), image_array(t.before), t.input, t.edit, t.output)
    other = bench.world_label(image_array(t.before), image_array(t.after), t.input, "make it striped", t.output)
    unknown = bench.world_label(image_array(t.before), image_array(t.after), t.input, "do something", t.output)
    assert [good[0], swapped[0], other[0], unknown[0]] == ["good", "wrong", "wrong", "unsure"], (good, swapped, other)


def test_review_world_smoke(tmp_path):
    bench = _bench()
    out = tmp_path / "review_world.json"
    result = bench.main(["--smoke", "--root", str(tmp_path / "run"), "--out", str(out), "--target", "0.3"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert sum(result["labels"].values()) == 16  # 4 captions x 4 samples, every pair labelled
    rules = {(r["set"], r["rule"]) for r in result["all_labels"]["rules"]}
    assert {("paper", "CLIP (all three)"), ("current", "CLIP (all three)"), ("current", "direction")} <= rules
    assert set(result["half_B"]["rules"]) >= {"paper", "world"}
    assert result["other_splits"]["splits"] == 2 and len(result["other_splits"]["per_split"]) == 2
    labels = list((tmp_path / "run" / "review").glob("*/labels.parquet/world-truth-*.parquet"))
    assert len(labels) == 1
