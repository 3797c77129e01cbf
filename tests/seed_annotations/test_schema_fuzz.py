"""Fuzzed seed reader: generated JSONL files (valid triplets, other JSON, text, raw bytes, byte-order marks,
CRLF, blank and over-long lines) through `load_triplets` and the fine-tune stage that reads them.

Properties: a list of valid triplets or a `SeedAnnotationError` naming the file (and the line, when one
line is at fault: a line that exists), never another exception; nothing marked done for a rejected file;
memory bounded by the line limit, however long a line is. `@example`s are the corpus of bugs found.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fuzz_profiles

from fuzz_profiles import examples

from seed_annotations.schema import SeedAnnotationError, Triplet, load_triplets

LIMIT = 256  # a small text.seed_max_line_bytes, so that over-long lines are cheap to generate
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
triplet = st.fixed_dictionaries({"input": text, "edit": text, "output": text})
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                          max_leaves=12)
line = st.one_of(
    triplet.map(json.dumps).map(str.encode),
    st.dictionaries(st.sampled_from(["input", "caption", "edit", "output", "extra"]), json_value, max_size=5)
    .map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    text.map(lambda t: t.replace("\n", " ").encode()),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(LIMIT - 8, LIMIT + 40).map(lambda n: json.dumps({"input": "a" * n, "edit": "e", "output": "b"}).encode()),
    st.just(b""), st.just(b"["), st.just(b"]"), st.just(b"{"),
)
files = st.tuples(st.lists(line, max_size=12), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.booleans(), st.booleans())


def _bytes(parts: tuple[list[bytes], bytes, bool, bool]) -> bytes:
    lines, end, bom, last_newline = parts
    data = end.join(lines) + (end if last_newline and lines else b"")
    return (b"\xef\xbb\xbf" if bom else b"") + data


def check(path: Path, data: bytes) -> list[Triplet] | SeedAnnotationError:
    path.write_bytes(data)
    try:
        got = load_triplets(path, strict=False, max_line_bytes=LIMIT)
    except SeedAnnotationError as err:
        message = str(err)
        assert message.startswith(f"{path}"), message
        if " line " in message.split(":", 1)[0]:
            number = int(message.split(" line ", 1)[1].split(":", 1)[0])
            assert 1 <= number <= data.count(b"\n") + data.count(b"\r") + 1, (number, message)
        return err
    assert got and all(isinstance(t, Triplet) and t.input and t.edit and t.output for t in got)
    assert len(got) <= len(data.splitlines())
    return got


@settings(max_examples=examples("large"))
@given(files)
@example(([b'[{"input": "a", "edit": "e", "output": "b"},'], b"\n", False, True)).via(
    "issue 25: a JSON array got no hint that JSONL is expected")
@example(([b"[" * 5000], b"\n", False, False)).via("fuzz: deep nesting (json RecursionError)")
@example(([b'{"input": ' + b"9" * 5000 + b"}"], b"\n", False, False)).via("fuzz: a 5000-digit number")
def test_any_seed_file_loads_or_fails_naming_the_file_and_line(tmp_path_factory, parts):
    check(tmp_path_factory.mktemp("seeds") / "seeds.jsonl", _bytes(parts))


def test_a_json_array_gets_the_jsonl_hint(tmp_path):
    good = json.dumps({"input": "a red barn", "edit": "make it snowy", "output": "a snowy red barn"})
    for data in (f"[{good}, {good}]", f"[\n{good},\n{good}\n]\n", "{\n  \"input\": \"a\"\n}\n"):
        err = check(tmp_path / "array.jsonl", data.encode())
        assert isinstance(err, SeedAnnotationError) and "line 1:" in str(err)
        assert "seed annotations are JSON Lines: one" in str(err), str(err)


@pytest.mark.parametrize("size", [4_800_000, 40_000_000])
def test_an_enormous_line_is_refused_and_counted_in_bounded_memory(tmp_path, size):
    good = json.dumps({"input": "a red barn", "edit": "make it snowy", "output": "a snowy red barn"})
    path = tmp_path / "long.jsonl"
    with path.open("wb") as fh:
        fh.write(good.encode() + b"\n" + b'{"input": "' + b"x" * size + b'", "edit": "e", "output": "o"}\n')
        fh.write(good.replace("barn", "house").encode() + b"\n" + b"y" * (size // 2) + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(SeedAnnotationError) as err:
            load_triplets(path, max_line_bytes=16384)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).startswith(f"{path}: 2 line(s) longer than 16,384 bytes, refused: lines 2 ({size + 41:,} bytes), "
                                     f"4 ({size // 2:,} bytes); ")
    assert "--set text.seed_max_line_bytes=N" in str(err.value)
    assert peak < 2 * 2**20, peak  # the line is never held whole


@settings(max_examples=examples("small"))
@given(files)
def test_the_fine_tune_stage_marks_nothing_done_for_a_rejected_seed_file(tmp_path_factory, parts):
    from tasks.common.config import load_config
    from tasks.text.finetune import run as run_finetune

    folder = tmp_path_factory.mktemp("stage")
    seeds = folder / "seeds.jsonl"
    result = check(seeds, _bytes(parts))
    if not isinstance(result, SeedAnnotationError):
        return  # a valid file would train the LM: the reader's property above covers it
    cfg = load_config("demo", [f"output_root={folder / 'run'}", f"text.seed_annotations={seeds}",
                               f"text.seed_max_line_bytes={LIMIT}"])
    with pytest.raises(SeedAnnotationError) as err:
        run_finetune(cfg)
    assert str(err.value) == str(result)
    assert not list(folder.rglob("_SUCCESS.json"))
