"""Global first-come dedup of captions and URLs, vectorised over batches, with a compact state.

A row is kept when no earlier kept row has its dedup key or its URL (the greedy, file-then-row order
rule of :mod:`tasks.captions.laion`). Keys and URLs are compared by 128-bit digests (a key: the first
16 bytes of its SHA-1, which for most captions is the hash their id is cut from anyway; a URL: two
SipHash-2-4 values from ``pandas.util.hash_array`` with fixed keys; a collision between two different
strings is a 1-in-10^24 event at LAION's size), so the state between batches, and between ledger
generations, is 16 bytes per key instead of the strings: :class:`DigestSet` is an open-addressing hash set over
NumPy arrays. Within a batch the greedy rule is resolved in rounds (the first row of every key and
URL among the undecided rows is kept, the rows that share a key or URL with a kept row are dropped,
repeat), which ends in a few rounds on real data; long chains finish row by row.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_KEYS = ("editforge-dedup1", "editforge-dedup2")  # SipHash keys (16 bytes each): part of the ledger format
DIGEST_CHECK = "editforge"  # the record keeps digests of it: a changed hash function is noticed
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def sha1_digests(values: pa.Array) -> np.ndarray:
    """SHA-1 of every string (UTF-8, no nulls), as an (n, 20) uint8 array."""
    joined = b"".join([hashlib.sha1(b).digest() for b in values.cast(pa.large_binary()).to_pylist()])
    return np.frombuffer(joined, np.uint8).reshape(-1, 20)


def halves(digest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first 16 bytes of (n, >=16) uint8 digests as two big-endian uint64 arrays."""
    head = np.ascontiguousarray(digest[:, :16]).view(">u8")
    return head[:, 0].astype(np.uint64), head[:, 1].astype(np.uint64)


def hex16(digest: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each digest as 16 lowercase hex characters: an (n, 16) uint8 array."""
    head = digest[:, :8]
    out = np.empty((len(digest), 16), np.uint8)
    out[:, 0::2], out[:, 1::2] = _HEX[head >> 4], _HEX[head & 15]
    return out


def key_digests(keys: pa.Array, sha1: np.ndarray | None = None, same: np.ndarray | None = None):
    """Digests of dedup keys: SHA-1 halves; ``sha1`` holds rows already hashed where ``same`` is true."""
    if sha1 is None:
        return halves(sha1_digests(keys)) if len(keys) else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    hi, lo = halves(sha1)
    other = np.flatnonzero(~same)
    if len(other):
        hi[other], lo[other] = halves(sha1_digests(keys.take(pa.array(other, pa.int64()))))
    return hi, lo


def digests(values: pa.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """128-bit digests of URLs (any strings, no nulls) as two uint64 arrays."""
    obj = values.to_numpy(zero_copy_only=False) if isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    obj = np.asarray(obj, dtype=object)
    if not len(obj):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return (pd.util.hash_array(obj, hash_key=_KEYS[0], categorize=False),
            pd.util.hash_array(obj, hash_key=_KEYS[1], categorize=False))


def digest_check() -> list[str]:
    """What the state files' digests are: a changed function (or library) makes the next read a full one."""
    check = pa.array([DIGEST_CHECK], pa.large_string())
    return ["sha1-keys/siphash-urls", *(f"{int(v[0]):016x}" for v in (*key_digests(check), *digests(check)))]


class DigestSet:
    """A set of 128-bit digests with vectorised ``contains`` and ``add``: open addressing with linear
    probing in one (capacity, 2) uint64 table (a probe is one cache line), load at most 1/2, (0, 0)
    marking an empty slot (the digest (0, 0) itself is kept aside)."""

    def __init__(self, capacity: int = 1 << 12):
        self.size, self.zero = 0, False
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.table = np.zeros((capacity, 2), np.uint64)
        self.mask = capacity - 1

    def __len__(self) -> int:
        return self.size

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hi), bool)
        zero = (hi == 0) & (lo == 0)
        found[zero] = self.zero
        idx = np.flatnonzero(~zero)
        slot = (hi[idx] & np.uint64(self.mask)).astype(np.int64)
        while len(idx):
            cell = np.take(self.table, slot, axis=0)  # (much faster than fancy indexing of rows)
            match = (cell[:, 0] == hi[idx]) & (cell[:, 1] == lo[idx])
            found[idx[match]] = True
            go_on = ~match & ((cell[:, 0] != 0) | (cell[:, 1] != 0))
            idx, slot = idx[go_on], (slot[go_on] + 1) & self.mask
        return found

    def reserve(self, count: int) -> None:
        """Room for ``count`` digests in all without growing again (one rehash now instead of several)."""
        capacity = len(self.table)
        while 2 * count > capacity:
            capacity *= 2
        if capacity > len(self.table):
            old = self.table[(self.table[:, 0] != 0) | (self.table[:, 1] != 0)]
            self._alloc(capacity)
            self._insert(old[:, 0], old[:, 1])

    def add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        """Insert digests that are distinct and not in the set yet."""
        zero = (hi == 0) & (lo == 0)
        if zero.any():
            self.zero, hi, lo = True, hi[~zero], lo[~zero]
        self.reserve(self.size + len(hi))
        self._insert(hi, lo)
        self.size += len(hi) + int(zero.any())

    def _insert(self, hi: np.ndarray, lo: np.ndarray) -> None:
        idx = np.arange(len(hi))
        slot = (hi & np.uint64(self.mask)).astype(np.int64)
        while len(idx):
            cell = np.take(self.table, slot, axis=0)
            free = np.flatnonzero((cell[:, 0] == 0) & (cell[:, 1] == 0))
            free = free[~pd.Series(slot[free]).duplicated().to_numpy()]  # one winner per free slot
            flat, at = self.table.reshape(-1), 2 * slot[free]
            flat[at], flat[at + 1] = hi[idx[free]], lo[idx[free]]
            rest = np.ones(len(idx), bool)
            rest[free] = False
            idx, slot = idx[rest], (slot[rest] + 1) & self.mask  # every slot tried is taken now

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.table[(self.table[:, 0] != 0) | (self.table[:, 1] != 0)]
        zero = np.zeros(int(self.zero), np.uint64)
        return np.concatenate([used[:, 0], zero]), np.concatenate([used[:, 1], zero])


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

    def reserve(self, count: int) -> None:
        self.keys.reserve(count)
        self.urls.reserve(count)


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
