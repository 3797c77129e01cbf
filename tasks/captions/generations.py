"""The captions ledger: which captions a run has taken, generation by generation (append-only).

A generation takes the captions the ledger does not hold yet whose seeded draw ``priority(seed, id)``
(:mod:`tasks.captions.sample`) is under the threshold the ledger reached (a grown source is sampled
at the same rate), then, while fewer than ``captions.num_captions`` are taken, the next ones in draw
order; the threshold rises to the last one taken (to 1 when the source ran out). Each generation
appends its own partitions, so every earlier partition and everything downstream stays byte for byte;
a new caption equal to one taken (dedup key or URL) is a duplicate, not taken twice.

Per generation (docs/captions.md): ``gen-NNNNN.parquet``, its captions sorted by partition with one
row group each (a partition reads only its own rows); ``gen-NNNNN.state-<hash>.parquet``, what the read
added to the dedup state; ``gen-NNNNN.json``, its record, written last. The sources are read only when
their fingerprint (names, sizes, modification times) or ``num_captions`` changed — only the new files
when files were appended to an unchanged list. One process at a time extends the ledger (a lease).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.captions.dedup import (
    KEPT_KEY,
    KEPT_URL,
    TAKEN_ID,
    TAKEN_KEY,
    TAKEN_URL,
    DedupState,
    Taken,
    digest_check,
    digests,
    key_digests,
    read_states,
    state_bytes,
)
from tasks.captions.laion import (
    OUTPUT_COLUMNS,
    Shapes,
    ascii_strings,
    dedup_keys,
    frame,
    resolve_sources,
    scan,
)
from tasks.captions.sample import Candidates, Pool, priorities, priority  # noqa: F401  (priority: the API)
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import Stats
from tasks.common.lease import PartitionLease

STAGE = "captions"
FORMAT = 2  # 1: one row group, no dedup state (still read); 2: row group per partition, state files
DIGESTS = ["key_hi", "key_lo", "url_hi", "url_lo"]
log = logging.getLogger("editforge")


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


@dataclass
class _Ledger:
    """The captions the ledger holds, row by row: ids, and digests of their dedup keys and URLs."""

    ids: np.ndarray
    key: tuple[np.ndarray, np.ndarray]
    url: tuple[np.ndarray, np.ndarray]

    def taken(self) -> Taken:
        out = Taken()
        out.ids.add(self.ids, np.zeros(len(self.ids), np.uint64))
        for target, (hi, lo) in ((out.keys, self.key), (out.urls, self.url)):
            first = ~pd.Series(hi).duplicated().to_numpy() | ~pd.Series(lo).duplicated().to_numpy()
            target.add(hi[first], lo[first])
        return out


def _read_ledger(cfg: PipelineConfig, config_hash: str, gens: list[Generation]) -> _Ledger:
    """Every caption the ledger holds (for a full read of the sources, which reads every source file anyway:
    the taken captions are digested again here rather than stored twice)."""
    parts = []
    for g in gens:
        url = layout.generation_url(cfg.output_root, config_hash, g.number, "parquet")
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=["caption_id", "text", "url"])
        if table.num_rows:
            parts.append((np.array([int(c, 16) for c in table.column("caption_id").to_pylist()], np.uint64),
                          key_digests(dedup_keys(table.column("text").combine_chunks())),
                          digests(table.column("url").combine_chunks())))
    empty = np.zeros(0, np.uint64)
    return _Ledger(np.concatenate([p[0] for p in parts]) if parts else empty,
                   tuple(np.concatenate([p[1][i] for p in parts]) if parts else empty for i in (0, 1)),
                   tuple(np.concatenate([p[2][i] for p in parts]) if parts else empty for i in (0, 1)))


def _appended(last: dict | None, prints: list[dict]) -> bool:
    """Whether files were only added at the end of an otherwise unchanged source list since ``last``."""
    if not last or last.get("format") != FORMAT or last.get("digest_check") != digest_check():
        return False  # a format-1 ledger has no dedup state: its next read is a full one
    old = last["sources"]
    return len(prints) > len(old) and prints[:len(old)] == old and not any(p.get("missing") for p in prints)


def _read_state(folder: str, names: list[str]) -> tuple[DedupState, Taken]:
    blobs = [storage.read_bytes(storage.url_join(folder, name)) for name in names]
    return read_states(blobs)


def _write_ledger(url: str, table: pa.Table, first: int, count: int) -> None:
    """One row group per partition (statistics on ``partition_id`` only): a partition reads its own rows."""
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, write_statistics=["partition_id"], use_dictionary=False) as writer:
        if not table.num_rows:
            writer.write_table(table)
        bounds = np.searchsorted(table.column("partition_id").to_numpy(), np.arange(first, first + count + 1))
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                writer.write_table(table.slice(a, b - a), row_group_size=b - a)
    storage.write_bytes_atomic(url, sink.getvalue())


def _sum(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def extend(cfg: PipelineConfig, logger: logging.Logger | None = None) -> Generation | None:
    """Add a generation if the sources grew or ``num_captions`` rose; return it (None: nothing new).

    A full read reads every source file; when files were only appended to an unchanged list and no
    caption of the earlier files can be taken now (the target was met, or every caption was taken),
    only the new files are read, against the dedup state the earlier reads stored. Both write the same
    generation and the same record counts."""
    logger = logger or log
    config_hash = _hash(cfg)
    c = cfg.captions
    folder = layout.generations_dir(cfg.output_root, config_hash)
    with PartitionLease(layout.lease_url(cfg.output_root, STAGE, config_hash, "generations"), logger):
        gens = ledger(cfg, config_hash)
        sources = resolve_sources(c.source)
        prints = fingerprint(sources)
        last = gens[-1].record if gens else None
        if last and last["sources"] == prints and last["num_captions"] >= c.num_captions:
            return None  # nothing changed since the last generation: the sources are not read again
        total = last["total_taken"] if last else 0
        threshold = last["threshold"] if last else 0.0
        incremental = _appended(last, prints) and c.num_captions <= last["num_captions"] \
            and (threshold >= 1.0 or total >= c.num_captions)
        stats, select, shapes = Stats(), Stats(), Shapes()
        with stats.timer("read"):
            if incremental:
                read = sources[len(last["sources"]):]
                logger.info("captions: reading %d new source file(s)", len(read))
                shapes.merge(last["shapes"])
                state, taken = _read_state(folder, last["state"])
                held = None
            else:
                read = sources
                logger.info("captions: reading %d source file(s)", len(read))
                state, held = DedupState(), _read_ledger(cfg, config_hash, gens) if gens else None
                taken = held.taken() if held is not None and len(held.ids) else None
            pool, kept = _scan_into(read, cfg, stats, select, state, shapes, taken if taken else None, threshold,
                                    c.num_captions - total, collect=incremental)
            chosen, taken_rows, threshold = pool.select(total, c.num_captions)
        # what this read adds to the dedup state (a full read: all of it, read from the sets themselves)
        parts = {KEPT_KEY: (kept["key_hi"], kept["key_lo"]), KEPT_URL: (kept["url_hi"], kept["url_lo"])} \
            if incremental else {KEPT_KEY: state.keys.arrays(), KEPT_URL: state.urls.arrays()}
        if held is not None:  # taken captions no kept row has (a file they came from changed or moved)
            lost_key, lost_url = ~state.keys.contains(*held.key), ~state.urls.contains(*held.url)
            parts |= {TAKEN_KEY: (held.key[0][lost_key], held.key[1][lost_key]),
                      TAKEN_URL: (held.url[0][lost_url], held.url[1][lost_url]),
                      TAKEN_ID: (held.ids[lost_key], np.zeros(int(lost_key.sum()), np.uint64))}
        read_stats = {k: stats.summary()[k] for k in ("counts", "rejected")}
        if incremental:  # the counts a full read would give: every file's, and the select step's so far
            source = {k: _sum(last["source"][k], read_stats[k]) for k in read_stats}
            base = last["select"]
            counts = dict(base["counts"])
            if total:  # every caption taken since that read is kept in the files read then, and counted again
                counts["already_taken"] = counts.get("already_taken", 0) + total - base["total_taken"] \
                    + select.counts.get("already_taken", 0)
            select_record = {"counts": counts, "rejected": _sum(base["rejected"], select.rejected), "total_taken": total}
        else:
            source = read_stats
            select_record = {"counts": dict(select.counts), "rejected": dict(select.rejected), "total_taken": total}
        n_new = len(taken_rows)
        number = len(gens)
        state_bytes_ = state_bytes(parts)
        state_name = f"gen-{(number if n_new or not last else number - 1):05d}.state-" \
                     f"{hashlib.sha256(state_bytes_).hexdigest()[:12]}.parquet"
        storage.write_bytes_atomic(storage.url_join(folder, state_name), state_bytes_)
        about = {"format": FORMAT, "read": "incremental" if incremental else "full",
                 "state": [*(last["state"] if incremental else []), state_name], "digest_check": digest_check(),
                 "shapes": shapes.counts, "source": source, "select": select_record,
                 "counts": _sum(source["counts"], select_record["counts"]),
                 "rejected": _sum(source["rejected"], select_record["rejected"])}
        num_captions = max(c.num_captions, last["num_captions"] if last else 0)
        if not n_new and last:  # remember what was seen so the sources are not read again for nothing
            logger.info("captions: the sources hold no caption not taken before")
            storage.write_json_atomic(layout.generation_url(cfg.output_root, config_hash, number - 1, "json"),
                                      {**last, "sources": prints, "num_captions": num_captions,
                                       "threshold": threshold, **{k: v for k, v in about.items()
                                                                  if k not in ("counts", "rejected")}})
            return None
        first = gens[-1].partitions.stop if gens else 0
        count = _partitions_for(cfg, n_new, first=not gens)
        new = _generation_table(chosen, taken_rows, shapes, read, number, first, count)
        _write_ledger(layout.generation_url(cfg.output_root, config_hash, number, "parquet"), new, first, count)
        record = {"generation": number, "sources": prints, "num_captions": num_captions, "threshold": threshold,
                  "taken": n_new, "total_taken": total + n_new, **stats.summary(), **about,
                  "first_partition": first, "num_partitions": count}
        storage.write_json_atomic(layout.generation_url(cfg.output_root, config_hash, number, "json"), record)
        if number and n_new:
            logger.info("captions: generation %d takes %d new caption(s) into partitions %d..%d", number, n_new,
                        first, first + count - 1)
        if n_new + total < c.num_captions:
            logger.warning("captions: asked for %d captions, only %d usable rows", c.num_captions, n_new + total)
        return Generation(number, first, count, record)


def _scan_into(sources, cfg, stats, select, state, shapes, taken, threshold, room, collect) -> tuple[Pool, dict]:
    """Read ``sources`` into a bounded pool of candidates (``select``: the captions found in ``taken``,
    counted); with ``collect``, also return the kept rows' digests (what this read adds to the state)."""
    c = cfg.captions
    pool = Pool(threshold, max(0, room))
    kept_digests: dict[str, list[np.ndarray]] = {name: [] for name in DIGESTS}
    for kept in scan(sources, c, stats, state):
        shapes.update(kept)
        for name in DIGESTS if collect else ():
            kept_digests[name].append(getattr(kept, name))
        ids = kept.ids
        kept = kept.without_key()
        usable = np.ones(len(ids), bool)
        if taken is not None:
            seen = taken.ids.contains(ids, np.zeros(len(ids), np.uint64))
            text_dup = ~seen & taken.keys.contains(kept.key_hi, kept.key_lo)
            url_dup = ~seen & ~text_dup & taken.urls.contains(kept.url_hi, kept.url_lo)
            select.add("already_taken", int(seen.sum()))
            if text_dup.any():
                select.reject("duplicate_caption", int(text_dup.sum()))
            if url_dup.any():
                select.reject("duplicate_url", int(url_dup.sum()))
            usable = ~(seen | text_dup | url_dup)
        idx = np.flatnonzero(usable)
        pool.add(Candidates(kept.take(idx), priorities(c.seed, kept.hex[idx])))
    if taken is not None:
        select.add("already_taken", 0)  # counted whenever the ledger holds captions
    return pool, {name: np.concatenate(v) if v else np.zeros(0, np.uint64) for name, v in kept_digests.items()}


def _generation_table(pool: Candidates | None, taken: np.ndarray, shapes: Shapes, sources: list[str], number: int,
                      first: int, count: int) -> pa.Table:
    """The generation's rows sorted by partition then caption id, with the types the caption table has
    (:func:`tasks.captions.laion.frame`: a partly missing width is float, a wholly missing one empty)."""
    if pool is None or not len(taken):
        empty = frame([], [], shapes, sources).assign(priority=[], partition_id=[], generation=number)
        return pa.Table.from_pandas(empty, preserve_index=False)
    ids = pool.rows.ids[taken]
    partition = first + (ids % np.uint64(count)).astype(np.int64)
    order = np.lexsort((ids, partition))
    rows, prio = pool.rows.take(taken[order]), pool.prio[taken[order]]
    c = shapes.counts

    def size(values: np.ndarray, missing: int) -> pa.Array:
        if missing == c["rows"]:
            return pa.nulls(len(values))
        return pa.array(np.trunc(values)) if missing else pa.array(values.astype(np.int64))

    row_hash = pa.nulls(len(rows)) if c["hash_missing"] == c["rows"] else rows.row_hash
    return pa.table({"caption_id": ascii_strings(rows.hex), "text": rows.text, "url": rows.url,
                     "aesthetic_score": rows.score, "width": size(rows.width, c["width_missing"]),
                     "height": size(rows.height, c["height_missing"]), "source_row_hash": row_hash,
                     "source_file": pa.array(sources, pa.large_string()).take(pa.array(rows.file)),
                     "source_row": rows.rows.astype(np.int64), "priority": prio, "partition_id": partition[order],
                     "generation": np.full(len(rows), number, np.int64)})


def partition_captions(cfg: PipelineConfig, partition_id: int, config_hash: str) -> pd.DataFrame:
    """The captions of one partition, in caption id order (the ledger is extended first when empty).

    Only the row groups whose ``partition_id`` statistics hold the partition are read (one in a
    format-2 ledger; the whole file in a format-1 one)."""
    gen = generation_of(cfg, partition_id, config_hash)
    if gen is None:
        extend(cfg)
        gen = generation_of(cfg, partition_id, config_hash)
    if gen is None:
        raise ValueError(f"captions part-{partition_id:05d} does not exist: the ledger has "
                         f"{partition_count(cfg)} partition(s)")
    url = layout.generation_url(cfg.output_root, config_hash, gen.number, "parquet")
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
            col = pf.schema_arrow.get_field_index("partition_id")
            groups = []
            for i in range(pf.metadata.num_row_groups):
                st = pf.metadata.row_group(i).column(col).statistics
                if st is None or not st.has_min_max or st.min <= partition_id <= st.max:
                    groups.append(i)
            columns = [*OUTPUT_COLUMNS, "partition_id"]
            table = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table().select(columns)
        except pa.ArrowException as err:
            raise storage.UnreadableFileError(f"{url} is not a readable parquet file ({err}); delete the captions "
                                              "version folder and run the captions stage again") from None
    df = table.to_pandas()
    df = df[df["partition_id"] == partition_id].sort_values("caption_id").reset_index(drop=True)
    return df.drop(columns=["partition_id"])


__all__ = ["Generation", "extend", "ledger", "partition_captions", "partition_count", "priorities", "priority"]
