"""Global first-come dedup of captions and URLs, vectorised over batches, with a compact state.

A row is kept when no earlier kept row has its dedup key or its URL (the greedy, file-then-row order
rule of :mod:`tasks.captions.laion`). Keys and URLs are compared by 128-bit digests (two SipHash-2-4
values from ``pandas.util.hash_array`` with fixed keys; a collision between two different strings is
a 1-in-10^24 event at LAION's size), so the state between batches, and between ledger generations,
is 16 bytes per key instead of the strings: :class:`DigestSet` is an open-addressing hash set over
NumPy arrays. Within a batch the greedy rule is resolved in rounds (the first row of every key and
URL among the undecided rows is kept, the rows that share a key or URL with a kept row are dropped,
repeat), which ends in a few rounds on real data; long chains finish row by row.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_KEYS = ("editforge-dedup1", "editforge-dedup2")  # SipHash keys (16 bytes each): part of the ledger format
DIGEST_CHECK = "editforge"  # the record keeps digest(DIGEST_CHECK): a changed hash function is noticed


def digests(values: pa.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """128-bit digests of strings (no nulls) as two uint64 arrays."""
    obj = values.to_numpy(zero_copy_only=False) if isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    obj = np.asarray(obj, dtype=object)
    if not len(obj):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return (pd.util.hash_array(obj, hash_key=_KEYS[0], categorize=False),
            pd.util.hash_array(obj, hash_key=_KEYS[1], categorize=False))


def digest_check() -> list[str]:
    hi, lo = digests(np.array([DIGEST_CHECK], dtype=object))
    return [f"{int(hi[0]):016x}", f"{int(lo[0]):016x}"]


class DigestSet:
    """A set of 128-bit digests with vectorised ``contains`` and ``add`` (linear probing, load <= 1/2)."""

    def __init__(self, capacity: int = 1 << 12):
        self.size = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.mask = np.uint64(capacity - 1)
        self.used = np.zeros(capacity, bool)
        self.hi = np.zeros(capacity, np.uint64)
        self.lo = np.zeros(capacity, np.uint64)

    def __len__(self) -> int:
        return self.size

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hi), bool)
        idx = np.arange(len(hi))
        slot = (hi & self.mask).astype(np.int64)
        while len(idx):
            used = self.used[slot]
            match = used & (self.hi[slot] == hi[idx]) & (self.lo[slot] == lo[idx])
            found[idx[match]] = True
            go_on = used & ~match
            idx, slot = idx[go_on], (slot[go_on] + 1) & int(self.mask)
        return found

    def add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        """Insert digests that are distinct and not in the set yet."""
        if 2 * (self.size + len(hi)) > len(self.used):
            old_hi, old_lo = self.hi[self.used], self.lo[self.used]
            capacity = len(self.used)
            while 2 * (self.size + len(hi)) > capacity:
                capacity *= 2
            self._alloc(capacity)
            self.size = 0
            self._insert(old_hi, old_lo)
        self._insert(hi, lo)

    def _insert(self, hi: np.ndarray, lo: np.ndarray) -> None:
        idx = np.arange(len(hi))
        slot = (hi & self.mask).astype(np.int64)
        while len(idx):
            free = np.flatnonzero(~self.used[slot])
            free = free[~pd.Series(slot[free]).duplicated().to_numpy()]  # one winner per free slot
            winners, taken_slots = idx[free], slot[free]
            self.used[taken_slots] = True
            self.hi[taken_slots], self.lo[taken_slots] = hi[winners], lo[winners]
            placed = np.zeros(len(hi), bool)
            placed[winners] = True
            rest = ~placed[idx]
            idx, slot = idx[rest], (slot[rest] + 1) & int(self.mask)  # every slot tried is now used
        self.size += len(hi)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.hi[self.used], self.lo[self.used]


def _codes(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Small integer codes, equal exactly when the 128-bit digests are equal."""
    codes, uniques = pd.factorize(hi)
    first = np.zeros(len(uniques), np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]  # any row of each code will do
    if (lo != lo[first][codes]).any():  # two digests share their upper half: compare both halves
        _, codes = np.unique(np.stack([hi, lo], axis=1), axis=0, return_inverse=True)
    return np.asarray(codes, np.int64).ravel()


def _first(codes: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of every code."""
    return ~pd.Series(codes).duplicated().to_numpy()


def greedy(key_hi, key_lo, url_hi, url_lo, keys: DigestSet, urls: DigestSet,
           max_rounds: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of one batch (in order) against the rows kept before it (``keys``, ``urls``).

    Returns ``(kept, duplicate_caption, duplicate_url)`` masks, exactly as the row-by-row rule gives
    them: a dropped row is a caption duplicate when an earlier kept row has its key, else a URL one.
    Adds the kept rows to ``keys`` and ``urls``.
    """
    n = len(key_hi)
    key_seen, url_seen = keys.contains(key_hi, key_lo), urls.contains(url_hi, url_lo)
    kept = np.zeros(n, bool)
    open_ = ~(key_seen | url_seen)
    if open_.any():
        kc, uc = _codes(key_hi, key_lo), _codes(url_hi, url_lo)
        k_won, u_won = np.zeros(int(kc.max()) + 1, bool), np.zeros(int(uc.max()) + 1, bool)
        for _ in range(max_rounds):
            rows = np.flatnonzero(open_)
            if not len(rows):
                break
            win = rows[_first(kc[rows]) & _first(uc[rows])]
            kept[win] = True
            open_[win] = False
            k_won[kc[win]], u_won[uc[win]] = True, True
            open_ &= ~(k_won[kc] | u_won[uc])
        rows = np.flatnonzero(open_)
        if len(rows):  # long chains: the rest one by one (each only clashes with rows decided here)
            k_taken, u_taken = set(), set()
            for i in rows.tolist():
                if kc[i] not in k_taken and uc[i] not in u_taken:
                    kept[i] = True
                    k_taken.add(kc[i])
                    u_taken.add(uc[i])
        first_kept = np.full(int(kc.max()) + 1, n, np.int64)
        first_kept[kc[kept]] = np.flatnonzero(kept)  # kept keys are distinct
        key_seen |= first_kept[kc] < np.arange(n)
    dropped = ~kept
    keys.add(key_hi[kept], key_lo[kept])
    urls.add(url_hi[kept], url_lo[kept])
    return kept, dropped & key_seen, dropped & ~key_seen


@dataclass
class DedupState:
    """The keys and URLs of every row kept so far (what the dedup needs of the rows before)."""

    keys: DigestSet = field(default_factory=DigestSet)
    urls: DigestSet = field(default_factory=DigestSet)

    def add(self, key_hi, key_lo, url_hi, url_lo) -> None:
        self.keys.add(key_hi, key_lo)
        self.urls.add(url_hi, url_lo)


@dataclass
class Taken:
    """What a new generation is compared with besides the dedup: the ids, keys and URLs of the captions the
    ledger holds (all of them for a full read; for a read of appended files only those the dedup state
    lacks, because a file they came from changed)."""

    ids: DigestSet = field(default_factory=DigestSet)
    keys: DigestSet = field(default_factory=DigestSet)
    urls: DigestSet = field(default_factory=DigestSet)

    def __len__(self) -> int:
        return len(self.ids) + len(self.keys) + len(self.urls)


# a state file: rows of (kind, hi, lo); kept keys and URLs, and the taken captions' keys, URLs and ids
# (``hi``; ``lo`` 0) that no kept row of the read has
KEPT_KEY, KEPT_URL, TAKEN_KEY, TAKEN_URL, TAKEN_ID = range(5)


def state_bytes(parts: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    kinds = [np.full(len(hi), kind, np.int8) for kind, (hi, _) in parts.items()]
    table = pa.table({"kind": np.concatenate(kinds) if kinds else np.zeros(0, np.int8),
                      "hi": np.concatenate([hi for hi, _ in parts.values()]) if parts else np.zeros(0, np.uint64),
                      "lo": np.concatenate([lo for _, lo in parts.values()]) if parts else np.zeros(0, np.uint64)})
    sink = io.BytesIO()
    pq.write_table(table, sink, write_statistics=False, compression="none")
    return sink.getvalue()


def read_states(blobs: list[bytes]) -> tuple[DedupState, Taken]:
    state, taken = DedupState(), Taken()
    for blob in blobs:
        table = pq.read_table(io.BytesIO(blob))
        kind, hi, lo = (table.column(c).to_numpy() for c in ("kind", "hi", "lo"))
        for k, target in ((KEPT_KEY, state.keys), (KEPT_URL, state.urls), (TAKEN_KEY, taken.keys),
                          (TAKEN_URL, taken.urls), (TAKEN_ID, taken.ids)):
            pick = kind == k
            target.add(hi[pick], lo[pick])
    return state, taken
