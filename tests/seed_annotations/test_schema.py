"""Tests for seed_annotations.schema: the shipped triplets and the loader's error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import pytest

from seed_annotations.schema import (
    SeedAnnotationError,
    Triplet,
    comparable_caption,
    default_triplets_path,
    load_triplets,
    split_train_val,
)

GOOD = {
    "input": "A red barn in a snowy field",
    "edit": "make it summer",
    "output": "A red barn in a green field",
}

# Keyword checks for the paper's edit kinds (a sanity check, not a classifier): kind -> (regex, minimum).
EDIT_KINDS: dict[str, tuple[str, int]] = {
    "replace object": (r"\b(replace|swap|instead)\b|\bturn the \w+ into\b|\bchange the \w+ into\b", 12),
    "style or medium": (
        (
            r"\b(painting|watercolou?r|sketch|drawing|print|pixel art|anime|illustration|ghibli"
            r"|render|claymation|stained glass|photograph)\b"
        ),
        12,
    ),
    "season": (r"\b(winter|summer|autumn|fall|spring|springtime|season)\b", 12),
    "weather": (r"\b(rain\w*|snow\w*|fog\w*|mist\w*|\w*storm\w*|sunny|hail|hurricane|windy)\b", 12),
    "time of day": (
        r"\b(night\w*|sunset|sunrise|dawn|midnight|daytime|morning|golden hour|twilight|blue hour)\b",
        12,
    ),
    "setting": (r"^(put|move|place)\b|\bset it in a\b|\bbackground\b|\bhave them be in\b", 12),
    "material": (r"\bout of\b|\bmade of\b|\bwooden$", 12),
    "colour": (r"\b(red|blue|black|white|yellow|green|pink|purple|orange)$|\bcolou?r\b", 12),
    "add": (r"^(add|give)\b", 12),
    "remove": (r"^(remove|get rid of|take away|take out)\b", 12),
    "age": (r"\b(old|young|teenager|adult|grandmother|grown)\b", 5),
    "emotion": (r"\b(cry|angry|laugh|excited|sad|smile)\b", 5),
    "era": (r"\b(1920s|1950s|1970s|1980s|victorian|futuristic)\b", 5),
}


def write_jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shipped() -> list[Triplet]:
    return load_triplets(default_triplets_path())


def test_shipped_file_is_packaged_and_large_enough(shipped: list[Triplet]) -> None:
    assert default_triplets_path().name == "triplets.jsonl"
    assert len(shipped) >= 160


def test_shipped_file_uses_exactly_the_paper_keys() -> None:
    for line in default_triplets_path().read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"input", "edit", "output"}


def test_shipped_triplets_are_distinct_and_change_the_caption(shipped: list[Triplet]) -> None:
    inputs = [comparable_caption(t.input) for t in shipped]
    assert len(set(inputs)) == len(inputs)
    assert all(comparable_caption(t.output) != comparable_caption(t.input) for t in shipped)


@pytest.mark.parametrize("kind", sorted(EDIT_KINDS))
def test_every_edit_kind_is_covered(shipped: list[Triplet], kind: str) -> None:
    pattern, minimum = EDIT_KINDS[kind]
    matches = [t.edit for t in shipped if re.search(pattern, t.edit.lower())]
    assert len(matches) >= minimum, f"{kind}: only {len(matches)} edits match: {matches}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"input": "a cat", "edit": "make it a dog",', r"line 3: invalid JSON"),
        ('["a cat", "make it a dog", "a dog"]', r"line 3: expected a JSON object, got list"),
        ('{"input": "a cat", "output": "a dog"}', r"line 3: field 'edit': Field required"),
        (
            '{"input": "a cat", "edit": "  ", "output": "a dog"}',
            r"line 3: field 'edit': String should have at least 1",
        ),
        (
            '{"input": "A cat.", "edit": "make it a dog", "output": "a CAT!"}',
            r"line 3: field 'output': .*equals",
        ),
        ('{"input": "a cat", "edit": "e", "output": "a dog", "id": 7}', r"line 3: field 'id': Extra inputs"),
        (
            '{"input": 5, "edit": "e", "output": "a dog"}',
            r"line 3: field 'input': Input should be a valid string",
        ),
        (
            '{"input": "a", "caption": "b", "edit": "e", "output": "c"}',
            r"line 3: field 'caption': .*not both",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, line: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", json.dumps(GOOD), "", line, json.dumps(GOOD))
    with pytest.raises(SeedAnnotationError, match=r"bad\.jsonl " + expected) as info:
        load_triplets(path)
    assert isinstance(info.value, ValueError)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SeedAnnotationError, match="empty.jsonl: contains no triplets"):
        load_triplets(write_jsonl(tmp_path / "empty.jsonl", "", "  "))


def test_blank_lines_skipped_and_strings_stripped(tmp_path: Path) -> None:
    padded = {key: f"  {value}\t" for key, value in GOOD.items()}
    other = {**GOOD, "edit": "make it autumn", "output": "A red barn in an autumn field"}
    path = write_jsonl(tmp_path / "ok.jsonl", "", json.dumps(padded), "   ", json.dumps(other), "")
    assert load_triplets(path) == [Triplet(**GOOD), Triplet(**other)]


@pytest.mark.parametrize(
    "record, expected",
    [
        ({**GOOD, "edit": "make it\nsummer"}, r"line 2: field 'edit': contains a line break"),
        (
            {**GOOD, "output": "A red barn\n##\nin a green field"},
            r"line 2: field 'output': contains a line break",
        ),
        ({**GOOD, "input": "A red barn\nEND"}, r"line 2: field 'input': contains a line break"),
        ({**GOOD, "edit": "make it %% summer"}, r"line 2: field 'edit': contains '%%'"),
        ({**GOOD, "edit": "Make it summer."}, r"line 2: the same input and edit as line 1"),
    ],
)
def test_delimiters_and_repeats_are_rejected_with_file_and_line(
    tmp_path: Path, record: dict, expected: str
) -> None:
    path = write_jsonl(tmp_path / "seeds.jsonl", json.dumps(GOOD), json.dumps(record))
    with pytest.raises(SeedAnnotationError, match=r"seeds\.jsonl " + expected):
        load_triplets(path)


def test_invalid_utf8_names_the_line_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(first + '{"input": "caf\xe9 au lait", "edit": "e", "output": "tea"}\n'.encode("latin-1"))
    with pytest.raises(
        SeedAnnotationError,
        match=rf"line 2: not UTF-8 text \(.* at byte 14 of the line, byte {len(first) + 14} ",
    ):
        load_triplets(path)


def test_caption_alias_is_accepted_as_input(tmp_path: Path) -> None:
    record = {"caption": GOOD["input"], "edit": GOOD["edit"], "output": GOOD["output"]}
    [triplet] = load_triplets(write_jsonl(tmp_path / "alias.jsonl", json.dumps(record)))
    assert triplet == Triplet(**GOOD)
    assert triplet.model_dump() == GOOD


def test_lenient_mode_ignores_unknown_keys_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "release.jsonl", json.dumps({**GOOD, "url": "http://x", "id": 1}))
    assert load_triplets(path, strict=False) == [Triplet(**GOOD)]
    bad = write_jsonl(
        tmp_path / "release_bad.jsonl", json.dumps({"input": "a", "edit": "", "output": "b", "x": 1})
    )
    with pytest.raises(SeedAnnotationError, match="line 1: field 'edit'"):
        load_triplets(bad, strict=False)


def test_reads_fsspec_urls_and_names_source() -> None:
    url = "memory://seed_annotations_test/triplets.jsonl"
    with fsspec.open(url, "wt") as handle:
        handle.write(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "edit": ""}) + "\n")
    with pytest.raises(SeedAnnotationError, match=re.escape(f"{url} line 2: field 'edit'")):
        load_triplets(url)
    with pytest.raises(SeedAnnotationError, match=r"^http://example\.org/p\.jsonl line 2"):
        load_triplets(url, source="http://example.org/p.jsonl")


def test_split_is_deterministic_disjoint_and_complete(shipped: list[Triplet]) -> None:
    train, val = split_train_val(shipped, val_fraction=0.1, seed=3)
    assert (train, val) == split_train_val(shipped, val_fraction=0.1, seed=3)
    assert len(val) == round(len(shipped) * 0.1)
    assert len(train) + len(val) == len(shipped)
    assert {t.input for t in train}.isdisjoint({t.input for t in val})
    assert sorted(train + val, key=shipped.index) == shipped
    assert val != split_train_val(shipped, val_fraction=0.1, seed=4)[1]
    assert split_train_val(shipped, val_fraction=0.0, seed=3) == (shipped, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val([Triplet(**GOOD)], val_fraction=fraction, seed=0)
