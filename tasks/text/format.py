"""The paper's completion format and the validation of generated triplets.

A completion is `"{edit}\\n%%\\n{output}\\nEND"` (generation stops at `"\\nEND"`, so the stop sequence
is usually absent from the returned text). `parse_completion` never raises: it returns the parsed
triplet or the rejection reason, so every generated row is either kept or counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prompts.templates import EDIT_OUTPUT_SEPARATOR, STOP_SEQUENCE

REJECT_UNPARSEABLE = "unparseable"
REJECT_EMPTY = "empty_part"
REJECT_SAME = "output_equals_input"
REJECT_LONG_EDIT = "instruction_too_long"
REJECT_EDIT_HAS_CAPTION = "instruction_contains_caption"
REJECT_DUPLICATE = "duplicate_input_edit"

_TRAILING = re.compile(r"[.!?\s]+$")


@dataclass(frozen=True)
class Parsed:
    edit: str | None
    output: str | None
    reject_reason: str | None

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


def comparable(caption: str) -> str:
    """Case, surrounding whitespace and trailing `.!?` ignored (the reference's equality rule)."""
    return _TRAILING.sub("", caption.strip()).casefold()


def parse_completion(raw: str | None) -> Parsed:
    """Split a completion into (edit, output); reject it with a reason when it is malformed."""
    if raw is None:
        return Parsed(None, None, REJECT_UNPARSEABLE)
    text = raw.replace("\r\n", "\n")
    end = text.find(STOP_SEQUENCE)
    if end >= 0:
        text = text[:end]
    if not text.strip():
        return Parsed(None, None, REJECT_EMPTY)
    sep = EDIT_OUTPUT_SEPARATOR.strip("\n")
    parts = text.split(f"\n{sep}\n")
    if len(parts) != 2:
        return Parsed(None, None, REJECT_UNPARSEABLE)
    edit, output = (p.strip() for p in parts)
    if "\n" in edit or "\n" in output or sep in output:
        return Parsed(None, None, REJECT_UNPARSEABLE)
    if not edit or not output:
        return Parsed(None, None, REJECT_EMPTY)
    return Parsed(edit, output, None)


def validate_triplet(input_caption: str, edit: str, output: str, max_edit_words: int = 40) -> str | None:
    """Rejection reason for a parsed triplet, or None when it is acceptable."""
    if comparable(output) == comparable(input_caption):
        return REJECT_SAME
    if len(edit.split()) > max_edit_words:
        return REJECT_LONG_EDIT
    if len(input_caption) >= 20 and comparable(input_caption) in comparable(edit):
        return REJECT_EDIT_HAS_CAPTION
    return None
