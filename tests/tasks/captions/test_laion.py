import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.captions.laion import (
    CaptionSourceError,
    caption_id,
    normalise_caption,
    read_captions,
    resolve_sources,
)
from tasks.common.config import CaptionsConfig
from tasks.common.contract import Stats


def _write(path, **cols):
    n = len(next(iter(cols.values()))) if cols else 3
    base = {"URL": [f"https://x/{i}.jpg" for i in range(n)], "TEXT": [f"caption {i}" for i in range(n)],
            "WIDTH": [512] * n, "HEIGHT": [512] * n, "similarity": [0.3] * n, "punsafe": [0.01] * n,
            "pwatermark": [0.1] * n, "AESTHETIC_SCORE": [7.0] * n, "hash": list(range(n))}
    base.update(cols)
    pq.write_table(pa.table(base), path)
    return str(path)


def test_caption_id_is_normalised():
    assert caption_id("A  cat\tON a mat ") == caption_id("a cat on a mat")
    assert len(caption_id("x")) == 16
    assert normalise_caption("  A\n cat ") == "A cat"


def test_dedup_across_files_and_reasons(tmp_path):
    f1 = _write(tmp_path / "a.parquet", TEXT=["A cat", "a dog", None, "", "x" * 600, "a bird"],
                AESTHETIC_SCORE=[7.0, 7.0, 7.0, 7.0, 7.0, float("nan")])
    f2 = _write(tmp_path / "b.parquet", TEXT=["a  CAT", "a fish", "a cow"],
                URL=["https://y/0.jpg", "https://x/1.jpg", "https://y/2.jpg"], AESTHETIC_SCORE=[7.0, 7.0, 5.0])
    stats = Stats()
    df = read_captions([f1, f2], CaptionsConfig(), stats)
    assert list(df["text"]) == ["A cat", "a dog"]
    assert stats.rejected == {"null_caption": 1, "empty_caption": 1, "caption_too_long": 1,
                              "nan_aesthetic_score": 1, "duplicate_caption": 1, "duplicate_url": 1,
                              "low_aesthetic_score": 1}
    # every row is accounted for: accepted + rejected == read
    assert len(df) + sum(stats.rejected.values()) == stats.counts["rows_read"] == 9


def test_filters_unsafe_watermark_and_size(tmp_path):
    f = _write(tmp_path / "a.parquet", punsafe=[0.9, 0.0, 0.0], pwatermark=[0.0, 0.9, 0.0], WIDTH=[512, 512, 64])
    stats = Stats()
    cfg = CaptionsConfig(max_punsafe=0.5, max_pwatermark=0.5, min_side=256)
    assert read_captions([f], cfg, stats).empty
    assert stats.rejected == {"unsafe": 1, "watermark": 1, "too_small": 1}


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "nocap.parquet"
    pq.write_table(pa.table({"URL": ["u"]}), path)
    with pytest.raises(CaptionSourceError, match=r"nocap\.parquet.*'TEXT'"):
        read_captions([str(path)], CaptionsConfig(), Stats())


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CaptionSourceError, match="corrupt.parquet"):
        read_captions([str(bad)], CaptionsConfig(), Stats())
    with pytest.raises(CaptionSourceError, match="missing.parquet"):
        read_captions([str(tmp_path / "missing.parquet")], CaptionsConfig(), Stats())


def test_invalid_utf8_is_counted(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"URL": ["u1", "u2"], "TEXT": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), path)
    stats = Stats()
    df = read_captions([str(path)], CaptionsConfig(), stats)
    assert list(df["text"]) == ["ok"] and stats.rejected == {"invalid_utf8": 1}


def test_builtin_demo_source_resolves_and_reads():
    (path,) = resolve_sources("builtin:demo")
    stats = Stats()
    df = read_captions([path], CaptionsConfig(), stats)
    assert len(df) > 200 and stats.rejected.get("duplicate_caption", 0) > 0
    assert df["caption_id"].is_unique


def test_glob_source(tmp_path):
    _write(tmp_path / "a.parquet")
    _write(tmp_path / "b.parquet")
    assert [p.rsplit("/", 1)[-1] for p in resolve_sources(str(tmp_path / "*.parquet"))] == ["a.parquet", "b.parquet"]
    with pytest.raises(CaptionSourceError, match="matched no file"):
        resolve_sources(str(tmp_path / "*.nothing"))


def test_reads_fsspec_urls_and_globs_across_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name, texts in {"a": ["a cat", "a dog"], "b": ["A CAT", "a bird"]}.items():
        local = _write(tmp_path / f"{name}.parquet", TEXT=texts, URL=[f"https://{name}/{i}" for i in range(2)])
        fs.pipe(f"/laion-test/{name}.parquet", open(local, "rb").read())
    sources = resolve_sources("memory://laion-test/*.parquet")
    assert len(sources) == 2 and all(s.startswith("memory://") for s in sources)
    stats = Stats()
    df = read_captions(sources, CaptionsConfig(), stats)
    assert sorted(df["text"]) == ["a bird", "a cat", "a dog"] and stats.rejected == {"duplicate_caption": 1}


def test_cleaning_dedups_punctuation_variants_strips_control_chars_and_counts_coercions(tmp_path):
    f = _write(tmp_path / "a.parquet", TEXT=["A cat.", "a cat", "a\x00 dog\x07", "a bird!!", "A BIRD"],
               AESTHETIC_SCORE=["7.5", "7.0", "7.0", "7.0", "7.0"])
    stats = Stats()
    df = read_captions([f], CaptionsConfig(), stats)
    assert list(df["text"]) == ["A cat.", "a dog", "a bird!!"]
    assert stats.rejected == {"duplicate_caption": 2}
    assert stats.counts["cleaned_control_chars"] == 1 and stats.counts["coerced_AESTHETIC_SCORE"] == 5
    assert df["aesthetic_score"].tolist() == [7.5, 7.0, 7.0]
    assert len(df) + sum(stats.rejected.values()) == stats.counts["rows_read"] == 5
