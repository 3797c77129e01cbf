"""The vectorised dedup: a 128-bit digest set, and the first-come rule resolved in rounds, against plain Python."""

import numpy as np
import pyarrow as pa
import pytest

from tasks.captions.dedup import (
    KEPT_KEY,
    TAKEN_ID,
    DedupState,
    DigestSet,
    digest_check,
    digests,
    greedy,
    key_digests,
    read_states,
    state_bytes,
)


def test_digest_set_agrees_with_a_python_set_through_growth():
    rng = np.random.default_rng(0)
    box, reference = DigestSet(capacity=8), set()
    for _ in range(12):
        hi = rng.integers(0, 2 ** 63, 500, dtype=np.uint64)
        hi[:50] = hi[0]  # the same upper half with different lower halves: still different digests
        lo = rng.integers(0, 2 ** 63, 500, dtype=np.uint64)
        fresh = np.array([(h, low) not in reference for h, low in zip(hi.tolist(), lo.tolist())])
        box.add(hi[fresh], lo[fresh])
        reference |= set(zip(hi[fresh].tolist(), lo[fresh].tolist()))
        probe_hi = np.concatenate([hi, rng.integers(0, 2 ** 63, 300, dtype=np.uint64), hi[:20]])
        probe_lo = np.concatenate([lo, rng.integers(0, 2 ** 63, 300, dtype=np.uint64), lo[:20] + np.uint64(1)])
        expected = [(h, low) in reference for h, low in zip(probe_hi.tolist(), probe_lo.tolist())]
        assert box.contains(probe_hi, probe_lo).tolist() == expected
    assert len(box) == len(reference) and 2 * len(box) <= len(box.table)
    assert set(zip(*(a.tolist() for a in box.arrays()))) == reference


def test_digests_are_stable_and_tell_strings_apart():
    import hashlib

    values = pa.array(["a cat", "a cat", "a dog", "", "café"], pa.large_string())
    for hi, lo in (digests(values), key_digests(values)):
        assert hi[0] == hi[1] and lo[0] == lo[1] and len({(h, low) for h, low in zip(hi, lo)}) == 4
    hi, lo = key_digests(values)  # a key's digest is its SHA-1's first 16 bytes (the caption id's first 8)
    assert [f"{h:016x}{low:016x}" for h, low in zip(hi.tolist(), lo.tolist())] == \
        [hashlib.sha1(v.encode()).hexdigest()[:32] for v in values.to_pylist()]
    assert digest_check()[0] == "sha1-keys/siphash-urls" and len(digest_check()) == 5  # kept in the ledger


def _sequential(keys, urls):
    """The row-by-row rule: keep a row when no kept row before has its key or URL."""
    seen_k, seen_u, out = set(), set(), []
    for k, u in zip(keys, urls):
        if k in seen_k:
            out.append("caption")
        elif u in seen_u:
            out.append("url")
        else:
            out.append("kept")
            seen_k.add(k)
            seen_u.add(u)
    return out


@pytest.mark.parametrize("max_rounds", [1, 8])
def test_greedy_rounds_give_the_row_by_row_answer_across_batches(max_rounds):
    rng = np.random.default_rng(max_rounds)
    for trial in range(20):
        n = int(rng.integers(1, 400))
        keys = rng.integers(0, max(2, n // (1 + trial % 4)), n)  # few distinct values: long chains
        urls = rng.integers(0, max(2, n // (1 + trial % 3)), n)
        if trial == 0:  # the worst chain: (k0,u0) (k1,u0) (k1,u1) (k2,u1) ...
            keys, urls = np.arange(n) // 2 + n, (np.arange(n) + 1) // 2
        expected = _sequential(keys.tolist(), urls.tolist())
        state, got = DedupState(), []
        cuts = sorted(set(rng.integers(0, n, 3).tolist()) | {0, n})
        for a, b in zip(cuts, cuts[1:]):
            z = np.zeros(b - a, np.uint64)
            kept, dup_caption, dup_url = greedy(keys[a:b].astype(np.uint64), z, urls[a:b].astype(np.uint64), z + 7,
                                                state.keys, state.urls, max_rounds=max_rounds)
            assert not (kept & dup_caption).any() and (kept | dup_caption | dup_url).all()
            got += ["kept" if k else "caption" if c else "url" for k, c in zip(kept, dup_caption)]
        assert got == expected, trial


def test_state_files_round_trip_by_kind():
    blob = state_bytes({KEPT_KEY: (np.array([1, 2], np.uint64), np.array([3, 4], np.uint64)),
                        TAKEN_ID: (np.array([9], np.uint64), np.array([0], np.uint64))})
    state, taken = read_states([blob, state_bytes({})])
    assert state.keys.contains(np.array([1, 2, 1], np.uint64), np.array([3, 4, 4], np.uint64)).tolist() == [True, True, False]
    assert len(state.urls) == 0 and len(taken.ids) == 1 and len(taken) == 1
