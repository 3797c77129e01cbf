"""Schema of the hand-written seed triplets and a JSONL loader with precise error messages.

A seed triplet is the paper's fine-tuning unit (arXiv 2211.09800, Sec. 3.1.1): an input caption
sampled from LAION-Aesthetics, an edit instruction, and the output caption that the edit yields.
The file format is JSON Lines with exactly the keys ``input``, ``edit`` and ``output`` -- the field
names of the paper's released ``human-written-prompts.jsonl``. The reference image script read
``prompt["caption"]`` instead of ``input``; that alias is accepted too.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import fsspec
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

__all__ = [
    "SeedAnnotationError",
    "Triplet",
    "comparable_caption",
    "default_triplets_path",
    "load_triplets",
    "split_train_val",
]

TRIPLETS_FILENAME = "triplets.jsonl"
# a line longer than this is refused (text.seed_max_line_bytes): a seed triplet is two captions and an edit
DEFAULT_MAX_LINE_BYTES = 16384
JSONL_HINT = ("seed annotations are JSON Lines: one {\"input\": ..., \"edit\": ..., \"output\": ...} object per line, "
              "not one JSON array or an object written over several lines")
_KNOWN_KEYS = frozenset({"input", "caption", "edit", "output"})
# the fine-tune format's delimiters ("{input}\n##\n", "{edit}\n%%\n{output}\nEND"): a field holding one
# trains the model on an example the completion parser rejects
_EDIT_OUTPUT_SEPARATOR = "%%"


class SeedAnnotationError(ValueError):
    """A seed-annotation file is malformed; the message names the file, line and field."""


def comparable_caption(text: str) -> str:
    """The form in which two captions are compared: case-folded, trailing ``.!?`` and spaces removed."""
    return text.strip().rstrip(".!?").strip().casefold()


class Triplet(BaseModel):
    """One (input caption, edit instruction, output caption) example."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    input: str = Field(min_length=1, validation_alias=AliasChoices("input", "caption"))
    edit: str = Field(min_length=1)
    output: str = Field(min_length=1)

    @field_validator("input", "edit", "output")
    @classmethod
    def _no_format_delimiters(cls, value: str, info: ValidationInfo) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("contains a line break, which the fine-tune format uses as a delimiter (\\n##\\n, "
                             "\\n%%\\n, \\nEND); write it on one line")
        if info.field_name != "input" and _EDIT_OUTPUT_SEPARATOR in value:
            raise ValueError("contains '%%', the fine-tune format's separator of edit and output")
        return value

    @field_validator("output")
    @classmethod
    def _output_differs_from_input(cls, output: str, info: ValidationInfo) -> str:
        source = info.data.get("input")
        if source is not None and comparable_caption(output) == comparable_caption(source):
            raise ValueError("output caption equals the input caption (case and trailing .!? ignored)")
        return output


def default_triplets_path() -> Path:
    """Path of the ``triplets.jsonl`` shipped inside this package."""
    resource = files(__package__ or "seed_annotations") / TRIPLETS_FILENAME
    if not isinstance(resource, Path):  # e.g. a zipped install: there is no plain file to hand out
        raise FileNotFoundError(f"{TRIPLETS_FILENAME} is not available as a file: {resource!r}")
    return resource


def _describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(loc) for loc in item["loc"]) or "<object>"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"field '{field}': {message}")
    return "; ".join(parts)


def _parse_line(raw: str, where: str, strict: bool, hint: bool = False) -> Triplet:
    more = f" ({JSONL_HINT})" if hint else ""
    try:
        record: Any = json.loads(raw.strip())
    except json.JSONDecodeError as exc:
        raise SeedAnnotationError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno}){more}") from None
    except (ValueError, RecursionError) as exc:  # a number too long to read, nesting too deep
        raise SeedAnnotationError(f"{where}: invalid JSON: {str(exc)[:160]}{more}") from None
    if not isinstance(record, dict):
        raise SeedAnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}{more}")
    if "input" in record and "caption" in record:
        raise SeedAnnotationError(
            f"{where}: field 'caption': give either 'input' or its alias 'caption', not both"
        )
    if not strict:
        record = {key: value for key, value in record.items() if key in _KNOWN_KEYS}
    try:
        return Triplet.model_validate(record)
    except ValidationError as exc:
        raise SeedAnnotationError(f"{where}: {_describe_validation_error(exc)}") from None


def _physical_lines(handle, max_bytes: int):
    """(bytes of each line, or None when longer than ``max_bytes``; its length in bytes), read a bounded
    piece at a time so that one enormous line never sits in memory."""
    while True:
        piece = handle.readline(max_bytes + 2)  # room for the line's own \r\n
        if not piece:
            return
        if piece.endswith(b"\n") or len(piece) < max_bytes + 2:
            yield piece, len(piece)
            continue
        length = len(piece)
        while not piece.endswith(b"\n"):
            piece = handle.readline(1 << 16)
            if not piece:
                break
            length += len(piece)
        yield None, length - (2 if piece.endswith(b"\r\n") else 1 if piece.endswith(b"\n") else 0)


def load_triplets(
    path: str | os.PathLike[str], *, strict: bool = True, source: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Triplet]:
    """Read and validate a JSONL file of triplets (a local path or any fsspec URL).

    Blank lines are skipped. Any malformed line raises :class:`SeedAnnotationError` whose message
    reads ``"<file> line <n>: field '<name>': <problem>"``: invalid JSON or UTF-8, a missing or empty
    field, a field with a line break (or ``%%`` in edit / output: the fine-tune format's delimiters),
    an output equal to its input, a repeat of an earlier line's input and edit, a line longer than
    ``max_line_bytes`` (all such lines counted in the message; the file is read a bounded piece at a
    time). A file that starts as a JSON array gets a hint that JSON Lines is expected. With
    ``strict=False`` keys other than ``input``/``caption``/``edit``/``output`` are ignored instead of
    rejected (for third-party files such as the paper's release). ``source`` overrides the file name
    used in messages.
    """
    name = source if source is not None else os.fspath(path)
    triplets: list[Triplet] = []
    first_seen: dict[tuple[str, str], int] = {}
    too_long: list[tuple[int, int]] = []
    offset, number, first_content = 0, 0, None
    with fsspec.open(os.fspath(path), "rb") as handle:
        for piece, length in _physical_lines(handle, max_line_bytes):
            if piece is None:
                number += 1
                too_long.append((number, length))
                offset += length
                continue
            if offset == 0 and piece.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                piece, offset = piece[3:], 3
            for raw_bytes in piece.splitlines(keepends=True):
                number += 1
                try:
                    raw = raw_bytes.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise SeedAnnotationError(f"{name} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start} "
                                              f"of the line, byte {offset + exc.start} of the file)") from None
                offset += len(raw_bytes)
                if not raw.strip() or too_long:
                    continue
                if first_content is None:
                    first_content = number
                    hint = raw.strip() in ("[", "{") or raw.lstrip().startswith("[")
                triplet = _parse_line(raw, f"{name} line {number}", strict, hint and number == first_content)
                key = (comparable_caption(triplet.input), comparable_caption(triplet.edit))
                if key in first_seen:
                    raise SeedAnnotationError(f"{name} line {number}: the same input and edit as line {first_seen[key]} "
                                              "(case and trailing .!? ignored); keep one of them")
                first_seen[key] = number
                triplets.append(triplet)
    if too_long:
        lines = ", ".join(f"{n} ({size:,} bytes)" for n, size in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        raise SeedAnnotationError(f"{name}: {len(too_long)} line(s) longer than {max_line_bytes:,} bytes, refused: "
                                  f"line{'s' if len(too_long) > 1 else ''} {lines}; a seed triplet is two captions and an edit — fix the file, or raise the "
                                  "limit with --set text.seed_max_line_bytes=N")
    if not triplets:
        raise SeedAnnotationError(f"{name}: contains no triplets")
    return triplets


def split_train_val(
    triplets: Sequence[Triplet], val_fraction: float, seed: int
) -> tuple[list[Triplet], list[Triplet]]:
    """Split deterministically: the same (triplets, fraction, seed) always give the same split.

    ``round(len * val_fraction)`` triplets, chosen by a seeded shuffle, go to validation; both
    parts keep the original order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    indices = list(range(len(triplets)))
    random.Random(seed).shuffle(indices)
    val_indices = set(indices[: round(len(triplets) * val_fraction)])
    train = [t for i, t in enumerate(triplets) if i not in val_indices]
    val = [t for i, t in enumerate(triplets) if i in val_indices]
    return train, val
