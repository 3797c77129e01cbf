"""The paper's completion format and the validation of generated triplets.

A completion is `"{edit}\\n%%\\n{output}\\nEND"` (generation stops at `"\\nEND"`, so the stop sequence
is usually absent from the returned text). `parse_completion` never raises: it returns the parsed
triplet or the rejection reason, so every generated row is either kept or counted.

Rejection reasons (every row of `triplets.parquet` is `ok` or carries exactly one):
unparseable, empty_part, output_equals_input, instruction_too_long, instruction_contains_caption,
duplicate_input_edit (a later caption repeating an earlier (input, edit) pair, case and trailing
punctuation ignored), moderation_flag (the caption or the generated text was flagged by the
moderation endpoint), api_error (the API refused the request for good, e.g. a 400), truncated (the
answer stopped at the token limit, `finish_reason: length`) and content_filter (the server's filter
cut it, `finish_reason: content_filter`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from prompts.templates import EDIT_OUTPUT_SEPARATOR, STOP_SEQUENCE

REJECT_UNPARSEABLE = "unparseable"
REJECT_EMPTY = "empty_part"
REJECT_SAME = "output_equals_input"
REJECT_LONG_EDIT = "instruction_too_long"
REJECT_EDIT_HAS_CAPTION = "instruction_contains_caption"
REJECT_DUPLICATE = "duplicate_input_edit"
REJECT_MODERATION = "moderation_flag"
REJECT_API = "api_error"
REJECT_TRUNCATED = "truncated"
REJECT_CONTENT_FILTER = "content_filter"
# an answer's finish_reason -> its rejection (`stop`, or none given: parsed as usual)
FINISH_REJECTIONS = {"length": REJECT_TRUNCATED, "content_filter": REJECT_CONTENT_FILTER}

TRIPLET_COLUMNS = ["caption_id", "input", "edit", "output", "model", "raw_completion", "status", "reject_reason"]

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


def triplet_row(caption_id: str, input_caption: str, raw: str | None, model: str, max_edit_words: int = 40,
                reject_reason: str | None = None) -> dict:
    """One `triplets.parquet` row from a raw completion: parsed, validated, kept or rejected.

    A `reject_reason` given by the caller (moderation of the caption, an API refusal) wins.
    """
    parsed = parse_completion(raw) if reject_reason is None else Parsed(None, None, reject_reason)
    reason = parsed.reject_reason or validate_triplet(input_caption, parsed.edit, parsed.output, max_edit_words)
    return {"caption_id": caption_id, "input": input_caption, "edit": parsed.edit, "output": parsed.output,
            "model": model, "raw_completion": raw, "status": "rejected" if reason else "ok", "reject_reason": reason}


def mark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Reject every kept row whose (input, edit) pair — compared with `comparable` — was already kept
    by a row with a smaller caption_id. The result does not depend on the order rows arrived in."""
    df = df.sort_values("caption_id").reset_index(drop=True)
    ok = df["status"] == "ok"
    if not ok.any():
        return df
    keys = df.loc[ok, "input"].map(comparable) + "\0" + df.loc[ok, "edit"].map(comparable)
    dup = keys.duplicated(keep="first")
    idx = dup[dup].index
    df.loc[idx, "status"] = "rejected"
    df.loc[idx, "reject_reason"] = REJECT_DUPLICATE
    return df
