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


# ------------------------------------------------------------------ the vectorised reader vs the row-by-row one

def test_whitespace_tables_are_pythons():
    from tasks.captions.laion import PY_WHITESPACE

    assert set(PY_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    from tests.tasks.captions import corpus

    folder = tmp_path_factory.mktemp("corpus")
    return corpus.edge_files(folder / "edge") + corpus.mixed_files(folder / "mix")


@pytest.mark.parametrize("settings", [{}, {"min_side": 300, "max_punsafe": 0.5, "max_pwatermark": 0.5,
                                          "max_caption_chars": 40, "min_aesthetic_score": 6.0}])
def test_same_captions_ids_order_and_counts_as_the_row_by_row_reader(corpus_files, settings):
    """Every cleaning and dedup case (tests/tasks/captions/corpus.py) read in batches of 7 rows and whole."""
    import pandas as pd

    from tests.tasks.captions import reference_v1

    cfg = CaptionsConfig(**settings)
    ref_stats = Stats()
    expected = reference_v1.read_captions(corpus_files, cfg, ref_stats)
    for batch_size in (7, 131072):
        stats = Stats()
        got = read_captions(corpus_files, cfg, stats, batch_size=batch_size)
        pd.testing.assert_frame_equal(got, expected)
        assert (stats.counts, stats.rejected) == (ref_stats.counts, ref_stats.rejected)
    assert len(expected) > 300 and len(ref_stats.rejected) >= 9


def test_optional_columns_missing_everywhere_give_the_same_empty_columns(tmp_path):
    import pandas as pd

    from tests.tasks.captions import reference_v1

    path = str(tmp_path / "bare.parquet")
    pq.write_table(pa.table({"URL": ["u1", "u2"], "TEXT": ["a", "b"]}), path)
    got, expected = read_captions([path], CaptionsConfig(), Stats()), reference_v1.read_captions([path], CaptionsConfig(), Stats())
    pd.testing.assert_frame_equal(got, expected)
    assert got["width"].dtype == object and got["source_row_hash"].isna().all()


@pytest.mark.parametrize("column, values", [("TEXT", [0, 1, 2]), ("URL", [1.5, 2.5, 3.5])])
def test_a_column_that_is_not_text_is_refused_naming_file_and_column(tmp_path, column, values):
    path = _write(tmp_path / "numbers.parquet", **{column: values})
    with pytest.raises(CaptionSourceError, match=rf"numbers\.parquet: column '{column}' holds (int64|double) values, not text"):
        read_captions([path], CaptionsConfig(), Stats())


def test_the_caption_length_bound_is_a_setting_and_counted(tmp_path):
    from tasks.common.config import load_config

    path = _write(tmp_path / "a.parquet", TEXT=["short one", "a caption of thirty characters", "  x  " * 3])
    cfg = load_config("demo", ["captions.max_caption_chars=12"]).captions
    stats = Stats()
    assert list(read_captions([path], cfg, stats)["text"]) == ["short one", "x x x"]
    assert stats.rejected == {"caption_too_long": 1}
    assert "caption_too_long" in type(cfg).model_fields["max_caption_chars"].description


def test_an_infinite_size_is_no_size(tmp_path):
    path = _write(tmp_path / "a.parquet", WIDTH=[float("inf"), 512.0, 640.0], HEIGHT=[512, -float("inf"), 480])
    df = read_captions([path], CaptionsConfig(), Stats())
    assert df["width"].isna().tolist() == [True, False, False] and df["height"].isna().tolist() == [False, True, False]
    stats = Stats()
    assert len(read_captions([path], CaptionsConfig(min_side=256), stats)) == 1 and stats.rejected == {"too_small": 2}
