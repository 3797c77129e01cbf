import copy
import dataclasses
import warnings

import pytest
import torch

from tasks.common.models import load_diffusion, make_scheduler
from tasks.render.pairs import PairRequest, RenderSettings, encode_prompts, render_pairs

pytestmark = pytest.mark.component

STEPS = 6
SIZE = 64
ATOL = 2e-5

REQUESTS = [
    PairRequest("cat", "a photo of a cat on a sofa", "a photo of a dog on a sofa", 1234),
    PairRequest("house", "a red house by the sea", "a red house by the sea at night", 77),
    PairRequest("girl", "portrait of a girl", "portrait of a girl wearing a hat", 2**32 - 5),
]


@pytest.fixture(scope="module")
def components():
    return load_diffusion("tiny")


def settings(**kw):
    return RenderSettings(steps=STEPS, height=SIZE, width=SIZE, **kw)


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


def pipeline(components, scheduler=None):
    """diffusers' own StableDiffusionPipeline over the same modules (it normalises the scheduler's config)."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=copy.deepcopy(scheduler or components.scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(pipe, prompt, seed, cfg_scale):
    """An independent generation of `prompt` from the noise of `seed`."""
    out = pipe(
        prompt,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=cfg_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images[0]


def test_output_shape_and_range(components):
    calls = []
    batch = render_pairs(components, REQUESTS[:2], settings(), step_callback=lambda i, t, x: calls.append(i))
    assert batch.before.shape == batch.after.shape == (2, 3, SIZE, SIZE)
    assert batch.before.dtype == torch.float32 and batch.before.device.type == "cpu"
    assert 0 <= batch.before.min() and batch.after.max() <= 1
    assert [p.seed for p in batch.params] == [1234, 77]
    assert all(0.1 <= p.p2p_p <= 0.9 and 7.5 <= p.cfg_scale <= 15 for p in batch.params)
    assert calls == list(range(STEPS))
    assert encode_prompts(components, ["a", "b"]).shape == (2, 77, 32)
    empty = render_pairs(components, [], settings())
    assert empty.params == [] and empty.before.shape == (0, 3, SIZE, SIZE)


def test_sdpa_equals_explicit_reference(components):
    fast = render_pairs(components, REQUESTS, settings(attention="ip2p", p_range=(0.5, 0.9)))
    explicit = render_pairs(components, REQUESTS, settings(attention="ip2p-explicit", p_range=(0.5, 0.9)))
    assert close(fast.before, explicit.before, 1e-5) and close(fast.after, explicit.after, 1e-5)


def test_identical_captions_give_identical_images(components):
    same = [dataclasses.replace(r, output_caption=r.input_caption) for r in REQUESTS]
    for p_range in [(0.0, 0.0), (0.3, 0.9), (1.0, 1.0)]:
        batch = render_pairs(components, same, settings(p_range=p_range))
        assert close(batch.before, batch.after, 1e-6)


def test_p0_after_is_independent_generation_of_output_caption(components):
    batch = render_pairs(components, REQUESTS[:2], settings(p_range=(0.0, 0.0)))
    none = render_pairs(components, REQUESTS[:2], settings(attention="none"))
    pipe = pipeline(components)
    for i, req in enumerate(REQUESTS[:2]):
        cfg = batch.params[i].cfg_scale
        assert close(batch.after[i], pipeline_image(pipe, req.output_caption, req.seed, cfg))
        assert close(batch.before[i], pipeline_image(pipe, req.input_caption, req.seed, cfg))
    assert close(batch.after, none.after, 1e-6) and close(batch.before, none.before, 1e-6)


def test_sharing_changes_after_but_not_before(components):
    shared = render_pairs(components, REQUESTS, settings(p_range=(0.5, 0.9)))
    unshared = render_pairs(components, REQUESTS, settings(p_range=(0.0, 0.0)))
    assert close(shared.before, unshared.before, 1e-6)  # the before image is never modified
    for i in range(len(REQUESTS)):
        assert (shared.after[i] - unshared.after[i]).abs().max() > 1e-3


def test_batched_equals_unbatched(components):
    batched = render_pairs(components, REQUESTS, settings())
    for i, req in enumerate(REQUESTS):
        single = render_pairs(components, [req], settings())
        assert single.params[0] == batched.params[i]
        assert close(single.before[0], batched.before[i], 1e-5)
        assert close(single.after[0], batched.after[i], 1e-5)
    reordered = render_pairs(components, REQUESTS[::-1], settings())
    assert close(reordered.after.flip(0), batched.after, 1e-5)


def test_seed_determinism(components):
    a = render_pairs(components, REQUESTS[:1], settings())
    b = render_pairs(components, REQUESTS[:1], settings())
    assert torch.equal(a.before, b.before) and torch.equal(a.after, b.after)
    other = render_pairs(components, [dataclasses.replace(REQUESTS[0], seed=4321)], settings())
    assert (other.before - a.before).abs().max() > 1e-3 and (other.after - a.after).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_other_schedulers(components, name):
    pipe = pipeline(components, make_scheduler(name, components.source))
    comps = dataclasses.replace(components, scheduler=pipe.scheduler)
    batch = render_pairs(comps, REQUESTS[:2], settings())
    assert torch.isfinite(batch.after).all() and batch.after.shape == (2, 3, SIZE, SIZE)
    same = render_pairs(
        comps, [dataclasses.replace(REQUESTS[0], output_caption=REQUESTS[0].input_caption)], settings()
    )
    assert close(same.before, same.after, 1e-6)
    unshared = render_pairs(comps, REQUESTS[:1], settings(p_range=(0.0, 0.0)))
    expected = pipeline_image(
        pipe, REQUESTS[0].output_caption, REQUESTS[0].seed, unshared.params[0].cfg_scale
    )
    assert close(unshared.after[0], expected)


@pytest.mark.parametrize("mode", ["p2p-replace", "p2p-refine"])
def test_prompt_to_prompt_modes(components, mode):
    none = render_pairs(components, REQUESTS, settings(attention="none"))
    off = render_pairs(
        components, REQUESTS, settings(attention=mode, cross_replace_steps=0.0, self_replace_steps=0.0)
    )
    assert close(off.before, none.before, 1e-6) and close(off.after, none.after, 1e-6)
    on = render_pairs(
        components, REQUESTS, settings(attention=mode, cross_replace_steps=0.8, self_replace_steps=0.4)
    )
    assert close(on.before, none.before, 1e-6)
    assert (on.after - none.after).abs().max() > 1e-3
    cross_only = render_pairs(
        components, REQUESTS, settings(attention=mode, cross_replace_steps=1.0, self_replace_steps=0.0)
    )
    assert (cross_only.after - none.after).abs().max() > 1e-4


def test_processors_restored(components):
    before = {k: type(v) for k, v in components.unet.attn_processors.items()}
    render_pairs(components, REQUESTS[:1], settings(attention="p2p-refine"))
    assert {k: type(v) for k, v in components.unet.attn_processors.items()} == before
    with pytest.raises(ValueError):
        render_pairs(components, REQUESTS[:1], settings(attention="bogus"))
    assert {k: type(v) for k, v in components.unet.attn_processors.items()} == before


def test_refine_alignment_with_clip_tokenizer(components):
    from tasks.render.attention import token_alignment

    tok = components.tokenizer
    index, alpha = token_alignment(tok, "a photo of a cat", "a photo of a fluffy cat", "refine")
    after = tok("a photo of a fluffy cat").input_ids  # BOS a photo of a fluffy cat EOS
    new = after.index(tok.convert_tokens_to_ids("fluffy</w>"))
    assert alpha[new] == 0 and alpha[:new].tolist() == [1.0] * new
    assert index[:new].tolist() == list(range(new)) and index[new + 1] == new  # "cat" takes before's "cat"
    assert index[len(after)] == len(after) - 1 and bool((alpha[new + 1 :] == 1).all())


def test_persistent_attention_same_results(components):
    """Processors installed once (the torch.compile path) give the same pairs as per-call installs."""
    from tasks.render.attention import remove_attention

    try:
        for mode in ("ip2p", "p2p-refine", "ip2p"):
            expected = render_pairs(components, REQUESTS[:2], settings(attention=mode))
            first = next(iter(components.unet.attn_processors.values()))
            got = render_pairs(components, REQUESTS[:2], settings(attention=mode), persistent_attention=True)
            again = render_pairs(
                components, REQUESTS[1:], settings(attention=mode), persistent_attention=True
            )
            assert next(iter(components.unet.attn_processors.values())) is not first  # left installed
            assert torch.equal(got.after, expected.after) and close(again.after[0], expected.after[1], 1e-5)
    finally:
        remove_attention(components.unet)


# ---- few-step distilled models: no classifier-free guidance, UNet batch 2 per pair ----


def unet_batches(components):
    """Record the batch size of every UNet call (and of its text conditioning)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0].shape[0], kwargs["encoder_hidden_states"].shape[0]))

    return seen, components.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("guidance, rows", [(False, 2), (True, 4)])
def test_unet_batch_per_pair(components, guidance, rows):
    seen, handle = unet_batches(components)
    try:
        batch = render_pairs(components, REQUESTS, settings(guidance=guidance))
    finally:
        handle.remove()
    assert seen == [(rows * len(REQUESTS),) * 2] * STEPS
    assert batch.unet_steps == [STEPS] * len(REQUESTS)
    if not guidance:
        assert all(p.cfg_scale == 1.0 for p in batch.params)
        guided = render_pairs(components, REQUESTS[:1], settings())
        assert batch.params[0].p2p_p == guided.params[0].p2p_p  # p still comes from the seed


def test_distilled_p0_after_is_diffusers_generation_without_guidance(components):
    """guidance_scale=1 in diffusers' pipeline turns classifier-free guidance off: the same computation."""
    batch = render_pairs(components, REQUESTS[:2], settings(p_range=(0.0, 0.0), guidance=False))
    pipe = pipeline(components)
    for i, req in enumerate(REQUESTS[:2]):
        assert close(batch.after[i], pipeline_image(pipe, req.output_caption, req.seed, 1.0))
        assert close(batch.before[i], pipeline_image(pipe, req.input_caption, req.seed, 1.0))


def test_distilled_attention_sharing(components):
    shared = render_pairs(components, REQUESTS, settings(p_range=(0.5, 0.9), guidance=False))
    unshared = render_pairs(components, REQUESTS, settings(p_range=(0.0, 0.0), guidance=False))
    assert close(shared.before, unshared.before, 1e-6)  # the before image is never modified
    for i in range(
        len(REQUESTS)
    ):  # smaller than with guidance (no cfg ~ 10 amplifies it), far above float noise
        assert (shared.after[i] - unshared.after[i]).abs().max() > 3e-5
    # guided with cfg = 1 is eps = cond: its conditional half, shared the same way, must give the same pairs
    guided = render_pairs(components, REQUESTS, settings(p_range=(0.5, 0.9), cfg_range=(1.0, 1.0)))
    assert [p.p2p_p for p in guided.params] == [p.p2p_p for p in shared.params]
    assert close(shared.after, guided.after, 2e-6) and close(shared.before, guided.before, 2e-6)
    explicit = render_pairs(
        components, REQUESTS, settings(attention="ip2p-explicit", p_range=(0.5, 0.9), guidance=False)
    )
    assert close(shared.after, explicit.after, 1e-5) and close(shared.before, explicit.before, 1e-5)
    same = [dataclasses.replace(r, output_caption=r.input_caption) for r in REQUESTS]
    ident = render_pairs(components, same, settings(p_range=(0.3, 0.9), guidance=False))
    assert close(ident.before, ident.after, 1e-6)
    single = render_pairs(components, REQUESTS[1:2], settings(p_range=(0.5, 0.9), guidance=False))
    assert close(single.after[0], shared.after[1], 1e-5)  # batching does not change a sample


@pytest.mark.parametrize("mode", ["p2p-replace", "p2p-refine"])
def test_distilled_prompt_to_prompt(components, mode):
    none = render_pairs(components, REQUESTS, settings(attention="none", guidance=False))
    on = render_pairs(
        components,
        REQUESTS,
        settings(attention=mode, cross_replace_steps=1.0, self_replace_steps=0.0, guidance=False),
    )
    assert close(on.before, none.before, 1e-6) and (on.after - none.after).abs().max() > 1e-4


def test_distilled_early_rejection_compacts_a_two_row_batch(components):
    from tasks.render.early import EarlyRejection

    def judge(indices, before, after):
        keep = torch.tensor([i != 1 for i in indices])
        return keep, {
            k: torch.zeros(len(indices))
            for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
        }

    seen, handle = unet_batches(components)
    try:
        batch = render_pairs(components, REQUESTS, settings(guidance=False), early=EarlyRejection(2, judge))
    finally:
        handle.remove()
    assert [s[0] for s in seen] == [6, 6] + [4] * (STEPS - 2)
    assert batch.early_rejected == [False, True, False] and batch.unet_steps == [STEPS, 2, STEPS]
    full = render_pairs(components, REQUESTS, settings(guidance=False))
    assert close(batch.after[[0, 2]], full.after[[0, 2]], 1e-5)


def test_a_guidance_embedding_unet_is_refused_without_guidance(components):
    from diffusers import UNet2DConditionModel

    config = {**components.unet.config, "time_cond_proj_dim": 8}
    lcm = dataclasses.replace(components, unet=UNet2DConditionModel.from_config(config))
    with pytest.raises(ValueError, match="guidance-scale embedding"):
        render_pairs(lcm, REQUESTS[:1], settings(guidance=False))


def test_lcm_scheduler_without_guidance(components):
    """LCM-LoRA style: LCMScheduler, no guidance; the pair shares its noise, p = 0 is diffusers' generation,
    and early rejection reads the scheduler's own x0 (``denoised``)."""
    from tasks.render.early import EarlyRejection

    def lcm_settings(**kw):
        return RenderSettings(steps=4, height=SIZE, width=SIZE, **kw)

    pipe = pipeline(components, make_scheduler("lcm", components.source))
    comps = dataclasses.replace(components, scheduler=pipe.scheduler)
    same = render_pairs(
        comps,
        [dataclasses.replace(REQUESTS[0], output_caption=REQUESTS[0].input_caption)],
        lcm_settings(guidance=False),
    )
    assert close(same.before, same.after, 1e-6)
    unshared = render_pairs(comps, REQUESTS[:1], lcm_settings(p_range=(0.0, 0.0), guidance=False))
    out = pipe(
        REQUESTS[0].output_caption,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(REQUESTS[0].seed),
        output_type="pt",
    ).images[0]
    assert close(unshared.after[0], out)
    scored = []

    def judge(indices, before, after):
        scored.append(before)
        return torch.ones(len(indices), dtype=torch.bool), {
            k: torch.zeros(len(indices))
            for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
        }

    kept = render_pairs(comps, REQUESTS[:1], lcm_settings(guidance=False), early=EarlyRejection(2, judge))
    assert scored and torch.isfinite(scored[0]).all() and torch.isfinite(kept.after).all()
    from tasks.render.early import predict_x0

    scheduler = make_scheduler("lcm", components.source)
    scheduler.set_timesteps(4)
    x, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    step = scheduler.step(eps, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predict_x0(scheduler, step, eps, x, scheduler.timesteps[0]), step.denoised)
