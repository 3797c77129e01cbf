"""Fuzzed caption reader: generated LAION-shaped parquet files (column types, nulls, encodings, codecs, row
groups, sizes, damaged bytes) through `tasks.captions.laion.read_captions` and the captions stage.

Written against the contract, not the implementation (the reader is being rewritten): every file gives a
table or an error a retry cannot fix whose message names the file (and the column, for a missing one),
never another exception; every row of the file is accepted or counted under a rejection reason; an
accepted caption is a non-empty string within `captions.max_caption_chars`; nothing is marked done when
the stage fails. `test_a_caption_column_that_is_not_text_is_refused_or_every_row_counted` holds the
issue 25 case (an integer column used to become captions '0', '1', ... with no count).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for fuzz_profiles

from fuzz_profiles import examples

from tasks.captions.laion import read_captions
from tasks.common.config import load_config
from tasks.common.contract import Stats
from tasks.common.errors import is_permanent

CFG = load_config("demo", ["captions.max_caption_chars=200", "captions.min_aesthetic_score=0"])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
TEXT_TYPES = [
    "string",
    "large_string",
    "binary",
    "dictionary",
    "int64",
    "float64",
    "bool",
    "null",
    "list",
    "struct",
    "timestamp",
]
NOT_TEXT = {"int64", "float64", "bool", "list", "struct", "timestamp"}
ANY_TEXT_TYPE = st.sampled_from(TEXT_TYPES)


@st.composite
def column(draw, n: int, kind: str, strings=text):
    """``n`` values of ``kind`` (some null) as a pyarrow array."""
    nulls = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if kind == "null":
        return pa.nulls(n)
    if kind in ("string", "large_string", "dictionary"):
        values = [None if null else draw(strings) for null in nulls]
        array = pa.array(values, type=pa.large_string() if kind == "large_string" else pa.string())
        return array.dictionary_encode() if kind == "dictionary" else array
    if kind == "binary":
        values = [
            None if null else draw(st.one_of(strings.map(str.encode), st.binary(max_size=40)))
            for null in nulls
        ]
        return pa.array(values, type=pa.binary())
    scalar = {
        "int64": st.integers(-(2**63), 2**63 - 1),
        "float64": st.floats(),
        "bool": st.booleans(),
        "list": st.lists(strings, max_size=3),
        "struct": st.fixed_dictionaries({"a": strings}),
        "timestamp": st.integers(0, 2**40),
    }[kind]
    values = [None if null else draw(scalar) for null in nulls]
    return pa.array(values, type=pa.timestamp("ms") if kind == "timestamp" else None)


@st.composite
def parquet_files(draw, text_types=ANY_TEXT_TYPE):
    n = draw(st.integers(0, 25))
    kind = draw(text_types)
    columns = {}
    if draw(st.integers(0, 9)):  # now and then the required column is missing (or named otherwise)
        columns["TEXT"] = draw(column(n, kind))
    elif draw(st.booleans()):
        columns["text"] = draw(column(n, "string"))
    if draw(st.integers(0, 9)):
        columns["URL"] = draw(
            column(
                n,
                draw(st.sampled_from(["string", "string", "binary", "int64", "null"])),
                strings=st.text(max_size=30).map(lambda t: f"https://x/{t}"),
            )
        )
    for name in ("AESTHETIC_SCORE", "punsafe", "pwatermark", "WIDTH", "HEIGHT", "hash", "similarity"):
        if draw(st.booleans()):
            columns[name] = draw(
                column(
                    n,
                    draw(st.sampled_from(["float64", "int64", "string", "null", "bool"])),
                    strings=st.sampled_from(["7.5", "nan", "x", "", "1e309", "-0"]) | text,
                )
            )
    table = pa.table(columns) if columns else pa.table({"other": pa.nulls(n)})
    options = {
        "compression": draw(st.sampled_from(["snappy", "gzip", "zstd", "none"])),
        "use_dictionary": draw(st.booleans()),
        "row_group_size": draw(st.integers(1, 30)),
        "data_page_size": draw(st.sampled_from([None, 64])),
    }
    damage = draw(st.sampled_from([None, None, None, "truncate", "flip", "noise"]))
    return kind, table, options, damage, draw(st.integers(0, 2**31))


def write(path: Path, table: pa.Table, options: dict, damage: str | None, seed: int) -> int:
    """Write the file (damaged as asked); the number of rows it holds."""
    pq.write_table(table, path, **{k: v for k, v in options.items() if v is not None})
    if damage:
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: seed % max(1, len(data))]
        elif damage == "flip":
            for i in range(8):
                data[(seed + i * 7919) % len(data)] ^= 0xFF
        else:
            data = bytearray(seed.to_bytes(8, "little") * 40)
        path.write_bytes(bytes(data))
    return table.num_rows


def read(path: Path) -> tuple[object, Stats]:
    stats = Stats()
    try:
        return read_captions([str(path)], CFG.captions, stats), stats
    except Exception as err:  # noqa: BLE001  (the property is about what is raised)
        assert is_permanent(err), f"{type(err).__name__}: {err}"
        assert str(path) in str(err), str(err)
        return err, stats


def check(path: Path, case) -> object:
    kind, table, options, damage, seed = case
    rows = write(path, table, options, damage, seed)
    got, stats = read(path)
    if isinstance(got, Exception):
        missing = [c for c in ("TEXT", "URL") if c not in table.column_names]
        if damage is None and missing:
            assert any(f"'{c}'" in str(got) for c in missing), str(got)  # names the column
        return got
    assert damage is not None or len(got) + sum(stats.rejected.values()) == rows, (
        len(got),
        stats.rejected,
        rows,
    )
    for caption in got["text"]:
        assert isinstance(caption, str) and caption.strip() and len(caption) <= CFG.captions.max_caption_chars
    assert got["caption_id"].is_unique
    return got


@settings(max_examples=examples("medium"))
@given(parquet_files())
@example(
    ("string", pa.table({"TEXT": ["a" * 10_000], "URL": ["https://x/1"]}), {"compression": "none"}, None, 0)
).via("a caption of 10,000 characters")
@example(
    ("binary", pa.table({"TEXT": pa.array([b"\xff\xfe"], pa.binary()), "URL": ["https://x/1"]}), {}, None, 0)
).via("a caption that is not UTF-8")
def test_any_caption_file_gives_captions_or_an_error_naming_it(tmp_path_factory, case):
    check(tmp_path_factory.mktemp("captions") / "laion.parquet", case)


@settings(max_examples=examples("small"))
@given(parquet_files(text_types=st.sampled_from(sorted(NOT_TEXT))))
@example(
    ("int64", pa.table({"TEXT": list(range(5)), "URL": [f"https://x/{i}" for i in range(5)]}), {}, None, 0)
).via("issue 25: an integer caption column became captions '0'-'4' with no count")
def test_a_caption_column_that_is_not_text_is_refused_or_every_row_counted(tmp_path_factory, case):
    kind, table, options, damage, seed = case
    assume(
        "TEXT" in table.column_names and damage is None
    )  # a whole file with a caption column that is not text
    got = check(tmp_path_factory.mktemp("captions") / "laion.parquet", case)
    if isinstance(
        got, Exception
    ):  # refused: for its caption column, or first for a missing/non-text URL column
        assert "'TEXT'" in str(got) or "'URL'" in str(got), got
    else:
        assert len(got) == 0, got


@settings(max_examples=examples("small") // 2)
@given(parquet_files())
def test_the_captions_stage_marks_nothing_done_for_a_file_it_refuses(tmp_path_factory, case):
    from tasks import registry

    folder = tmp_path_factory.mktemp("stage")
    path = folder / "laion.parquet"
    kind, table, options, damage, seed = case
    write(path, table, options, damage, seed)
    cfg = load_config(
        "demo",
        [
            f"output_root={folder / 'run'}",
            f"captions.source={path}",
            "captions.num_captions=4",
            "captions.min_aesthetic_score=0",
        ],
    )
    try:
        registry.prepare(cfg, "captions")
        for pid in registry.partition_ids(cfg, "captions"):
            registry.entry("captions")(cfg, pid)
    except Exception as err:  # noqa: BLE001
        assert is_permanent(err) and str(path) in str(err), f"{type(err).__name__}: {err}"
        assert not list(folder.rglob("_SUCCESS.json"))


def test_a_column_name_that_is_not_utf8_in_the_footer_is_refused_naming_the_file(tmp_path):
    """Found by the fuzz above (a flipped byte in a footer's column name: pyarrow raised UnicodeDecodeError)."""
    path = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table({"TEXT": ["a red circle"], "URL": ["https://x/1"], "AESTHETIC_SCORE": [7.0]}), path
    )
    data = path.read_bytes()
    path.write_bytes(data.replace(b"AESTHETIC_SCORE", b"\xbeESTHETIC_SCORE"))  # every copy in the footer
    got, _ = read(path)
    assert isinstance(got, Exception) and "not a readable parquet file" in str(got)
