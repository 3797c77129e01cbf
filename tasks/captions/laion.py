"""Read LAION-Aesthetics V2 style parquet, filter, normalise and deduplicate captions, batch by batch.

Files are streamed record batch by record batch with pyarrow through fsspec, filtered with pyarrow compute
and NumPy (:mod:`tasks.captions.clean`) and deduplicated against every row kept before
(:mod:`tasks.captions.dedup`). Every row is kept or counted under a rejection reason; an unreadable file or a
missing or non-text ``URL``/``TEXT`` column is an error naming the file and the column.

The columns, the cleaning counts and the dedup rule: docs/captions.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from importlib import resources

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.captions.clean import (  # noqa: F401  (what a caption is, also read from here)
    BATCH_ROWS,
    PY_WHITESPACE,
    caption_id,
    caption_key,
    dedup_key,
    dedup_keys,
    filter_batch,
    normalise_caption,
)
from tasks.captions.dedup import DedupState, digests, greedy, halves, hex16, key_digests, sha1_digests
from tasks.common import storage
from tasks.common.config import CaptionsConfig
from tasks.common.contract import Stats
from tasks.common.errors import PermanentError

REQUIRED_COLUMNS = ("URL", "TEXT")
OPTIONAL_COLUMNS = ("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash")
READ_COLUMNS = ("URL", "TEXT", "WIDTH", "HEIGHT", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash")  # used
OUTPUT_COLUMNS = [
    "caption_id",
    "text",
    "url",
    "aesthetic_score",
    "width",
    "height",
    "source_row_hash",
    "source_file",
    "source_row",
]


class CaptionSourceError(PermanentError, ValueError):
    """A caption source file is unreadable or lacks a required column; the message names file and column."""


def ascii_strings(chars: np.ndarray) -> pa.Array:
    """An (n, w) uint8 array of ASCII characters as a large_string array."""
    n, width = chars.shape
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(chars.tobytes())])
    return fixed.cast(pa.large_binary()).cast(pa.large_string())


def resolve_sources(source: str | list[str]) -> list[str]:
    """Expand `builtin:demo`, `builtin:world` (the synthetic world's captions, :mod:`tasks.world.data`),
    globs and lists into a sorted list of parquet URLs."""
    items = [source] if isinstance(source, str) else list(source)
    urls: list[str] = []
    for item in items:
        if item == "builtin:demo":
            urls.append(
                str(resources.files("tasks.captions").joinpath("demo", "laion_aesthetics_demo.parquet"))
            )
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


@dataclass
class Kept:
    """Rows that passed the filters and the dedup, in file then row order (``file``: the index of the
    source file in the list :func:`scan` read; ``ids``/``hex``: the caption ids as uint64 and as (n, 16)
    hex characters; ``key``: the caption key, dropped when not needed)."""

    text: pa.Array
    key: pa.Array | None
    url: pa.Array
    score: np.ndarray
    width: np.ndarray
    height: np.ndarray
    row_hash: pa.Array
    file: np.ndarray
    rows: np.ndarray
    key_hi: np.ndarray
    key_lo: np.ndarray
    url_hi: np.ndarray
    url_lo: np.ndarray
    ids: np.ndarray
    hex: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def _values(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def take(self, idx: np.ndarray) -> Kept:
        if len(idx) == len(self) and (idx == np.arange(len(self))).all():
            return self
        pick = pa.array(idx, pa.int64())
        return Kept(
            *(
                None if v is None else v.take(pick) if isinstance(v, pa.Array) else v[idx]
                for v in self._values()
            )
        )

    def without_key(self) -> Kept:
        return Kept(*(None if f.name == "key" else getattr(self, f.name) for f in fields(self)))

    @staticmethod
    def concat(parts: list[Kept]) -> Kept:
        if len(parts) == 1:
            return parts[0]
        columns = zip(*(p._values() for p in parts))
        return Kept(
            *(
                None
                if c[0] is None
                else pa.concat_arrays(list(c))
                if isinstance(c[0], pa.Array)
                else np.concatenate(c)
                for c in columns
            )
        )


@dataclass
class Shapes:
    """Which optional values the kept rows had: the output columns' types follow them (an all-missing
    width is an empty column, a partly missing one is float)."""

    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("rows", "width_missing", "height_missing", "hash_missing"), 0)
    )

    def update(self, kept: Kept) -> None:
        self.counts["rows"] += len(kept)
        self.counts["width_missing"] += int(np.isnan(kept.width).sum())
        self.counts["height_missing"] += int(np.isnan(kept.height).sum())
        self.counts["hash_missing"] += kept.row_hash.null_count

    def merge(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)


def _check_text_type(url: str, schema: pa.Schema, name: str) -> None:
    t = schema.field(name).type
    t = t.value_type if pa.types.is_dictionary(t) else t
    if not (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_null(t)
    ):
        raise CaptionSourceError(
            f"{url}: column {name!r} holds {t} values, not text: captions and URLs must be "
            "UTF-8 strings — write the column as strings (or drop the file from captions.source)"
        )


def _open(url: str):
    fs, path = storage.filesystem(url)
    try:
        handle = fs.open(path, "rb")
        pf = pq.ParquetFile(handle)
    except FileNotFoundError as err:
        raise CaptionSourceError(f"{url}: file not found") from err
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as err:  # a damaged footer can hold non-UTF-8 names
        raise CaptionSourceError(f"{url}: not a readable parquet file ({err})") from err
    names = set(pf.schema_arrow.names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            handle.close()
            raise CaptionSourceError(f"{url}: missing required column {col!r} (has {sorted(names)})")
        try:
            _check_text_type(url, pf.schema_arrow, col)
        except CaptionSourceError:
            handle.close()
            raise
    return handle, pf, [c for c in READ_COLUMNS if c in names]


def scan(
    sources: list[str],
    cfg: CaptionsConfig,
    stats: Stats,
    state: DedupState | None = None,
    batch_size: int = BATCH_ROWS,
) -> Iterator[Kept]:
    """Stream every source file (in order); yield each batch's kept rows after the global dedup.

    ``state`` holds the keys and URLs kept before (an earlier generation's files); it is updated.
    """
    state = state or DedupState()
    sized = False
    for number, url in enumerate(sources):
        handle, pf, columns = _open(url)
        row0 = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                text, key, dkey, curl, score, width, height, row_hash, rows = filter_batch(batch, cfg, stats)
                sha1 = sha1_digests(
                    key
                )  # the caption ids, and the dedup keys' digests where key == dedup key
                ids = halves(sha1)[0]
                key_hi, key_lo = key_digests(
                    dkey, sha1, np.asarray(pc.equal(key, dkey).to_numpy(zero_copy_only=False), bool)
                )
                url_hi, url_lo = digests(curl)
                kept, dup_caption, dup_url = greedy(key_hi, key_lo, url_hi, url_lo, state.keys, state.urls)
                if dup_caption.any():
                    stats.reject("duplicate_caption", int(dup_caption.sum()))
                if dup_url.any():
                    stats.reject("duplicate_url", int(dup_url.sum()))
                idx = np.flatnonzero(kept)
                if len(idx):
                    stats.add("rows_accepted", len(idx))
                if not sized and batch.num_rows:  # size the dedup state once (files alike): no rehash later
                    sized, rate = True, len(idx) / batch.num_rows
                    state.reserve(len(state.keys) + int(1.25 * rate * pf.metadata.num_rows * len(sources)))
                yield Kept(
                    text,
                    key,
                    curl,
                    score,
                    width,
                    height,
                    row_hash,
                    np.full(len(rows), number, np.int32),
                    row0 + rows,
                    key_hi,
                    key_lo,
                    url_hi,
                    url_lo,
                    ids,
                    hex16(sha1),
                ).take(idx)
                row0 += batch.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise CaptionSourceError(f"{url}: corrupt parquet data after row {row0} ({err})") from err
        finally:
            handle.close()
        stats.add("files_read")
    stats.add("rows_accepted", 0)  # the count is there even when nothing was kept


def frame(parts: list[Kept], ids: list[pa.Array], shapes: Shapes, sources: list[str]) -> pd.DataFrame:
    """The kept rows as the caption table (:data:`OUTPUT_COLUMNS`), typed as pandas types a list of rows:
    ``width`` int, or float when some rows lack it, or empty objects when all do (``shapes`` decides)."""
    if not shapes.counts["rows"]:
        return pd.DataFrame([], columns=OUTPUT_COLUMNS)
    c = shapes.counts

    def size(values: np.ndarray, missing: int):
        if missing == c["rows"]:
            return pd.Series([None] * len(values), dtype=object)
        if missing:
            return pd.Series(np.trunc(values), dtype=np.float64)
        return pd.Series(values.astype(np.int64))

    def strings(chunks: list[pa.Array]) -> pd.Series:
        return pa.chunked_array(chunks, pa.large_string()).to_pandas().reset_index(drop=True)

    width = np.concatenate([p.width for p in parts]) if parts else np.zeros(0)
    height = np.concatenate([p.height for p in parts]) if parts else np.zeros(0)
    hashes = [p.row_hash for p in parts]
    row_hash = (
        pd.Series([None] * len(width), dtype=object) if c["hash_missing"] == c["rows"] else strings(hashes)
    )
    return pd.DataFrame(
        {
            "caption_id": strings(ids),
            "text": strings([p.text for p in parts]),
            "url": strings([p.url for p in parts]),
            "aesthetic_score": np.concatenate([p.score for p in parts]) if parts else np.zeros(0),
            "width": size(width, c["width_missing"]),
            "height": size(height, c["height_missing"]),
            "source_row_hash": row_hash,
            "source_file": strings(
                [pa.array(sources, pa.large_string()).take(pa.array(p.file)) for p in parts]
            ),
            "source_row": np.concatenate([p.rows for p in parts]).astype(np.int64)
            if parts
            else np.zeros(0, np.int64),
        }
    )


def read_captions(
    sources: list[str], cfg: CaptionsConfig, stats: Stats, batch_size: int = BATCH_ROWS
) -> pd.DataFrame:
    """Every kept row of the sources (in file then row order), as one table: for small sources and tests;
    the ledger (:mod:`tasks.captions.generations`) keeps only what it may take."""
    parts, ids, shapes = [], [], Shapes()
    for kept in scan(sources, cfg, stats, batch_size=batch_size):
        parts.append(kept)
        ids.append(ascii_strings(kept.hex))
        kept = kept.without_key()
        shapes.update(kept)
    return frame(parts, ids, shapes, sources)
