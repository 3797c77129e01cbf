"""The captions ledger: which captions a run has taken, generation by generation (append-only).

Every usable caption has a seeded draw ``u = priority(seed, caption_id)`` in [0, 1), a pure function
of its stable id, so a sample never depends on file or row order. A generation takes captions the
ledger does not hold yet:

1. those new in the source whose ``u`` is under the threshold the ledger reached: a grown source is
   sampled at the same rate as before;
2. then, while fewer than ``captions.num_captions`` are taken in all, the next ones in ``u`` order
   (raising ``num_captions`` adds captions, it never re-samples); the threshold rises to the last one
   taken (to 1 when the source ran out: every later caption is taken).

The first generation is therefore the ``num_captions`` captions of lowest ``u``, a seeded uniform
sample. Each generation appends its own partitions (generation 0: ``captions.num_partitions``;
later ones: as many as keep the partitions about that size), so every earlier partition — and
everything downstream of it — stays as it was, byte for byte. A new caption equal to one already
taken (the dedup key or the URL) is counted as a duplicate, not taken twice.

A generation is ``gen-NNNNN.parquet`` (its captions and their partition) and ``gen-NNNNN.json`` (its
record, written last: source fingerprint, threshold, partitions, read statistics). The sources are
read again only when their fingerprint (names, sizes, modification times) or ``num_captions`` has
changed. One process at a time extends the ledger (a lease), so two workers never add the same
generation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tasks.captions.laion import dedup_key, read_captions, resolve_sources
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import Stats
from tasks.common.lease import PartitionLease

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


__all__ = ["Generation", "extend", "ledger", "partition_captions", "partition_count", "priority"]
