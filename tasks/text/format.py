r"""The paper's completion format and the validation of generated triplets.

A completion is ``"{edit}\n%%\n{output}\nEND"``; :func:`parse_completion` never raises: it returns the
parsed triplet or the rejection reason, so every row of ``triplets.parquet`` is ``ok`` or carries exactly
one reason. Reasons in :data:`RETRIED` are asked again (``text.max_attempts``); each row records its
``attempt`` and ``earlier_rejections``, which :func:`attempt_counts` counts.

Every rejection reason: docs/text.md ("In the code").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
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

# what another try can fix: the completion itself (not a refused request, a flagged caption or a duplicate)
RETRIED = frozenset(
    {
        REJECT_UNPARSEABLE,
        REJECT_EMPTY,
        REJECT_SAME,
        REJECT_LONG_EDIT,
        REJECT_EDIT_HAS_CAPTION,
        REJECT_MODERATION,
        REJECT_TRUNCATED,
        REJECT_CONTENT_FILTER,
    }
)

TRIPLET_COLUMNS = [
    "caption_id",
    "input",
    "edit",
    "output",
    "model",
    "raw_completion",
    "status",
    "reject_reason",
    "attempt",
    "earlier_rejections",
]


def canonical_triplets(df: pd.DataFrame) -> pd.DataFrame:
    """``df[TRIPLET_COLUMNS]`` with one dtype per column whatever chunks it was concatenated from (a chunk
    whose column is all null reads back untyped): text columns as Python strings or None, ``attempt``
    int64 — so the same rows always give the same parquet bytes, resumed or not."""
    out = df[TRIPLET_COLUMNS].copy()
    for col in TRIPLET_COLUMNS:
        if col == "attempt":
            out[col] = out[col].astype("int64")
        else:
            out[col] = pd.Series(
                [None if pd.isna(v) else str(v) for v in out[col]], index=out.index, dtype=object
            )
    return out


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


def triplet_row(
    caption_id: str,
    input_caption: str,
    raw: str | None,
    model: str,
    max_edit_words: int = 40,
    reject_reason: str | None = None,
    *,
    attempt: int = 1,
    earlier: Sequence[str] = (),
) -> dict:
    """One `triplets.parquet` row from a raw completion: parsed, validated, kept or rejected.

    A `reject_reason` given by the caller (moderation of the caption, an API refusal) wins. `attempt`
    is the try this completion answered; `earlier` the rejection reasons of the tries before it.
    """
    parsed = parse_completion(raw) if reject_reason is None else Parsed(None, None, reject_reason)
    reason = parsed.reject_reason or validate_triplet(
        input_caption, parsed.edit, parsed.output, max_edit_words
    )
    return {
        "caption_id": caption_id,
        "input": input_caption,
        "edit": parsed.edit,
        "output": parsed.output,
        "model": model,
        "raw_completion": raw,
        "status": "rejected" if reason else "ok",
        "reject_reason": reason,
        "attempt": attempt,
        "earlier_rejections": ";".join(earlier),
    }


def attempt_key(key: str, attempt: int) -> str:
    """The key a try is seeded from: the caption (or batch) key itself for the first try, so one try per
    caption samples exactly as before retries existed; `key#attempt-N` for the N-th."""
    return key if attempt == 1 else f"{key}#attempt-{attempt}"


def wants_retry(row: dict, max_attempts: int) -> bool:
    """Whether `row` is rejected for a reason another try can fix and tries are left."""
    return row["status"] == "rejected" and row["reject_reason"] in RETRIED and row["attempt"] < max_attempts


def rejections_so_far(row: dict) -> list[str]:
    """The rejection reasons of every try up to and including `row`'s (the next try's `earlier`)."""
    earlier = row["earlier_rejections"].split(";") if row["earlier_rejections"] else []
    return earlier + ([row["reject_reason"]] if row["reject_reason"] else [])


def attempt_counts(df: pd.DataFrame) -> dict[str, int]:
    """Per-attempt counts of a triplets table: `attempt_<k>_<reason>` for every rejected try (the last
    try's reason is its row's, `duplicate_input_edit` included), `accepted_attempt_<k>` for the rows
    kept from try k, and `generation_attempts`, the tries answered or refused in all."""
    counts: Counter[str] = Counter()
    for attempt, earlier, status, reason in zip(
        df["attempt"], df["earlier_rejections"], df["status"], df["reject_reason"]
    ):
        attempt = int(attempt)
        for k, why in enumerate(earlier.split(";") if earlier else [], start=1):
            counts[f"attempt_{k}_{why}"] += 1
        if attempt == 0:  # no request was sent (the caption was flagged)
            continue
        counts["generation_attempts"] += attempt
        counts[f"accepted_attempt_{attempt}" if status == "ok" else f"attempt_{attempt}_{reason}"] += 1
    return dict(sorted(counts.items()))


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
