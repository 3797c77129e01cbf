"""The seeded sample: every usable caption's draw, and the bounded pool a generation takes from.

``priority(seed, caption_id)`` is a pure function of the caption's stable id (SHA-1 of seed and id),
so the sample never depends on file or row order. While the sources stream by, :class:`Pool` keeps
only what a generation may take — every candidate under the threshold the ledger reached, and the
``room`` lowest draws above it (ties kept: the caption id decides) — so memory follows the number of
captions asked for, not the size of the source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tasks.captions.laion import Kept


def priority(seed: int, caption_id: str) -> float:
    """The caption's seeded draw in [0, 1): the lower, the earlier it is taken."""
    return int(hashlib.sha1(f"{seed}:{caption_id}".encode()).hexdigest()[:16], 16) / 2.0 ** 64


def priorities(seed: int, ids_hex: np.ndarray) -> np.ndarray:
    """:func:`priority` of many caption ids given as (n, 16) hex characters."""
    head = np.frombuffer(f"{seed}:".encode(), np.uint8)
    msg = np.empty((len(ids_hex), len(head) + 16), np.uint8)
    msg[:, :len(head)], msg[:, len(head):] = head, ids_hex
    joined = b"".join([hashlib.sha1(m).digest()[:8] for m in msg.view(f"S{msg.shape[1]}").ravel().tolist()])
    return np.frombuffer(joined, ">u8").astype(np.uint64).astype(np.float64) / 2.0 ** 64


@dataclass
class Candidates:
    rows: Kept
    prio: np.ndarray

    @staticmethod
    def concat(parts: list[Candidates]) -> Candidates:
        return Candidates(Kept.concat([p.rows for p in parts]), np.concatenate([p.prio for p in parts]))

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.rows.take(idx), self.prio[idx])


class Pool:
    """The candidates a generation may take, bounded: all under ``threshold``, and the ``room`` lowest above."""

    def __init__(self, threshold: float, room: int):
        self.threshold, self.room = threshold, room
        self.parts: list[Candidates] = []
        self.size = 0

    def add(self, part: Candidates) -> None:
        if len(part.prio):
            self.parts.append(part)
            self.size += len(part.prio)
        if self.size > 2 * self.room + 2 ** 16:
            self._prune()

    def _prune(self) -> None:
        every = Candidates.concat(self.parts)
        above = np.flatnonzero(every.prio >= self.threshold)
        keep = np.flatnonzero(every.prio < self.threshold)
        if len(above) > self.room:
            cut = np.partition(every.prio[above], self.room - 1)[self.room - 1] if self.room else -1.0
            above = above[every.prio[above] <= cut]  # ties at the cut stay: the caption id decides later
        self.parts = [every.take(np.sort(np.concatenate([keep, above])))]
        self.size = len(self.parts[0].prio)

    def select(self, total: int, target: int) -> tuple[Candidates | None, np.ndarray, float]:
        """The candidates, which of them are taken (under the threshold, then the next ones up to ``target``),
        and the new threshold."""
        threshold = self.threshold
        if not self.parts:
            return None, np.zeros(0, np.int64), (1.0 if target > total else threshold)
        every = Candidates.concat(self.parts)
        order = np.lexsort((every.rows.ids, every.prio))  # (priority, caption id)
        below = order[every.prio[order] < threshold]
        rest = order[every.prio[order] >= threshold]
        need = max(0, target - total - len(below))
        more = rest[:need]
        if need and len(more) < need:
            threshold = 1.0  # the source ran out: from now on every new caption is taken
        elif len(more):
            threshold = float(every.prio[more[-1]]) + 2.0 ** -64  # the last one taken is under it
        return every, np.concatenate([below, more]), threshold
