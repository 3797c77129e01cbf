"""Read LAION-Aesthetics V2 style parquet, filter, normalise, deduplicate and sample captions.

Input columns: `URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark, AESTHETIC_SCORE, hash`
(`URL` and `TEXT` are required; the rest are used when present). Files are streamed batch by batch
with pyarrow through fsspec, so local paths, globs and `s3://…` URLs work alike.

Every row is either accepted or counted under a rejection reason; a file that cannot be read, or
lacks a required column, is an error naming the file (and the column). Cleaning is counted too:
control characters removed from a caption (`cleaned_control_chars`), numbers read from strings
(`coerced_<column>`). Two captions are duplicates when their :func:`dedup_key` agrees (case,
whitespace and trailing punctuation ignored).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common import storage
from tasks.common.config import CaptionsConfig
from tasks.common.contract import Stats

REQUIRED_COLUMNS = ("URL", "TEXT")
OPTIONAL_COLUMNS = ("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash")
OUTPUT_COLUMNS = ["caption_id", "text", "url", "aesthetic_score", "width", "height", "source_row_hash",
                  "source_file", "source_row"]
_WS = re.compile(r"\s+")
# C0 and C1 control characters except the whitespace ones (tab, newlines: collapsed to a space)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?…]+$")


class CaptionSourceError(ValueError):
    """A caption source file is unreadable or lacks a required column; the message names file and column."""


def normalise_caption(text: str) -> str:
    """Unicode NFC, whitespace collapsed, stripped (case is kept: it is part of the caption)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def caption_key(text: str) -> str:
    """The dedup key: the normalised caption, case-folded."""
    return normalise_caption(text).casefold()


def dedup_key(text: str) -> str:
    """The form two captions are compared in: the caption key without trailing punctuation
    ("A cat." and "a cat" are one caption)."""
    return _TRAILING_PUNCT.sub("", caption_key(text))


def caption_id(text: str) -> str:
    """Stable item id: first 16 hex of sha1 of the normalised, case-folded caption."""
    return hashlib.sha1(caption_key(text).encode("utf-8")).hexdigest()[:16]


def resolve_sources(source: str | list[str]) -> list[str]:
    """Expand `builtin:demo`, `builtin:world` (the synthetic world's captions, :mod:`tasks.world.data`),
    globs and lists into a sorted list of parquet URLs."""
    items = [source] if isinstance(source, str) else list(source)
    urls: list[str] = []
    for item in items:
        if item == "builtin:demo":
            urls.append(str(resources.files("tasks.captions").joinpath("demo", "laion_aesthetics_demo.parquet")))
        elif item == "builtin:world":
            urls.append(str(resources.files("tasks.world").joinpath("data", "world_captions.parquet")))
        elif any(ch in item for ch in "*?["):
            fs, path = storage.filesystem(item)
            protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            hits = sorted(fs.glob(path))
            urls += hits if protocol in ("file", "local") else [f"{protocol}://{h}" for h in hits]
        else:
            urls.append(item)
    if not urls:
        raise CaptionSourceError(f"captions.source {source!r} matched no file")
    return urls


def _float(value, stats: Stats | None = None, column: str = "") -> float:
    if isinstance(value, str) and stats is not None:
        stats.add(f"coerced_{column}")  # a number given as text: read, and counted
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _decode_text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # raises UnicodeDecodeError: counted by the caller
    return value


@dataclass
class _Seen:
    keys: set[str]
    urls: set[str]


def _accept_row(row: dict, cfg: CaptionsConfig, seen: _Seen, stats: Stats) -> dict | None:
    try:
        text = _decode_text(row.get("TEXT"))
        url = _decode_text(row.get("URL"))
    except UnicodeDecodeError:
        stats.reject("invalid_utf8")
        return None
    if text is None:
        stats.reject("null_caption")
        return None
    if url is None or not str(url).strip():
        stats.reject("null_url")
        return None
    text, control = _CONTROL.subn("", str(text))
    if control:
        stats.add("cleaned_control_chars")
    text = normalise_caption(text)
    if not text:
        stats.reject("empty_caption")
        return None
    if len(text) > cfg.max_caption_chars:
        stats.reject("caption_too_long")
        return None
    score = _float(row.get("AESTHETIC_SCORE"), stats, "AESTHETIC_SCORE")
    if "AESTHETIC_SCORE" in row and math.isnan(score):
        stats.reject("nan_aesthetic_score")
        return None
    if not math.isnan(score) and score < cfg.min_aesthetic_score:
        stats.reject("low_aesthetic_score")
        return None
    if _float(row.get("punsafe"), stats, "punsafe") > cfg.max_punsafe:
        stats.reject("unsafe")
        return None
    if _float(row.get("pwatermark"), stats, "pwatermark") > cfg.max_pwatermark:
        stats.reject("watermark")
        return None
    width, height = _float(row.get("WIDTH"), stats, "WIDTH"), _float(row.get("HEIGHT"), stats, "HEIGHT")
    if cfg.min_side and (math.isnan(width) or math.isnan(height) or min(width, height) < cfg.min_side):
        stats.reject("too_small")
        return None
    key, url = caption_key(text), str(url).strip()
    if dedup_key(text) in seen.keys:
        stats.reject("duplicate_caption")
        return None
    if url in seen.urls:
        stats.reject("duplicate_url")
        return None
    seen.keys.add(dedup_key(text))
    seen.urls.add(url)
    return {
        "caption_id": hashlib.sha1(key.encode("utf-8")).hexdigest()[:16],
        "text": text,
        "url": url,
        "aesthetic_score": score,
        "width": None if math.isnan(width) else int(width),
        "height": None if math.isnan(height) else int(height),
        "source_row_hash": None if row.get("hash") is None else str(row.get("hash")),
    }


def read_captions(sources: list[str], cfg: CaptionsConfig, stats: Stats, batch_size: int = 65536) -> pd.DataFrame:
    """Stream every source file; return accepted, deduplicated rows (in file then row order)."""
    seen = _Seen(set(), set())
    rows: list[dict] = []
    for url in sources:
        fs, path = storage.filesystem(url)
        try:
            handle = fs.open(path, "rb")
            pf = pq.ParquetFile(handle)
        except FileNotFoundError as err:
            raise CaptionSourceError(f"{url}: file not found") from err
        except (pa.ArrowInvalid, OSError) as err:
            raise CaptionSourceError(f"{url}: not a readable parquet file ({err})") from err
        names = set(pf.schema_arrow.names)
        for col in REQUIRED_COLUMNS:
            if col not in names:
                raise CaptionSourceError(f"{url}: missing required column {col!r} (has {sorted(names)})")
        columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in names]
        row_no = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                for row in batch.to_pylist():
                    stats.add("rows_read")
                    accepted = _accept_row(row, cfg, seen, stats)
                    if accepted:
                        accepted.update(source_file=url, source_row=row_no)
                        rows.append(accepted)
                    row_no += 1
        except (pa.ArrowInvalid, OSError) as err:
            raise CaptionSourceError(f"{url}: corrupt parquet data after row {row_no} ({err})") from err
        finally:
            handle.close()
        stats.add("files_read")
    stats.add("rows_accepted", len(rows))
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
