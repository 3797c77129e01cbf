"""Which samples to render next: per-triplet rounds (adaptive sampling, giving up) and cross-triplet cohorts.

The reference renders exactly 100 samples per triplet and keeps at most 4. Here a triplet's samples
are drawn in **rounds** of ``round_size`` (sample indexes ``0 .. max_samples - 1``, each with its
stable seed); when a round is complete the triplet's own results so far decide what happens next:

- ``satisfied``: at least ``target_passed`` samples passed the filter (adaptive sampling);
- ``gave_up``: ``give_up_after`` samples were drawn and none passed;
- ``exhausted``: all ``max_samples`` were drawn;
- otherwise the next round opens.

``give_up_after`` and ``max_samples`` are always round boundaries, so the counts are exact. With
neither switch on there is a single round of ``max_samples`` (the reference). Decisions use only the
triplet's own samples, in sample-index order, and each sample is a pure function of (triplet, seed):
the set of rows a triplet ends with does not depend on batching, on the other triplets, or on where
a run was interrupted — a resumed run recomputes every triplet's state from the rows already written
(:meth:`RenderPlan.record`) and continues exactly where an uninterrupted run would be.

A **cohort** is one UNet batch: :meth:`RenderPlan.next_cohort` fills it with the open rounds' pending
samples, triplets in ``caption_id`` order, sample indexes ascending — several triplets share a batch
whenever a round is smaller than the batch. The composition is a function of the recorded rows and
the batch size only, so a resumed run forms the same cohorts as an uninterrupted one.

**p-branching** (``group`` = K > 1, ``render.p_branches``): sample index ``j`` is branch ``j % K`` of the
triplet's seed number ``j // K``; the K branches of a seed are samples like any other (they count in
rounds, ``max_samples`` and ``give_up_after``, which must be multiples of K so that a round holds whole
seeds) and a cohort never splits a seed (one seed's branches render as one tree, and its UNet calls
depend on that): a cohort takes whole seeds up to ``size`` samples, or one seed when K > ``size``.
The passes a decision counts are capped at ``per_group`` per seed (``render.keep_per_seed``: how many
of a seed's pairs may be kept), so adaptive sampling stops when enough *keepable* pairs passed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.render.seeds import sample_seed

if TYPE_CHECKING:
    from tasks.common.config import PipelineConfig

STATUSES = ("satisfied", "gave_up", "exhausted")


@dataclass(frozen=True)
class SamplingPolicy:
    """How many samples a triplet gets (see the module doc); ``None`` disables a rule."""

    max_samples: int
    round_size: int | None = None
    target_passed: int | None = None
    give_up_after: int | None = None
    group: int = 1
    per_group: int | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> SamplingPolicy:
        """The plan's rules from the config: one round of ``samples_per_triplet`` unless a saver is on."""
        r = cfg.render
        a = r.adaptive
        rounds = a.enabled or a.give_up_after is not None
        return cls(
            max_samples=r.samples_per_triplet,
            round_size=a.round_size if rounds else None,
            target_passed=(a.target_passed or r.keep.top_k) if a.enabled else None,
            give_up_after=a.give_up_after,
            group=r.p_branches,
            per_group=r.keep_per_seed if r.p_branches > 1 else None,
        )

    def settings(self) -> dict[str, Any]:
        """The policy as the render settings it was made of (those a setting that is off leaves out: None)."""
        return {
            "render.samples_per_triplet": self.max_samples,
            "render.adaptive.round_size": self.round_size,
            "render.adaptive.target_passed": self.target_passed,
            "render.adaptive.give_up_after": self.give_up_after,
            "render.p_branches": self.group,
            "render.keep_per_seed": self.per_group,
        }

    def __post_init__(self) -> None:
        for name in ("max_samples", "round_size", "target_passed", "give_up_after", "group", "per_group"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        for name in ("max_samples", "round_size", "give_up_after"):
            value = getattr(self, name)
            if value is not None and value % self.group:
                raise ValueError(f"{name} {value} is not a multiple of the {self.group} branches of a seed")

    def counted(self, results: dict[int, bool], end: int) -> int:
        """Passes among samples ``0 .. end - 1``, at most ``per_group`` per seed (group of ``group`` samples)."""
        if self.group == 1 or self.per_group is None:
            return sum(results.get(i, False) for i in range(end))
        per_seed: dict[int, int] = {}
        for i in range(end):
            if results.get(i, False):
                per_seed[i // self.group] = per_seed.get(i // self.group, 0) + 1
        return sum(min(n, self.per_group) for n in per_seed.values())

    def round_end(self, done: int) -> int:
        """The end (exclusive sample index) of the round that starts at ``done``."""
        if self.round_size is None:
            end = self.max_samples
        else:
            end = min(self.max_samples, (done // self.round_size + 1) * self.round_size)
        if self.give_up_after is not None and done < self.give_up_after < end:
            end = self.give_up_after
        return end

    def decide(self, drawn: int, passed: int) -> str | None:
        """The triplet's status after ``drawn`` samples of which ``passed`` passed, at a round end."""
        if self.target_passed is not None and passed >= self.target_passed:
            return "satisfied"
        if self.give_up_after is not None and passed == 0 and drawn >= self.give_up_after:
            return "gave_up"
        if drawn >= self.max_samples:
            return "exhausted"
        return None


@dataclass(frozen=True)
class PlannedSample:
    """One sample to render: triplet position in the plan, sample index, its seed and round number."""

    triplet: int
    caption_id: str
    index: int
    seed: int
    round: int
    branch: int = 0


@dataclass
class TripletState:
    """What was done for one triplet: sample index -> passed, the open round, the final status."""

    caption_id: str
    base_seed: int
    policy: SamplingPolicy
    results: dict[int, bool] = field(default_factory=dict)
    round_start: int = 0
    round_end: int = 0
    round: int = 0
    status: str | None = None
    _seeds: list[int] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)
    _draws: int = 0
    _in_round: int = 0

    def __post_init__(self) -> None:
        self.round_end = self.policy.round_end(0)

    def seed(self, index: int) -> int:
        """Seed of sample ``index``: the ``index // group``-th distinct value of ``sample_seed(caption_id, j)``
        (``group``: the p branches of a seed; 1 without branching).

        Distinct because the reference never renders a seed twice for a triplet (a 32-bit collision
        is rare, but it would duplicate a sample key).
        """
        index //= self.policy.group
        while len(self._seeds) <= index:
            candidate = sample_seed(self.caption_id, self._draws, self.base_seed)
            self._draws += 1
            if candidate not in self._seen:
                self._seen.add(candidate)
                self._seeds.append(candidate)
        return self._seeds[index]

    @property
    def drawn(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(self.results.values())

    def pending(self) -> list[int]:
        """Sample indexes of the open round not rendered yet (empty when the triplet is finished)."""
        if self.status is not None:
            return []
        return [i for i in range(self.round_start, self.round_end) if i not in self.results]

    def record(self, index: int, passed: bool) -> None:
        """Add one sample's result, then close every complete round (deciding after each).

        Results may arrive in any order (checkpoint chunks are read back by name, not by time).
        """
        if not 0 <= index < self.policy.max_samples:
            raise ValueError(
                f"{self.caption_id}: sample index {index} outside 0..{self.policy.max_samples - 1}"
            )
        if index in self.results:
            return
        self.results[index] = bool(passed)
        if self.round_start <= index < self.round_end:
            self._in_round += 1
            self._advance()

    def _advance(self) -> None:
        while self.status is None and self._in_round == self.round_end - self.round_start:
            done = self.round_end
            self.status = self.policy.decide(done, self.policy.counted(self.results, done))
            if self.status is None:
                self.round_start, self.round_end, self.round = (
                    done,
                    self.policy.round_end(done),
                    self.round + 1,
                )
                self._in_round = sum(1 for i in range(self.round_start, self.round_end) if i in self.results)


class RenderPlan:
    """The per-triplet states of one partition and the cohorts (UNet batches) still to render."""

    def __init__(self, caption_ids: Sequence[str], policy: SamplingPolicy, base_seed: int = 0):
        if len(set(caption_ids)) != len(caption_ids):
            raise ValueError("caption_ids must be distinct")
        self.policy = policy
        self.triplets = [TripletState(cid, base_seed, policy) for cid in caption_ids]
        self._by_id = {cid: i for i, cid in enumerate(caption_ids)}
        self._first_open = 0

    def record(self, results: Iterable[tuple[str, int, bool]]) -> None:
        """Record (caption_id, sample index, passed) results, e.g. the rows of earlier chunks."""
        for caption_id, index, passed in results:
            self.triplets[self._by_id[caption_id]].record(int(index), bool(passed))

    def next_cohort(self, size: int) -> list[PlannedSample]:
        """Up to ``size`` pending samples of the open rounds, triplets in order (empty when all finished);
        with p-branching whole seeds only (one seed's branches even when they are more than ``size``)."""
        if size < 1:
            raise ValueError(f"cohort size must be >= 1, got {size}")
        while self._first_open < len(self.triplets) and self.triplets[self._first_open].status is not None:
            self._first_open += 1
        group = self.policy.group
        cohort: list[PlannedSample] = []
        for t in range(self._first_open, len(self.triplets)):
            state = self.triplets[t]
            pending = state.pending()
            for start in range(0, len(pending)):
                index = pending[start]
                if group > 1 and (start == 0 or index // group != pending[start - 1] // group):
                    seed_rows = sum(1 for j in pending[start:] if j // group == index // group)
                    if cohort and len(cohort) + seed_rows > size:
                        return cohort
                cohort.append(
                    PlannedSample(t, state.caption_id, index, state.seed(index), state.round, index % group)
                )
                if len(cohort) >= size and (
                    group == 1 or start + 1 == len(pending) or pending[start + 1] // group != index // group
                ):
                    return cohort
        return cohort

    @property
    def finished(self) -> bool:
        return all(t.status is not None for t in self.triplets)

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for t in self.triplets:
            if t.status is not None:
                counts[t.status] += 1
        return counts
