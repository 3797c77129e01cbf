"""Adaptive rounds, giving up, cohorts across triplets, and resume — pure planning, no models."""

import random

import pytest

from tasks.render.scheduling import RenderPlan, SamplingPolicy, TripletState
from tasks.render.seeds import sample_seeds

# which sample indexes pass, per triplet (everything else fails)
PASSES = {
    "a": {1, 5},  # 1 pass after round 0, 2 at the give-up boundary (6) -> satisfied at 6
    "b": set(),  # nothing -> gives up at 6 (give_up_after)
    "c": {7},  # passes only after the give-up point -> gave up at 6
    "d": {0, 2, 3},  # satisfied after round 0 (4)
    "e": {5, 13},  # 1 pass at the give-up point -> continues; 2 passes at 16 -> satisfied
    "f": {4},  # one pass, never a second -> exhausted at 20
}
EXPECTED = {
    "a": (6, "satisfied"),
    "b": (6, "gave_up"),
    "c": (6, "gave_up"),
    "d": (4, "satisfied"),
    "e": (16, "satisfied"),
    "f": (20, "exhausted"),
}
POLICY = SamplingPolicy(max_samples=20, round_size=4, target_passed=2, give_up_after=6)


def run_plan(plan: RenderPlan, size: int, limit: int | None = None) -> list[list[tuple[str, int]]]:
    """Render (with the PASSES oracle) cohort by cohort; return the cohorts as (caption_id, index)."""
    cohorts = []
    while (limit is None or len(cohorts) < limit) and (cohort := plan.next_cohort(size)):
        cohorts.append([(s.caption_id, s.index) for s in cohort])
        plan.record((s.caption_id, s.index, s.index in PASSES[s.caption_id]) for s in cohort)
    return cohorts


def test_round_boundaries_include_give_up_and_max():
    assert [POLICY.round_end(d) for d in (0, 4, 6, 8, 12, 16)] == [4, 6, 8, 12, 16, 20]
    assert SamplingPolicy(max_samples=10, round_size=4).round_end(8) == 10
    assert SamplingPolicy(max_samples=100).round_end(0) == 100  # the reference: one round of everything
    with pytest.raises(ValueError):
        SamplingPolicy(max_samples=10, round_size=0)


def test_decide():
    assert POLICY.decide(4, 2) == "satisfied" and POLICY.decide(20, 3) == "satisfied"
    assert POLICY.decide(6, 0) == "gave_up" and POLICY.decide(6, 1) is None
    assert POLICY.decide(20, 1) == "exhausted" and POLICY.decide(4, 1) is None
    reference = SamplingPolicy(max_samples=100)
    assert reference.decide(100, 50) == "exhausted" and reference.decide(99, 0) is None


@pytest.mark.parametrize("size", [1, 3, 4, 7, 64])
def test_adaptive_stopping_and_give_up_counts(size):
    plan = RenderPlan(sorted(PASSES), POLICY)
    cohorts = run_plan(plan, size)
    assert plan.finished and all(0 < len(c) <= size for c in cohorts)
    for state in plan.triplets:
        drawn, status = EXPECTED[state.caption_id]
        assert (state.drawn, state.status) == (drawn, status), state.caption_id
        assert sorted(state.results) == list(range(drawn))  # whole rounds, seed order, nothing skipped
    assert plan.status_counts() == {"satisfied": 3, "gave_up": 2, "exhausted": 1}
    rendered = [item for c in cohorts for item in c]
    assert len(rendered) == len(set(rendered)) == sum(d for d, _ in EXPECTED.values())


def test_cohorts_mix_triplets_in_order():
    plan = RenderPlan(sorted(PASSES), POLICY)
    first = plan.next_cohort(10)
    assert [(s.caption_id, s.index) for s in first] == [("a", i) for i in range(4)] + [
        ("b", i) for i in range(4)
    ] + [("c", 0), ("c", 1)]
    assert {s.round for s in first} == {0}
    assert plan.next_cohort(10) == first  # nothing recorded (e.g. an out-of-memory retry): the same cohort


def test_reference_policy_is_all_samples_in_order():
    plan = RenderPlan(["x", "y"], SamplingPolicy(max_samples=5))
    cohorts = [[(s.caption_id, s.index) for s in c] for c in [plan.next_cohort(4)]]
    assert cohorts[0] == [("x", 0), ("x", 1), ("x", 2), ("x", 3)]
    plan.record((cid, i, False) for cid, i in cohorts[0])
    assert [(s.caption_id, s.index) for s in plan.next_cohort(4)] == [("x", 4), ("y", 0), ("y", 1), ("y", 2)]


@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_resume_replays_to_the_same_cohorts(stop_after):
    full = run_plan(RenderPlan(sorted(PASSES), POLICY), 5)
    partial = RenderPlan(sorted(PASSES), POLICY)
    done = run_plan(partial, 5, limit=stop_after)
    rows = [(cid, i, i in PASSES[cid]) for cohort in done for cid, i in cohort]
    random.Random(stop_after).shuffle(rows)  # chunks are read back by file name, not in the order written
    resumed = RenderPlan(sorted(PASSES), POLICY)  # a new process: state rebuilt from the written rows only
    resumed.record(rows + rows[:3])  # a row seen twice changes nothing
    assert done + run_plan(resumed, 5) == full


def test_seeds_are_the_stable_sample_seeds():
    state = TripletState("0123456789abcdef", 0, POLICY)
    assert [state.seed(i) for i in range(10)] == sample_seeds("0123456789abcdef", 10)
    assert state.seed(3) == sample_seeds("0123456789abcdef", 4)[3]
    with pytest.raises(ValueError):
        state.record(20, True)
    with pytest.raises(ValueError):
        RenderPlan(["a", "a"], POLICY)
