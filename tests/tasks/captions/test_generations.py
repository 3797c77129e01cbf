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
from tasks.common import layout, storage
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
    real = generations.scan
    monkeypatch.setattr(generations, "scan", lambda sources, *a, **k: calls.append(list(sources)) or real(sources, *a, **k))
    assert extend(cfg) is None and not calls  # unchanged sources are not read again

    # new rows in a new file, plus one that repeats a taken caption with other case and punctuation
    taken_text = pd.read_parquet(layout.generation_url(cfg.output_root, stage_hash(cfg, "captions"), 0, "parquet"))["text"][0]
    pq.write_table(pa.table({"URL": [f"https://y/{i}.jpg" for i in range(200)] + ["https://y/dup.jpg"],
                             "TEXT": [f"a drawing of item {i}" for i in range(200)] + [taken_text.upper() + "."],
                             "AESTHETIC_SCORE": [7.0] * 201}), folder / "b.parquet")
    gen = extend(cfg)
    assert calls == [[str(folder / "b.parquet")]] and gen.number == 1  # appended: only the new file is read
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


# ------------------------------------------------------------------ the ledger vs the row-by-row one, through growth

def _pair(tmp_path, src, n, parts=7):
    from tests.tasks.captions import reference_v1

    return [(module, _cfg(tmp_path / name, f"{src}/*.parquet", n, parts))
            for module, name in ((reference_v1, "reference"), (generations, "current"))]


def _same_ledgers(pair):
    (ref, a), (cur, b) = pair
    la, lb = ref.ledger(a), cur.ledger(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        for key in ("generation", "first_partition", "num_partitions", "threshold", "taken", "total_taken",
                    "num_captions", "sources", "counts", "rejected"):
            assert x.record[key] == y.record[key], (x.number, key)
    config_hash = stage_hash(a, "captions")
    for p in range(partition_count(b)):
        expected, got = ref.partition_captions(a, p, config_hash), cur.partition_captions(b, p, config_hash)
        pd.testing.assert_frame_equal(got, expected)
        assert storage.table_bytes(got) == storage.table_bytes(expected)  # the partition's captions.parquet
    return lb[-1].record


def test_every_generation_matches_the_row_by_row_ledger(tmp_path):
    """First sample, a higher target, appended files (read alone), a file inserted before the others and one
    removed (full reads), the source running out, appended duplicates of captions whose file is gone."""
    from tests.tasks.captions import corpus

    src = tmp_path / "src"
    corpus.mixed_files(src, files=3, rows=1200, seed=1)
    steps = [(300, None, "full"), (300, None, None), (450, None, "full"),
             (450, lambda: corpus.mixed_files(src, files=1, rows=800, seed=7, prefix="n"), "incremental"),
             (450, lambda: corpus.mixed_files(src, files=1, rows=300, seed=8, prefix="a"), "full"),
             (10 ** 5, None, "full"),
             (10 ** 5, lambda: corpus.mixed_files(src, files=1, rows=500, seed=9, prefix="z"), "incremental"),
             (10 ** 5, lambda: (src / "a-000.parquet").unlink(), "full")]
    removed = pq.read_table(tmp_path / "src" / "m-000.parquet").slice(0, 200)
    steps.append((10 ** 5, lambda: pq.write_table(  # captions of a removed file come back under new URLs
        removed.set_column(0, "URL", pa.array([f"https://again/{i}" for i in range(200)])), src / "zz-000.parquet"),
        "incremental"))
    steps.insert(8, (10 ** 5, lambda: (src / "m-000.parquet").unlink(), "full"))
    for n, change, mode in steps:
        if change:
            change()
        pair = _pair(tmp_path, src, n)
        made = [module.extend(cfg) for module, cfg in pair]
        assert (made[0] is None) == (made[1] is None)
        record = _same_ledgers(pair)
        if mode:  # the record of the last read (a new generation's, or the last one's when nothing was new)
            assert record["read"] == mode, (n, mode)
    assert record["threshold"] == 1.0 and record["select"]["rejected"]  # the lost captions were found again


def test_a_partition_reads_only_its_own_row_group(tmp_path, monkeypatch):
    src = _source(tmp_path / "s.parquet", range(30000))
    cfg = _cfg(tmp_path / "r", src, 20000, 50)
    extend(cfg)
    config_hash = stage_hash(cfg, "captions")
    url = layout.generation_url(cfg.output_root, config_hash, 0, "parquet")
    meta = pq.ParquetFile(url).metadata
    assert meta.num_row_groups == 50  # sorted by partition, one row group each
    read = []
    real = storage.filesystem

    def counting(u):
        fs, path = real(u)
        if u != url:
            return fs, path

        class Counted:
            def open(self, p, mode="rb"):
                handle = fs.open(p, mode)
                original = handle.read
                handle.read = lambda *a: (data := original(*a), read.append(len(data)))[0]
                return handle
        return Counted(), path

    monkeypatch.setattr(generations.storage, "filesystem", counting)
    df = partition_captions(cfg, 17, config_hash)
    assert len(df) > 0 and (df["caption_id"].map(lambda c: int(c, 16) % 50) == 17).all()
    assert sum(read) < os.path.getsize(url) / 5  # its row group and the footer, not the other 49


def test_a_ledger_written_before_the_row_groups_is_read_and_grown(tmp_path):
    from tests.tasks.captions import reference_v1

    src = _source(tmp_path / "s.parquet", range(200))
    old, new = _cfg(tmp_path / "r", src, 30), _cfg(tmp_path / "r", src, 50)
    reference_v1.extend(old)  # a format-1 ledger: one row group, no dedup state
    config_hash = stage_hash(old, "captions")
    before = [reference_v1.partition_captions(old, p, config_hash) for p in range(2)]
    for p in range(2):
        pd.testing.assert_frame_equal(partition_captions(old, p, config_hash), before[p])
    first = _taken(old)
    gen = extend(new)
    assert gen.number == 1 and gen.record["read"] == "full" and gen.record["taken"] == 20
    assert set(first) < set(_taken(new)) and len(_taken(new)) == 50


def test_empty_partitions_and_an_empty_source_read_as_the_row_by_row_ledger_gives_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _source(src / "a.parquet", range(3))
    for n in (3, 1):  # three captions over seven partitions; then a source with no usable row at all
        pair = _pair(tmp_path / str(n), src, n)
        for module, cfg in pair:
            module.extend(cfg)
        _same_ledgers(pair)
        pq.write_table(pa.table({"URL": ["u"], "TEXT": [None], "AESTHETIC_SCORE": [7.0]}), src / "a.parquet")
