"""The stable seeds of a triplet's samples (torch-free: the sampling policy and the estimate use them).

Sample ``i`` of triplet ``caption_id`` has the seed ``sha256(f"{base_seed}:{caption_id}:{i}")`` (its first 32
bits), whatever the batching, the partitioning or the run: a re-run reproduces it exactly. What a seed
draws (p, the guidance scale, the noise) is :mod:`tasks.render.sampling`.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 32


def sample_seed(caption_id: str, index: int, base_seed: int = 0) -> int:
    """The stable 32-bit seed of sample ``index`` of triplet ``caption_id``."""
    digest = hashlib.sha256(f"{base_seed}:{caption_id}:{index}".encode()).digest()
    return int.from_bytes(digest[: SEED_BITS // 8], "big")


def sample_seeds(caption_id: str, n: int, base_seed: int = 0) -> list[int]:
    """``n`` stable 32-bit seeds for one triplet: sha256 of ``f"{base_seed}:{caption_id}:{i}"``.

    Seeds can repeat only by a 32-bit hash collision (about n²/2³³); callers that need distinct
    seeds (the reference skips a seed it already rendered) should drop duplicates.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [sample_seed(caption_id, i, base_seed) for i in range(n)]
