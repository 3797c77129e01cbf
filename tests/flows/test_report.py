"""The report says why one stage's `in` is not the stage before it's `out` (no Prefect needed)."""

from flows.report import between_stages, summarise


def _m(pid, counts, rejected=None):
    return {"partition_id": pid, "counts": counts, "rejected": rejected or {}}


def _run(partitions=(0, 1)):
    return {
        "captions": [_m(p, {"out": 20}) for p in partitions],
        "finetune": [_m(0, {"finetune_examples": 160, "out": 1})],
        "text": [_m(p, {"in": 20, "out": 16}, {"unparseable": 4}) for p in partitions],
        "render": [
            _m(p, {"in": 20, "samples": 54, "passed": 30, "out": 25}, {"clip_direction": 24})
            for p in partitions
        ],
        "judge": [_m(p, {"in": 25, "out": 25}) for p in partitions],
        "filter": [
            _m(p, {"in": 54, "out": 25}, {"clip_direction": 20, "not_in_top_k": 9}) for p in partitions
        ],
        "pack": [_m(p, {"in": 25, "out": 25}) for p in partitions],
    }


def test_each_drop_between_stages_is_explained():
    lines = between_stages(summarise(_run()))
    assert (
        lines[0]
        == "captions -> text: text in 40 = captions out 40 (the captions of its partitions); out 32 (8 dropped: unparseable: 8)"
    )
    # the "text out 32, render in 40": render counts the rows text rejected too
    assert lines[1].startswith(
        "text -> render: render in 40 = text in 40 (every row of text's triplets.parquet, "
        "the ones text rejected included); text accepted 32 of them and rejected 8 (unparseable: 8)"
    )
    assert "108 samples drawn, 60 passed, 50 pairs kept" in lines[1]
    assert lines[3].startswith("render -> filter: filter in 108 = render samples 108")
    assert lines[3].endswith("out 50 (58 dropped: clip_direction: 40, not_in_top_k: 18)")
    assert lines[4] == "filter -> pack: pack in 50 = filter out 50 (the pairs the filter kept)"


def test_stages_with_different_partitions_finished_say_so():
    run = _run()
    run["render"] = run["render"][:1]  # mid-run: render has one of two partitions
    line = next(x for x in between_stages(summarise(run)) if x.startswith("text -> render"))
    assert line == (
        "text -> render: render in 20, text in 40: render has 1 partitions finished, text 2 "
        "(the rest are not counted yet)"
    )
