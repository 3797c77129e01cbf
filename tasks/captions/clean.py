"""One record batch of LAION rows: the filters, the normalisation and the counts, vectorised.

A caption that is printable ASCII with single inner spaces is already normal (its key is
``ascii_lower``, its dedup key an RE2 strip of trailing punctuation); any other caption that a number
(score, ``punsafe``, ``pwatermark``, size) rejects anyway is only screened with RE2 so that the
rejection reasons are counted exactly as the row-by-row reader counted them; the rest — captions
that may be kept and are not plain ASCII — go through the Python functions below (NFC, whitespace,
``casefold``), the definition of what a caption and its keys are. Numbers given as text are read as
Python's ``float`` reads them, and counted.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.common.config import CaptionsConfig
from tasks.common.contract import Stats

# C0 and C1 control characters except the whitespace ones (tab, newlines: collapsed to a space)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?…]+$")
# the same rules in RE2 (pyarrow): Python's `\s` is these 29 characters (str.isspace)
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"
_TRAILING_CHARS = PY_WHITESPACE + ".,;:!?…"
_NOT_PLAIN = r"[^\x20-\x7e]|  |^ | $|^$"  # a caption that normalisation could change (or empty)
_NOT_SIMPLE_RE2 = r"[\x00-\x1f\x7f-\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
_CONTROL_RE2 = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x{9f}]"
_VISIBLE_RE2 = r"[^\x00-\x20\x7f-\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
_TRAILING_PLAIN_RE2 = r"[ .,;:!?]+$"  # _TRAILING_PUNCT on printable ASCII with single spaces
NFC_MAX_GROWTH = 3  # Unicode: NFC makes a string at most 3 times longer (UAX #15)
BATCH_ROWS = 131072



def normalise_caption(text: str) -> str:
    """Unicode NFC, whitespace collapsed, stripped (case is kept: it is part of the caption)."""
    return " ".join(unicodedata.normalize("NFC", text).split())  # str.split: runs of `\s`, ends dropped


def caption_key(text: str) -> str:
    """The dedup key: the normalised caption, case-folded."""
    return normalise_caption(text).casefold()


def dedup_key(text: str) -> str:
    """The form two captions are compared in: the caption key without trailing punctuation
    ("A cat." and "a cat" are one caption)."""
    return _strip_trailing(caption_key(text))


def _strip_trailing(key: str) -> str:
    # `[\s.,;:!?…]+$` as rstrip: the same where no newline is left (a normalised caption has none)
    return key.rstrip(_TRAILING_CHARS) if "\n" not in key else _TRAILING_PUNCT.sub("", key)


def caption_id(text: str) -> str:
    """Stable item id: first 16 hex of sha1 of the normalised, case-folded caption."""
    return hashlib.sha1(caption_key(text).encode("utf-8")).hexdigest()[:16]


def _float(value) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _numbers(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A column as float64 (missing or unreadable: NaN) and which rows held a string."""
    n = batch.num_rows
    if name not in batch.schema.names:
        return np.full(n, math.nan), np.zeros(n, bool)
    col = batch.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t) \
            or pa.types.is_null(t):
        return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False), np.zeros(n, bool)
    values = col.to_pylist()  # text or other types: read as Python's float() reads them (rare)
    return np.array([_float(v) for v in values], np.float64), np.array([isinstance(v, str) for v in values], bool)


def _text(batch: pa.RecordBatch, name: str) -> tuple[pa.Array, np.ndarray]:
    """A text column as large_string, and which rows were bytes that are not UTF-8 (those become null)."""
    col = batch.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    n = len(col)
    if pa.types.is_null(col.type):
        return pa.nulls(n, pa.large_string()), np.zeros(n, bool)
    try:
        return col.cast(pa.large_string()), np.zeros(n, bool)
    except pa.ArrowInvalid:  # binary with invalid UTF-8: decode row by row
        out, bad = [], np.zeros(n, bool)
        for i, v in enumerate(col.to_pylist()):
            try:
                out.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)
                bad[i] = True
        return pa.array(out, pa.large_string()), bad


def _bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A large_string array's bytes: its data, lengths, and first and last byte of every string (for an
    empty or null string those two are meaningless)."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, np.uint8)[:offsets[-1]] if data is not None and len(arr) else np.zeros(1, np.uint8)
    if not len(data):
        data = np.zeros(1, np.uint8)
    top = len(data) - 1
    first, last = data[np.minimum(offsets[:-1], top)], data[np.clip(offsets[1:] - 1, 0, top)]
    return data, np.diff(offsets), first, last


def _double_spaces(arr: pa.Array) -> np.ndarray:
    """Rows with two spaces in a row (or a space ending the row before and one starting it)."""
    data = _bytes(arr)[0]
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    space = data == 32
    pos = np.flatnonzero(space[1:] & space[:-1]) + 1  # the second space (data starts at the buffer's start)
    pos = pos[(pos >= offsets[0]) & (pos < offsets[-1])]
    out = np.zeros(len(arr), bool)
    out[np.searchsorted(offsets, pos, "right") - 1] = True
    return out


_ASCII_WS = np.zeros(256, bool)
_ASCII_WS[[ord(c) for c in PY_WHITESPACE if ord(c) < 128]] = True
_ASCII_WS[128:] = True  # a non-ASCII first or last character may be Unicode whitespace: checked in Python


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), bool).copy()


def _replace(arr: pa.Array, rows: np.ndarray, values: list) -> pa.Array:
    """``arr`` with the rows ``rows`` (sorted) set to ``values``."""
    if not len(rows):
        return arr
    mask = np.zeros(len(arr), bool)
    mask[rows] = True
    return pc.replace_with_mask(arr, pa.array(mask), pa.array(values, arr.type))


def _row_hash(batch: pa.RecordBatch) -> pa.Array:
    n = batch.num_rows
    if "hash" not in batch.schema.names:
        return pa.nulls(n, pa.large_string())
    col = batch.column("hash")
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.large_string())
    return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.large_string())


def filter_batch(batch: pa.RecordBatch, cfg: CaptionsConfig, stats: Stats):
    """Filters and normalisation of one batch; returns the surviving rows' fields (before dedup)."""
    n = batch.num_rows
    if n:
        stats.add("rows_read", n)
    names = batch.schema.names
    text, text_bad = _text(batch, "TEXT")
    url, url_bad = _text(batch, "URL")
    alive = np.ones(n, bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        nonlocal alive
        hit = alive & mask
        if hit.any():
            stats.reject(reason, int(hit.sum()))
            alive &= ~hit

    def count(mask: np.ndarray, name: str) -> None:
        if (alive & mask).any():
            stats.add(name, int((alive & mask).sum()))

    drop(text_bad | url_bad, "invalid_utf8")
    drop(_mask(text.is_null()), "null_caption")
    # the URL stripped: only the rows starting or ending with whitespace (or non-ASCII) go through Python
    _, ulen, first, last = _bytes(url)
    odd_url = np.flatnonzero(alive & (_ASCII_WS[first] | _ASCII_WS[last]) & (ulen > 0))
    url_fixed = [s.strip() for s in url.take(pa.array(odd_url, pa.int64())).to_pylist()]
    ulen[odd_url] = [len(s) for s in url_fixed]
    drop(_mask(url.is_null()) | (ulen == 0), "null_url")

    # every number at once (rejections are still counted in the original order below)
    score, score_str = _numbers(batch, "AESTHETIC_SCORE")
    punsafe, punsafe_str = _numbers(batch, "punsafe")
    pwater, pwater_str = _numbers(batch, "pwatermark")
    width, width_str = _numbers(batch, "WIDTH")
    height, height_str = _numbers(batch, "HEIGHT")
    # an infinite size is no size (the row-by-row reader crashed on it)
    width, height = np.where(np.isinf(width), np.nan, width), np.where(np.isinf(height), np.nan, height)
    with np.errstate(invalid="ignore"):
        score_nan = np.isnan(score) if "AESTHETIC_SCORE" in names else np.zeros(n, bool)
        score_low = ~np.isnan(score) & (score < cfg.min_aesthetic_score)
        unsafe, watermark = punsafe > cfg.max_punsafe, pwater > cfg.max_pwatermark
        small = (np.isnan(width) | np.isnan(height) | (np.minimum(width, height) < cfg.min_side)) if cfg.min_side \
            else np.zeros(n, bool)
    numbers_ok = ~(score_nan | score_low | unsafe | watermark | small)

    # text. A clean caption (printable ASCII, no space at either end, none doubled) is normal already; any
    # other one is normalised exactly in Python when it may be kept, and only screened with RE2 when a
    # number rejects it anyway (double spaces are looked for only in the rows that may be kept)
    data, length, first, last = _bytes(text)
    clean = _mask(pc.ascii_is_printable(text)) & (length > 0) & (first != 32) & (last != 32)
    maybe = np.flatnonzero(alive & numbers_ok & clean)
    clean[maybe] = ~_double_spaces(text.take(pa.array(maybe, pa.int64())))
    doomed = alive & ~numbers_ok
    clean[doomed] &= length[doomed] <= cfg.max_caption_chars  # shorter once normalised: only a long one may fail
    special = np.flatnonzero(alive & ~clean)
    control, empty = np.zeros(n, bool), np.zeros(n, bool)
    exact, fixed = special[:0], []
    if len(special):
        # a simple one (no control character, no whitespace but single inner spaces) only needs NFC
        sub = text.take(pa.array(special, pa.int64()))
        length[special] = pc.utf8_length(sub).to_numpy(zero_copy_only=False)
        _, size, head, tail = _bytes(sub)
        simple = ~_mask(pc.match_substring_regex(sub, _NOT_SIMPLE_RE2)) & (size > 0) & (head != 32) & (tail != 32)
        simple &= ~_double_spaces(sub)
        quick = doomed[special] & (NFC_MAX_GROWTH * length[special] <= cfg.max_caption_chars)
        screen = quick & ~simple  # rejected by a number anyway: only what is counted before it matters
        some = sub.filter(pa.array(screen))
        control[special[screen]] = _mask(pc.match_substring_regex(some, _CONTROL_RE2))
        empty[special[screen]] = ~_mask(pc.match_substring_regex(some, _VISIBLE_RE2))
        exact = special[~quick]
        for i, s, easy in zip(exact.tolist(), sub.filter(pa.array(~quick)).to_pylist(), simple[~quick].tolist()):
            if easy:
                s = unicodedata.normalize("NFC", s)
            else:
                s, k = _CONTROL.subn("", s)
                s = normalise_caption(s)
                control[i], empty[i] = k > 0, not s
            length[i] = len(s)
            fixed.append(s)
    count(control, "cleaned_control_chars")
    drop(empty, "empty_caption")
    drop(length > cfg.max_caption_chars, "caption_too_long")

    count(score_str, "coerced_AESTHETIC_SCORE")
    drop(score_nan, "nan_aesthetic_score")
    drop(score_low, "low_aesthetic_score")
    count(punsafe_str, "coerced_punsafe")
    drop(unsafe, "unsafe")
    count(pwater_str, "coerced_pwatermark")
    drop(watermark, "watermark")
    count(width_str, "coerced_WIDTH")
    count(height_str, "coerced_HEIGHT")
    drop(small, "too_small")

    rows = np.flatnonzero(alive)
    pick = pa.array(rows, pa.int64())
    at = np.full(n, -1, np.int64)
    at[rows] = np.arange(len(rows))
    text_k, url_k = text.take(pick), url.take(pick)
    if len(odd_url):
        keep = alive[odd_url]
        url_k = _replace(url_k, at[odd_url[keep]], [s for s, k in zip(url_fixed, keep) if k])
    key = pc.ascii_lower(text_k)
    dkey = pc.replace_substring_regex(key, _TRAILING_PLAIN_RE2, "")
    if len(exact):
        keep = alive[exact]
        if keep.any():  # the normalised captions, case-folded and stripped in Python too
            where, normal = at[exact[keep]], [s for s, k in zip(fixed, keep) if k]
            folded = [s.casefold() for s in normal]
            text_k = _replace(text_k, where, normal)
            key = _replace(key, where, folded)
            dkey = _replace(dkey, where, [_strip_trailing(s) for s in folded])
    return text_k, key, dkey, url_k, score[rows], width[rows], height[rows], _row_hash(batch).take(pick), rows


def dedup_keys(texts: pa.Array) -> pa.Array:
    """:func:`dedup_key` of many captions (no nulls)."""
    plain = ~_mask(pc.match_substring_regex(texts, _NOT_PLAIN))
    keys = pc.replace_substring_regex(pc.ascii_lower(texts), _TRAILING_PLAIN_RE2, "")
    odd = np.flatnonzero(~plain)
    return _replace(keys, odd, [dedup_key(s) for s in texts.take(pa.array(odd, pa.int64())).to_pylist()])


