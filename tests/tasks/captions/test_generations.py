"""The captions ledger: seeded order-free sampling, growth by generations, nothing taken twice."""

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.captions import generations
from tasks.captions.generations import extend, ledger, partition_captions, partition_count, priority
from tasks.captions.laion import caption_id
from tasks.captions.stage import run as run_captions
from tasks.common import layout
from tasks.common.config import load_config
from tasks.registry import stage_hash


def _source(path, rows: range, order=None, text=lambda i: f"a photo of thing number {i}"):
    ids = list(rows) if order is None else order
    pq.write_table(pa.table({"URL": [f"https://x/{i}.jpg" for i in ids], "TEXT": [text(i) for i in ids],
                             "AESTHETIC_SCORE": [7.0] * len(ids)}), path)
    os.utime(path, ns=(1, 1 + len(ids)))  # a rewrite in the same second still looks changed
    return str(path)


def _cfg(root, source, n=20, parts=2, *extra):
    return load_config("demo", [f"output_root={root}", f"captions.source={source}", f"captions.num_captions={n}",
                                f"captions.num_partitions={parts}", *extra])


def _taken(cfg) -> list[str]:
    return sorted(pd.concat([partition_captions(cfg, p, stage_hash(cfg, "captions"))
                             for p in range(partition_count(cfg))])["caption_id"])


def _files(cfg) -> dict[str, bytes]:
    folder = layout.generations_dir(cfg.output_root, stage_hash(cfg, "captions"))
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith(".parquet")}


def test_first_generation_is_the_lowest_draws_whatever_the_row_order(tmp_path):
    a = _cfg(tmp_path / "a", _source(tmp_path / "a.parquet", range(100)))
    b = _cfg(tmp_path / "b", _source(tmp_path / "b.parquet", range(100), order=list(range(99, -1, -1))))
    c = _cfg(tmp_path / "c", _source(tmp_path / "c.parquet", range(100)), 20, 2, "captions.seed=1")
    for cfg in (a, b, c):
        extend(cfg)
    assert _taken(a) == _taken(b) and len(_taken(a)) == 20
    assert _taken(a) != _taken(c)  # the seed decides
    ids = pd.read_parquet(tmp_path / "a.parquet")["TEXT"].map(caption_id)
    lowest = sorted(ids, key=lambda cid: priority(0, cid))[:20]
    assert sorted(lowest) == _taken(a)
    assert partition_count(a) == 2


def test_raising_num_captions_adds_captions_and_keeps_the_first_ones(tmp_path):
    src = _source(tmp_path / "s.parquet", range(100))
    small = _cfg(tmp_path / "r", src, 20)
    extend(small)
    first, files = _taken(small), _files(small)
    big = _cfg(tmp_path / "r", src, 30)
    assert stage_hash(big, "captions") == stage_hash(small, "captions")  # the same version grows
    gen = extend(big)
    assert gen.number == 1 and gen.first_partition == 2 and gen.record["taken"] == 10
    assert set(first) < set(_taken(big)) and len(_taken(big)) == 30
    assert {k: v for k, v in _files(big).items() if k in files} == files  # generation 0 untouched
    assert extend(big) is None  # nothing changed: no new generation


def test_a_grown_source_is_sampled_at_the_same_rate_and_never_twice(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    _source(folder / "a.parquet", range(200))
    cfg = _cfg(tmp_path / "r", f"{folder}/*.parquet", 40)
    extend(cfg)
    first = set(_taken(cfg))
    threshold = ledger(cfg)[0].record["threshold"]

    calls = []
    real = generations.read_captions
    monkeypatch.setattr(generations, "read_captions", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert extend(cfg) is None and not calls  # unchanged sources are not read again

    # new rows in a new file, plus one that repeats a taken caption with other case and punctuation
    taken_text = pd.read_parquet(layout.generation_url(cfg.output_root, stage_hash(cfg, "captions"), 0, "parquet"))["text"][0]
    pq.write_table(pa.table({"URL": [f"https://y/{i}.jpg" for i in range(200)] + ["https://y/dup.jpg"],
                             "TEXT": [f"a drawing of item {i}" for i in range(200)] + [taken_text.upper() + "."],
                             "AESTHETIC_SCORE": [7.0] * 201}), folder / "b.parquet")
    gen = extend(cfg)
    assert calls and gen.number == 1
    new = set(_taken(cfg)) - first
    assert first <= set(_taken(cfg))
    assert new and all(priority(0, cid) < threshold for cid in new)  # the first run's rate
    assert gen.record["rejected"].get("duplicate_caption", 0) >= 1
    assert len(new) == gen.record["taken"] < 200
    assert gen.partitions == range(2, 2 + gen.num_partitions)


def test_partitions_of_a_generation_come_from_the_ledger_under_the_contract(tmp_path):
    src = _source(tmp_path / "s.parquet", range(50))
    cfg = _cfg(tmp_path / "r", src, 10)
    manifests = [run_captions(cfg, p) for p in range(2)]  # no prepare: the first partition extends the ledger
    assert sum(m["counts"]["out"] for m in manifests) == 10
    assert manifests[0]["path"] == f"captions/{stage_hash(cfg, 'captions')}/part-00000"
    with pytest.raises(ValueError, match="part-00007 does not exist"):
        partition_captions(cfg, 7, stage_hash(cfg, "captions"))


def test_a_change_of_filter_is_a_new_version_next_to_the_old(tmp_path):
    src = _source(tmp_path / "s.parquet", range(50))
    a, b = _cfg(tmp_path / "r", src, 10), _cfg(tmp_path / "r", src, 10, 2, "captions.min_aesthetic_score=7.5")
    assert stage_hash(a, "captions") != stage_hash(b, "captions")
    extend(a)
    extend(b)
    assert len(ledger(a)) == len(ledger(b)) == 1
    assert sorted(os.listdir(tmp_path / "r" / "captions")) == sorted([stage_hash(a, "captions"), stage_hash(b, "captions")])
