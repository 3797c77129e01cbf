"""p-branching in the denoising loop: a branched sample is the independent sample with its seed, cfg and p;
UNet-call accounting; early rejection of single branches; the stratified p draws; the plan's seed groups."""

import dataclasses

import pytest
import torch

from tasks.common.models import load_diffusion, make_scheduler
from tasks.render.attention import AttentionControl
from tasks.render.early import EarlyRejection
from tasks.render.pairs import PairRequest, RenderSettings, render_pairs
from tasks.render.sampling import sample_params
from tasks.render.scheduling import RenderPlan, SamplingPolicy

STEPS, SIZE, K = 8, 64, 4
ATOL = 1e-4  # the acceptance tolerance (CPU float32); the measured error is ~1e-6, checked against siblings below
CAT = ("a photo of a cat on a sofa", "a photo of a dog on a sofa")
HOUSE = ("a red house by the sea", "a red house by the sea at night")


def branches(seed, captions=CAT, k=K, name="cat"):
    return [PairRequest(f"{name}{b}", *captions, seed, b, k) for b in range(k)]


def settings(**kw):
    # p over [0, 1] and a high cfg: the stop steps spread out and sharing moves the after image visibly
    return RenderSettings(
        **{
            "steps": STEPS,
            "height": SIZE,
            "width": SIZE,
            "p_range": (0.0, 1.0),
            "cfg_range": (15.0, 15.0),
            **kw,
        }
    )


def stops(batch, steps=STEPS):
    return AttentionControl.for_samples([p.p2p_p for p in batch.params]).stop_steps(steps)


def gap(a, b):
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def components():
    return load_diffusion("tiny")


# ---- the draws ----


def test_branch_params_are_stratified_from_the_seed():
    for seed in (0, 1234, 2**32 - 5):
        plain = sample_params(seed, (7.5, 15), (0.1, 0.9))
        assert sample_params(seed, (7.5, 15), (0.1, 0.9), 0, 1) == plain  # K = 1 is the reference's draw
        ps = [sample_params(seed, (7.5, 15), (0.1, 0.9), b, 4) for b in range(4)]
        assert all(p.cfg_scale == plain.cfg_scale and p.seed == seed for p in ps)  # one cfg per seed
        for b, p in enumerate(ps):
            assert 0.1 + 0.2 * b <= p.p2p_p <= 0.1 + 0.2 * (b + 1) + 1e-12
        assert ps[0].p2p_p == pytest.approx(0.1 + (plain.p2p_p - 0.1) / 4)  # branch 0 reuses the first draw
        assert ps == [sample_params(seed, (7.5, 15), (0.1, 0.9), b, 4) for b in range(4)]
    with pytest.raises(ValueError, match="branch 4"):
        sample_params(0, branch=4, branches=4)


# ---- the key property: a branch is the independent render of its (seed, cfg, p) ----


@pytest.mark.parametrize(
    "scheduler, guidance", [("euler_ancestral", True), ("euler_ancestral", False), ("dpmpp_2m", True)]
)
def test_a_branched_sample_equals_the_independent_sample_with_its_seed_cfg_and_p(
    components, scheduler, guidance
):
    comps = (
        components
        if scheduler == "euler_ancestral"
        else dataclasses.replace(components, scheduler=make_scheduler(scheduler, components.source))
    )
    s = settings(guidance=guidance)
    requests = [*branches(1234), PairRequest("house", *HOUSE, 77), *branches(99, HOUSE, name="h")]
    tree = render_pairs(comps, requests, s)
    alone = [render_pairs(comps, [r], s) for r in requests]  # each one its own batch: no branching at all
    flat = render_pairs(comps, requests, dataclasses.replace(s, branching=False))  # same samples, ungrouped
    assert len(set(stops(tree)[:K])) == K, "the test needs distinct stop steps"
    errors, noise = [], []
    for i, one in enumerate(alone):
        assert tree.params[i] == one.params[0] == flat.params[i]
        errors.append(max(gap(tree.before[i], one.before[0]), gap(tree.after[i], one.after[0])))
        noise.append(max(gap(flat.before[i], one.before[0]), gap(flat.after[i], one.after[0])))
        assert errors[-1] < ATOL, (i, errors[-1])
    # branching adds nothing beyond what batching itself does (float reassociation, ~4e-6 here)
    assert max(errors) <= 2 * max(noise) + 1e-6, (errors, noise)
    if guidance:  # discriminative: a branch is far closer to its own render than to a sibling 2+ steps apart
        st = stops(tree)
        for b in range(K):
            for c in range(K):
                if abs(st[b] - st[c]) >= 2:
                    assert errors[b] < gap(alone[b].after[0], alone[c].after[0]) / 4, (b, c, st)
    assert gap(tree.before[0], tree.before[K - 1]) == 0  # one before image for the seed
    assert tree.unet_calls < flat.unet_calls == len(requests) * STEPS


def test_branches_with_one_stop_step_share_one_lane(components):
    """Few steps: two branches can stop sharing at the same step; they are one trajectory, billed once."""
    s = settings(steps=3)
    tree = render_pairs(components, branches(1234), s)
    st = stops(tree, 3)
    assert len(set(st)) < K
    for b in range(K):
        twins = [c for c in range(K) if st[c] == st[b]]
        assert all(torch.equal(tree.after[c], tree.after[twins[0]]) for c in twins)
        assert [tree.unet_steps[c] for c in twins[1:]] == [0] * (len(twins) - 1)
        assert gap(tree.after[b], render_pairs(components, [branches(1234)[b]], s).after[0]) < ATOL


# ---- UNet calls ----


def unet_rows(components):
    seen = []
    return seen, components.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))


@pytest.mark.parametrize("guidance", [True, False])
def test_unet_call_accounting(components, guidance):
    """A seed's branches cost n (pair: before + trunk, billed to the branch that stops last) + sum over
    the others of (n - stop) sample-steps; images count each UNet row exactly (pairs 4, solo rows 2 per step)."""
    halves = 2 if guidance else 1
    requests = [*branches(1234), *branches(5, HOUSE, name="h"), PairRequest("plain", *CAT, 31)]
    seen, handle = unet_rows(components)
    try:
        tree = render_pairs(components, requests, settings(guidance=guidance))
    finally:
        handle.remove()
    assert sum(seen) == sum(tree.unet_images)  # every image row of every UNet call is billed once
    st = stops(tree)
    for group in (range(0, K), range(K, 2 * K)):
        primary = max(group, key=lambda i: (st[i], -i))
        for i in group:
            own = STEPS if i == primary else STEPS - st[i]
            assert tree.unet_steps[i] == own
            assert tree.unet_images[i] == (2 * halves * STEPS if i == primary else halves * own)
        assert sum(tree.unet_steps[i] for i in group) == STEPS + sum(
            STEPS - st[i] for i in group if i != primary
        )
    assert tree.unet_steps[-1] == STEPS and tree.unet_images[-1] == 2 * halves * STEPS  # a plain sample
    # against the same samples rendered independently
    seen.clear()
    handle = components.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        flat = render_pairs(components, requests, settings(guidance=guidance, branching=False))
    finally:
        handle.remove()
    assert flat.unet_steps == [STEPS] * len(requests) and sum(seen) == sum(flat.unet_images)
    assert sum(tree.unet_images) < sum(flat.unet_images)


# ---- early rejection drops single branches ----


class ContentJudge:
    """Rejects a preview pair iff its after image is within 1e-5 of one of ``targets`` (a function of the
    images only, as CLIP is: the same decision for the same trajectory, in any batch)."""

    def __init__(self, targets=()):
        self.targets, self.seen = list(targets), []

    def __call__(self, indices, before, after):
        self.seen.extend(after.clone())
        keep = torch.tensor([all(gap(a, t) > 1e-5 for t in self.targets) for a in after])
        metric = after.mean(dim=(1, 2, 3))
        return keep, {k: metric for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")}


@pytest.mark.parametrize("which", ["trunk", "forked"])
def test_early_rejection_drops_branches_individually(components, which):
    """At the scoring step the trunk stands for every branch not forked yet; a forked branch is judged alone.
    Dropping the trunk while a forked branch lives keeps the before image (the forked branch takes the pair)."""
    after = 4
    requests = [*branches(1234), PairRequest("plain", *HOUSE, 77)]
    probe = ContentJudge()
    render_pairs(components, requests, settings(), early=EarlyRejection(after, probe))
    full = render_pairs(components, requests, settings())
    st = stops(full)
    forked = [b for b in range(K) if st[b] < after]
    riding = [b for b in range(K) if st[b] >= after]
    assert forked and riding, st
    # the probe saw one preview per lane: the trunk (first of the group), the forked branches, the plain one
    target = probe.seen[0] if which == "trunk" else probe.seen[1]
    judge = ContentJudge([target])
    seen, handle = unet_rows(components)
    try:
        tree = render_pairs(components, requests, settings(), early=EarlyRejection(after, judge))
    finally:
        handle.remove()
    dropped = riding if which == "trunk" else [forked[0]]
    assert [i for i, r in enumerate(tree.early_rejected) if r] == dropped
    for i, r in enumerate(requests):  # each decision and image as the sample's own independent render
        one = render_pairs(components, [r], settings(), early=EarlyRejection(after, ContentJudge([target])))
        assert one.early_rejected[0] == tree.early_rejected[i]
        assert float(tree.early_metrics["clip_sim_dir"][i]) == pytest.approx(
            float(one.early_metrics["clip_sim_dir"][0]), abs=1e-6
        )
        if not one.early_rejected[0]:
            assert gap(tree.after[i], one.after[0]) < ATOL and gap(tree.before[i], one.before[0]) < ATOL
            assert gap(tree.after[i], full.after[i]) < ATOL
        else:
            assert torch.isnan(tree.after[i]).all()
    assert sum(seen) == sum(tree.unet_images)
    primary = max(range(K), key=lambda i: (st[i], -i))  # the branch that stops last: the trunk is its row
    if which == "trunk":
        first = forked[0]  # takes the pair's place: solo steps until the drop, pair steps after
        assert tree.unet_steps[primary] == after and all(
            tree.unet_steps[b] == 0 for b in riding if b != primary
        )
        assert tree.unet_steps[first] == STEPS - st[first]
        assert tree.unet_images[first] == 2 * (after - st[first]) + 4 * (STEPS - after)
    else:
        assert tree.unet_steps[forked[0]] == after - st[forked[0]] and tree.unet_steps[primary] == STEPS


# ---- the plan: seed groups ----


def test_the_plan_keeps_a_seeds_branches_together_and_caps_passes_per_seed():
    policy = SamplingPolicy(max_samples=8, round_size=4, target_passed=2, group=2, per_group=1)
    plan = RenderPlan(["a", "b"], policy)
    cohort = plan.next_cohort(3)  # 3 samples asked: whole seeds only, so 2
    assert [(s.caption_id, s.index, s.branch) for s in cohort] == [("a", 0, 0), ("a", 1, 1)]
    assert cohort[0].seed == cohort[1].seed != plan.triplets[0].seed(2)
    assert len(plan.next_cohort(1)) == 2  # a seed is never split, even below its size
    assert [s.index for s in plan.next_cohort(5)] == [0, 1, 2, 3]
    # two passes from one seed count once: the round of 4 does not satisfy target 2
    plan.record([("a", 0, True), ("a", 1, True), ("a", 2, False), ("a", 3, False)])
    assert plan.triplets[0].status is None and plan.triplets[0].round_start == 4
    plan.record([("a", 4, True), ("a", 5, False), ("a", 6, False), ("a", 7, False)])
    assert plan.triplets[0].status == "satisfied"
    uncapped = RenderPlan(["a"], dataclasses.replace(policy, per_group=None))
    uncapped.record([("a", 0, True), ("a", 1, True), ("a", 2, False), ("a", 3, False)])
    assert uncapped.triplets[0].status == "satisfied"
    with pytest.raises(ValueError, match="multiple"):
        SamplingPolicy(max_samples=10, round_size=4, group=4)


def test_branching_with_sdxl_conditioning_and_installed_processors(components):
    """SDXL's pooled text and time ids follow the forked rows; the processors installed once (the
    torch.compile path) re-lay their control in place as the branches fork."""
    from tasks.render.attention import remove_attention

    sdxl = load_diffusion("tiny-sdxl")
    requests = [*branches(1234), PairRequest("plain", *HOUSE, 5)]
    tree = render_pairs(sdxl, requests, settings(steps=6))
    for i, r in enumerate(requests):
        assert gap(tree.after[i], render_pairs(sdxl, [r], settings(steps=6)).after[0]) < ATOL
    try:
        installed = render_pairs(components, requests, settings(), persistent_attention=True)
        again = render_pairs(components, requests[::-1], settings(), persistent_attention=True)
    finally:
        remove_attention(components.unet)
    plain = render_pairs(components, requests, settings())
    assert torch.equal(installed.after, plain.after) and gap(again.after.flip(0), plain.after) < ATOL
