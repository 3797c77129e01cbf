"""People's labels of rendered pairs: what one holds, how it is checked, where it is stored.

A label names a pair by its render version's folder (``review/<render hash>/``), its ``partition`` and
``sample_key``, and by ``pair_sha256``, the hash of its two images as the render manifest records them:
a pair whose images changed (another code version rendering under the same hash) no longer matches a
label given to the old images (:func:`matched`). Each row also holds the reviewer, the session, the time
(the server's, UTC) and the pair's stratum and weight in the review sample (:mod:`tasks.filter.review`).

Storage (:class:`LabelStore`): ``labels.parquet/`` is a folder of parquet parts, read as one table. Each
writing session (a reviewer's page, a process writing labels) owns its parts, named by reviewer, a writer
id (one per process) and a session id, and rewrites only them (the current chunk of ``chunk_rows`` rows,
atomically: a rename on local disk, one PUT on an object store). Two reviewers, two tabs or two servers
on one run therefore never write the same object, and no label is lost; the newest label of a reviewer
for a pair is the one that counts (:func:`latest`).

:func:`check_label` validates a label as the review page sends it, before anything is written: exact
keys and types, a label of :data:`LABELS`, reviewer and session names of a safe alphabet, a pair of the
review queue (and, when sent, its image hash).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa

from tasks.common import storage

LABELS = ("good", "wrong", "broken", "unsure")  # good edit / wrong edit / broken image / unsure
POSITIVE = "good"
NEGATIVE = ("wrong", "broken")
SCHEMA = pa.schema([
    ("render_hash", pa.string()), ("partition", pa.int32()), ("sample_key", pa.string()),
    ("caption_id", pa.string()), ("pair_sha256", pa.string()), ("label", pa.string()),
    ("reviewer", pa.string()), ("session", pa.string()), ("time", pa.timestamp("ms", tz="UTC")),
    ("stratum", pa.string()), ("weight", pa.float64()),
])
COLUMNS = SCHEMA.names
REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{7,63}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
SENT_KEYS = {"partition", "sample_key", "label", "reviewer", "session"}
OPTIONAL_KEYS = {"pair_sha256"}


class LabelError(ValueError):
    """A label that cannot be stored; the message names the field and what it expects."""


def check_label(payload: Any, known: Mapping[tuple[int, str], Mapping[str, Any]]) -> dict[str, Any]:
    """The row to store for ``payload`` (a decoded JSON body), or LabelError. ``known``: the queue's pairs,
    by (partition, sample_key), each with ``render_hash``, ``caption_id``, ``pair_sha256``, ``stratum``,
    ``weight``."""
    if not isinstance(payload, dict):
        raise LabelError(f"a label is a JSON object with {sorted(SENT_KEYS)}, got {type(payload).__name__}")
    missing, extra = SENT_KEYS - payload.keys(), payload.keys() - SENT_KEYS - OPTIONAL_KEYS
    if missing or extra:
        raise LabelError("a label has exactly the fields " + ", ".join(sorted(SENT_KEYS)) + " (and optionally "
                         "pair_sha256)" + (f"; missing {sorted(missing)}" if missing else "")
                         + (f"; unknown {sorted(map(str, extra))}" if extra else ""))
    partition = payload["partition"]
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise LabelError(f"partition: a partition id (an integer >= 0), got {partition!r}")
    checks = (("sample_key", KEY_RE, "a sample key (letters, digits, _ and -)"),
              ("reviewer", REVIEWER_RE, "1-40 letters, digits, '.', '_' or '-', starting with a letter or digit"),
              ("session", SESSION_RE, "8-64 letters, digits or '-'"))
    for name, pattern, expected in checks:
        value = payload[name]
        if not isinstance(value, str) or not pattern.match(value):
            raise LabelError(f"{name}: {expected}, got {str(value)[:80]!r}")
    if payload["label"] not in LABELS:
        raise LabelError(f"label: one of {', '.join(LABELS)}, got {str(payload['label'])[:40]!r}")
    pair = known.get((partition, payload["sample_key"]))
    if pair is None:
        raise LabelError(f"sample_key: {payload['sample_key']!r} of partition {partition} is not a pair of this "
                         "review (reload the page)")
    sent_hash = payload.get("pair_sha256")
    if sent_hash is not None and sent_hash != pair["pair_sha256"]:
        raise LabelError(f"pair_sha256: the images of {payload['sample_key']!r} changed since the page loaded "
                         "(another render version): reload the page")
    return {"render_hash": pair["render_hash"], "partition": partition, "sample_key": payload["sample_key"],
            "caption_id": pair["caption_id"], "pair_sha256": pair["pair_sha256"], "label": payload["label"],
            "reviewer": payload["reviewer"], "session": payload["session"], "stratum": pair["stratum"],
            "weight": float(pair["weight"])}


def empty() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


class LabelStore:
    """Appends labels under ``folder`` (``review/<render hash>/labels.parquet``) and reads every writer's."""

    def __init__(self, folder: str, writer: str | None = None, chunk_rows: int = 256):
        self.folder = folder
        self.writer = writer or uuid.uuid4().hex[:12]
        if not SESSION_RE.match(self.writer):
            raise ValueError(f"writer id {self.writer!r}: {SESSION_RE.pattern}")
        self.chunk_rows = chunk_rows
        self._rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def part_url(self, reviewer: str, session: str, chunk: int) -> str:
        return storage.url_join(self.folder, f"{reviewer}-{self.writer}-{session}-{chunk:05d}.parquet")

    def append(self, rows: list[dict[str, Any]], *, now: pd.Timestamp | None = None) -> None:
        """Store checked rows (:func:`check_label`); the time is set here. A failed write stores nothing."""
        stamp = (now or pd.Timestamp.now(tz="UTC")).floor("ms")
        with self._lock:
            touched: dict[tuple[str, str], int] = {}
            for row in rows:
                key = (row["reviewer"], row["session"])
                held = self._rows.setdefault(key, [])
                touched.setdefault(key, len(held))
                held.append({**row, "time": stamp})
            try:
                for (reviewer, session), first in touched.items():
                    held = self._rows[(reviewer, session)]
                    for chunk in range(first // self.chunk_rows, (len(held) - 1) // self.chunk_rows + 1):
                        part = held[chunk * self.chunk_rows: (chunk + 1) * self.chunk_rows]
                        storage.write_parquet_atomic(self.part_url(reviewer, session, chunk),
                                                     pd.DataFrame(part, columns=COLUMNS), SCHEMA)
            except Exception:
                for key, first in touched.items():
                    del self._rows[key][first:]
                raise

    def read(self) -> pd.DataFrame:
        """Every label of every writer (all parts), oldest first."""
        frames = [storage.read_parquet(url) for url in storage.list_files(self.folder, "*.parquet")]
        frames = [f for f in frames if len(f)]
        if not frames:
            return empty()
        return pd.concat(frames, ignore_index=True).sort_values("time", kind="stable").reset_index(drop=True)


def latest(labels: pd.DataFrame) -> pd.DataFrame:
    """Each reviewer's newest label per pair (a pair labelled again: the new label counts)."""
    ordered = labels.sort_values("time", kind="stable")
    return ordered.drop_duplicates(["reviewer", "partition", "sample_key"], keep="last").reset_index(drop=True)


def matched(labels: pd.DataFrame, samples: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(labels joined with their samples' rows, labels left out): a label counts only for a pair of
    ``samples`` with the same ``pair_sha256`` (the images it was given to)."""
    right = samples.drop(columns=[c for c in ("caption_id", "stratum", "weight") if c in samples])
    joined = labels.merge(right, on=["partition", "sample_key", "pair_sha256"], how="inner")
    return joined, len(labels) - len(joined)
