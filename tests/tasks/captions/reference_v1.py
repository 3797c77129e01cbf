"""The captions reader and ledger as they were before the vectorised rewrite (row by row), kept verbatim
as the independent reference the tests compare the current implementation with (same captions, ids,
order, rejection counts and partition bytes). Test fixture only: nothing in the product imports it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common import layout, storage
from tasks.common.config import CaptionsConfig, PipelineConfig
from tasks.common.contract import Stats
from tasks.common.lease import PartitionLease

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


# ---------------------------------------------------------------- the ledger (generations.py)


STAGE = "captions"
log = logging.getLogger("editforge")


def priority(seed: int, caption_id: str) -> float:
    """The caption's seeded draw in [0, 1): the lower, the earlier it is taken."""
    return int(hashlib.sha1(f"{seed}:{caption_id}".encode()).hexdigest()[:16], 16) / 2.0 ** 64


@dataclass(frozen=True)
class Generation:
    number: int
    first_partition: int
    num_partitions: int
    record: dict[str, Any]

    @property
    def partitions(self) -> range:
        return range(self.first_partition, self.first_partition + self.num_partitions)


def _hash(cfg: PipelineConfig) -> str:
    from tasks.registry import stage_hash

    return stage_hash(cfg, STAGE)


def ledger(cfg: PipelineConfig, config_hash: str | None = None) -> list[Generation]:
    """The generations recorded for this config's captions version, in order."""
    folder = layout.generations_dir(cfg.output_root, config_hash or _hash(cfg))
    gens = []
    for url in sorted(storage.list_files(folder, "gen-*.json")):
        record = storage.read_json(url)
        gens.append(Generation(record["generation"], record["first_partition"], record["num_partitions"], record))
    for i, g in enumerate(gens):  # records are written in order under the lease: a gap is damage
        if g.number != i:
            raise storage.UnreadableFileError(f"{folder}: generation {i} is missing (found {g.number}); "
                                              "the ledger was edited by hand — restore it or use a new output_root")
    return gens


def partition_count(cfg: PipelineConfig) -> int:
    """How many partitions every stage has: those of every generation (``num_partitions`` before the first)."""
    gens = ledger(cfg)
    return gens[-1].partitions.stop if gens else cfg.captions.num_partitions


def generation_of(cfg: PipelineConfig, partition_id: int, config_hash: str | None = None) -> Generation | None:
    return next((g for g in ledger(cfg, config_hash) if partition_id in g.partitions), None)


def fingerprint(sources: list[str]) -> list[dict[str, Any]]:
    """What identifies the sources' current content without reading it: name, size, modification time."""
    out = []
    for url in sources:
        fs, path = storage.filesystem(url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            out.append({"url": url, "missing": True})
            continue
        changed = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
        out.append({"url": url, "size": info.get("size"), "changed": str(changed)})
    return out


def _partitions_for(cfg: PipelineConfig, new: int, first: bool) -> int:
    c = cfg.captions
    if first:
        return c.num_partitions
    per_partition = max(1, math.ceil(c.num_captions / c.num_partitions))
    return max(1, math.ceil(new / per_partition))


def _select(table: pd.DataFrame, taken: pd.DataFrame, threshold: float, total: int, target: int,
            seed: int, stats: Stats) -> tuple[pd.DataFrame, float]:
    """The captions a new generation takes from ``table`` (all usable captions), and the new threshold."""
    if len(taken):
        old_ids = set(taken["caption_id"])
        old_keys = set(taken["text"].map(dedup_key))
        old_urls = set(taken["url"])
        seen = table["caption_id"].isin(old_ids)
        stats.add("already_taken", int(seen.sum()))
        table = table[~seen]
        same_text = table["text"].map(dedup_key).isin(old_keys)
        same_url = table["url"].isin(old_urls) & ~same_text
        if same_text.any():
            stats.reject("duplicate_caption", int(same_text.sum()))
        if same_url.any():
            stats.reject("duplicate_url", int(same_url.sum()))
        table = table[~same_text & ~same_url]
    table = table.assign(priority=[priority(seed, c) for c in table["caption_id"]])
    table = table.sort_values(["priority", "caption_id"], kind="stable").reset_index(drop=True)
    below = table[table["priority"] < threshold]
    rest = table[table["priority"] >= threshold]
    need = max(0, target - total - len(below))
    more = rest.iloc[:need]
    if need and len(more) < need:
        threshold = 1.0  # the source ran out: from now on every new caption is taken
    elif len(more):
        threshold = float(more["priority"].iloc[-1]) + 2.0 ** -64  # the last one taken is under it
    return pd.concat([below, more], ignore_index=True), threshold


def extend(cfg: PipelineConfig, logger: logging.Logger | None = None) -> Generation | None:
    """Add a generation if the sources grew or ``num_captions`` rose; return it (None: nothing new)."""
    logger = logger or log
    config_hash = _hash(cfg)
    c = cfg.captions
    with PartitionLease(layout.lease_url(cfg.output_root, STAGE, config_hash, "generations"), logger):
        gens = ledger(cfg, config_hash)
        sources = resolve_sources(c.source)
        prints = fingerprint(sources)
        last = gens[-1].record if gens else None
        if last and last["sources"] == prints and last["num_captions"] >= c.num_captions:
            return None  # nothing changed since the last generation: the sources are not read again
        stats = Stats()
        logger.info("captions: reading %d source file(s)", len(sources))
        with stats.timer("read"):
            table = read_captions(sources, c, stats)
        taken = (pd.concat([storage.read_parquet(layout.generation_url(cfg.output_root, config_hash, g.number, "parquet"))
                            for g in gens], ignore_index=True) if gens else table.iloc[:0])
        total = len(taken)
        threshold = last["threshold"] if last else 0.0
        new, threshold = _select(table, taken, threshold, total, c.num_captions, c.seed, stats)
        number = len(gens)
        first = gens[-1].partitions.stop if gens else 0
        record = {"generation": number, "sources": prints, "num_captions": max(c.num_captions, last["num_captions"] if last else 0),
                  "threshold": threshold, "taken": len(new), "total_taken": total + len(new), **stats.summary()}
        if not len(new):
            if last:  # remember what was seen so the sources are not read again for nothing
                logger.info("captions: the sources hold no caption not taken before")
                storage.write_json_atomic(layout.generation_url(cfg.output_root, config_hash, number - 1, "json"),
                                          {**last, "sources": prints, "num_captions": record["num_captions"],
                                           "threshold": threshold})
                return None
        count = _partitions_for(cfg, len(new), first=not gens)
        parts = [first + int(cid, 16) % count for cid in new["caption_id"]]
        new = new.assign(partition_id=parts, generation=number)
        storage.write_parquet_atomic(layout.generation_url(cfg.output_root, config_hash, number, "parquet"), new)
        record.update(first_partition=first, num_partitions=count)
        storage.write_json_atomic(layout.generation_url(cfg.output_root, config_hash, number, "json"), record)
        if number and len(new):
            logger.info("captions: generation %d takes %d new caption(s) into partitions %d..%d", number, len(new),
                        first, first + count - 1)
        if len(new) + total < c.num_captions:
            logger.warning("captions: asked for %d captions, only %d usable rows", c.num_captions, len(new) + total)
        return Generation(number, first, count, record)


def partition_captions(cfg: PipelineConfig, partition_id: int, config_hash: str) -> pd.DataFrame:
    """The captions of one partition, in caption id order (the ledger is extended first when empty)."""
    gen = generation_of(cfg, partition_id, config_hash)
    if gen is None:
        extend(cfg)
        gen = generation_of(cfg, partition_id, config_hash)
    if gen is None:
        raise ValueError(f"captions part-{partition_id:05d} does not exist: the ledger has "
                         f"{partition_count(cfg)} partition(s)")
    df = storage.read_parquet(layout.generation_url(cfg.output_root, config_hash, gen.number, "parquet"))
    df = df[df["partition_id"] == partition_id].sort_values("caption_id").reset_index(drop=True)
    return df.drop(columns=["partition_id", "generation", "priority"])


