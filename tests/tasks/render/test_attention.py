import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tasks.render.attention import (
    AttentionControl,
    ExplicitSharedSelfAttnProcessor,
    PromptToPromptProcessor,
    SharedSelfAttnProcessor,
    batch_index,
    install_attention,
    remove_attention,
    split_layout,
    token_alignment,
)

N = 3
HEADS, DIM_HEAD, SEQ, CTX, CTX_DIM = 2, 8, 10, 7, 12


@pytest.fixture(scope="module")
def self_attn():
    torch.manual_seed(0)
    return Attention(query_dim=HEADS * DIM_HEAD, heads=HEADS, dim_head=DIM_HEAD).eval()


@pytest.fixture(scope="module")
def cross_attn():
    torch.manual_seed(1)
    return Attention(
        query_dim=HEADS * DIM_HEAD, cross_attention_dim=CTX_DIM, heads=HEADS, dim_head=DIM_HEAD
    ).eval()


def _control(active):
    control = AttentionControl.for_samples([0.5] * len(active))
    control.active = torch.tensor(active)
    return control


def _heads(attn, x):
    return x.view(x.shape[0], -1, HEADS, DIM_HEAD).transpose(1, 2)


def test_layout_helpers():
    flat = torch.arange(4 * N)
    split = split_layout(flat, N)
    assert split.shape == (2, N, 2)
    for cfg in range(2):
        for sample in range(N):
            for pair in range(2):
                assert split[cfg, sample, pair] == batch_index(cfg, sample, pair, N)
    # N = 1 is the reference batch [uncond-before, uncond-after, cond-before, cond-after]
    assert [batch_index(c, 0, p, 1) for c in (0, 1) for p in (0, 1)] == [0, 1, 2, 3]
    assert batch_index(1, 2, 1, N) == 11
    with pytest.raises(ValueError):
        split_layout(torch.zeros(5), N)
    with pytest.raises(IndexError):
        batch_index(0, N, 0, N)


def test_control_schedule_is_the_reference_rule():
    """instruct-pix2pix k-diffusion loop: share while p > i / (len(sigmas) - 2) = i / (steps - 1)."""
    control = AttentionControl.for_samples([0.0, 0.25, 0.9], [0.5, 0.5, 0.5])
    control.begin_step(0, 8)
    assert control.active.tolist() == [False, True, True] and control.any_active
    control.begin_step(1, 8)  # 1/7 = 0.143 < 0.25
    assert control.active.tolist() == [False, True, True]
    control.begin_step(2, 8)  # 2/7 = 0.286 > 0.25 (the old `i < p * n` rule also stopped here)
    assert control.active.tolist() == [False, False, True]
    assert control.cross_active.tolist() == [True] * 3 and control.any_cross_active
    control.begin_step(6, 8)  # 6/7 = 0.857 < 0.9
    assert control.active.tolist() == [False, False, True]
    control.begin_step(7, 8)  # the last step: 7/7 = 1
    assert not control.active.any() and not control.any_active and not control.cross_active.any()
    # the boundary, against the formula, for many (p, n)
    for n in (1, 2, 5, 10, 11, 100):
        for p in (0.0, 0.1, 0.25, 0.5, 0.55, 0.9, 1.0):
            control = AttentionControl.for_samples([p])
            shared = []
            for i in range(n):
                control.begin_step(i, n)
                shared.append(bool(control.active[0]))
            expected = [p > (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
            assert shared == expected, (n, p)
    # p = 0.55 over 10 steps: the reference shares 0-4 (4/9 = 0.444, 5/9 = 0.556), `i < p * n` shares 0-5
    control = AttentionControl.for_samples([0.55])
    control.begin_step(5, 10)
    assert not control.any_active


def test_control_schedule_p2p_rule():
    """Prompt-to-Prompt: self while i < int(f * n), cross while i < int(f * (n + 1))."""
    control = AttentionControl.for_samples([0.4], [0.8], schedule="p2p")
    flags = []
    for i in range(10):
        control.begin_step(i, 10)
        flags.append((bool(control.active[0]), bool(control.cross_active[0])))
    assert [f[0] for f in flags] == [True] * 4 + [False] * 6
    assert [f[1] for f in flags] == [True] * 8 + [False] * 2  # int(0.8 * 11) = 8
    with pytest.raises(ValueError):
        AttentionControl.for_samples([0.4], schedule="bogus")


def test_control_select_compacts_in_place():
    control = AttentionControl.for_samples(
        [0.2, 0.9, 0.5],
        [0.1, 0.2, 0.3],
        cross_index=torch.arange(12).view(3, 4),
        cross_alpha=torch.ones(3, 4),
    )
    control.begin_step(1, 5)  # 1/4 = 0.25: samples 1 and 2 share
    assert control.active.tolist() == [False, True, True]
    control.select(torch.tensor([True, False, True]))
    assert control.n_samples == 2 and control.self_fraction.tolist() == [0.2, 0.5]
    assert control.active.tolist() == [False, True] and control.any_active
    assert control.cross_index.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert control.after_rows(torch.device("cpu")).tolist() == [False, False, False, True] * 2
    control.check_batch(8)
    control.select(torch.tensor([True, False]))
    assert not control.any_active and control.n_samples == 1


def test_sdpa_processor_matches_explicit_and_definition(self_attn):
    torch.manual_seed(2)
    x = torch.randn(4 * N, SEQ, HEADS * DIM_HEAD)
    control = _control([True, False, True])
    with torch.inference_mode():
        default = AttnProcessor2_0()(self_attn, x)
        shared = SharedSelfAttnProcessor(control)(self_attn, x)
        explicit = ExplicitSharedSelfAttnProcessor(control)(self_attn, x)
        q, k, v = (_heads(self_attn, f(x)) for f in (self_attn.to_q, self_attn.to_k, self_attn.to_v))
    torch.testing.assert_close(shared, explicit, atol=1e-6, rtol=1e-5)
    for cfg in range(2):
        for sample in range(N):
            before, after = batch_index(cfg, sample, 0, N), batch_index(cfg, sample, 1, N)
            torch.testing.assert_close(shared[before], default[before], atol=1e-6, rtol=1e-5)
            if not control.active[sample]:
                torch.testing.assert_close(shared[after], default[after], atol=1e-6, rtol=1e-5)
                continue
            probs = (q[before] @ k[before].transpose(-1, -2) / DIM_HEAD**0.5).softmax(-1)
            out = (probs @ v[after]).transpose(0, 1).reshape(SEQ, -1)
            expected = self_attn.to_out[0](out)
            torch.testing.assert_close(shared[after], expected, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(shared[after], default[after], atol=1e-4)


def test_inactive_and_cross_attention_untouched(self_attn, cross_attn):
    torch.manual_seed(3)
    x = torch.randn(4 * N, SEQ, HEADS * DIM_HEAD)
    ctx = torch.randn(4 * N, CTX, CTX_DIM)
    with torch.inference_mode():
        assert torch.equal(
            SharedSelfAttnProcessor(_control([False] * N))(self_attn, x), AttnProcessor2_0()(self_attn, x)
        )
        assert torch.equal(
            SharedSelfAttnProcessor(_control([True] * N))(cross_attn, x, ctx),
            AttnProcessor2_0()(cross_attn, x, ctx),
        )
        with pytest.raises(ValueError):
            SharedSelfAttnProcessor(_control([True] * N))(self_attn, x[:8])


def test_prompt_to_prompt_replace_cross(cross_attn):
    torch.manual_seed(4)
    x = torch.randn(4 * N, SEQ, HEADS * DIM_HEAD)
    ctx = torch.randn(4 * N, CTX, CTX_DIM)
    index = torch.arange(CTX).repeat(N, 1)
    control = AttentionControl.for_samples(
        [0.0] * N, [1.0] * N, cross_index=index, cross_alpha=torch.ones(N, CTX)
    )
    control.begin_step(0, 4)
    control.cross_active = torch.tensor([True, False, True])
    with torch.inference_mode():
        edited = PromptToPromptProcessor(control)(cross_attn, x, ctx)
        default = AttnProcessor2_0()(cross_attn, x, ctx)
        q = _heads(cross_attn, cross_attn.to_q(x))
        k, v = (_heads(cross_attn, f(ctx)) for f in (cross_attn.to_k, cross_attn.to_v))
    changed = {batch_index(1, 0, 1, N), batch_index(1, 2, 1, N)}
    for row in range(4 * N):
        if row not in changed:
            torch.testing.assert_close(edited[row], default[row], atol=1e-6, rtol=1e-5)
    before, after = batch_index(1, 2, 0, N), batch_index(1, 2, 1, N)
    probs = (q[before] @ k[before].transpose(-1, -2) / DIM_HEAD**0.5).softmax(-1)
    expected = cross_attn.to_out[0]((probs @ v[after]).transpose(0, 1).reshape(SEQ, -1))
    torch.testing.assert_close(edited[after], expected, atol=1e-6, rtol=1e-5)


class _WordTokenizer:
    """Whitespace tokenizer with BOS=0/EOS=1, enough to test the alignment."""

    model_max_length = 12

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, truncation=True, max_length=12):
        ids = [0] + [self.vocab.setdefault(w, 2 + len(self.vocab)) for w in text.split()] + [1]
        return type("Encoding", (), {"input_ids": ids[:max_length]})()


def test_token_alignment():
    tok = _WordTokenizer()
    index, alpha = token_alignment(tok, "a photo of a cat", "a photo of a big cat", "replace")
    assert index.tolist() == list(range(12)) and alpha.tolist() == [1.0] * 12
    index, alpha = token_alignment(tok, "a photo of a cat", "a photo of a big cat", "refine")
    # after tokens: BOS a photo of a big cat EOS pad...; "big" (5) is new, "cat" (6) takes before's 5
    assert alpha[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert index[:8].tolist()[:5] == [0, 1, 2, 3, 4] and index[6] == 5 and index[7] == 6
    assert index[8] == 7 and index[11] == 10 and alpha[8:].tolist() == [1.0] * 4


def test_install_and_remove(self_attn):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
    )
    control = AttentionControl.for_samples([0.5])
    install_attention(unet, "ip2p", control)
    procs = unet.attn_processors.values()
    assert all(isinstance(p, SharedSelfAttnProcessor) and p.control is control for p in procs)
    install_attention(unet, "p2p-refine", control)
    assert all(isinstance(p, PromptToPromptProcessor) for p in unet.attn_processors.values())
    remove_attention(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with pytest.raises(ValueError):
        install_attention(unet, "bogus", control)
    with pytest.raises(ValueError):
        install_attention(unet, "ip2p", None)


def test_layout_without_guidance_is_the_conditional_half(self_attn):
    """cfg_halves=1 (distilled models): batch 2N = samples x [before, after], the guided layout's cond half."""
    assert [batch_index(1, s, p, N, cfg_halves=1) for s in range(N) for p in (0, 1)] == list(range(2 * N))
    assert split_layout(torch.arange(2 * N), N, cfg_halves=1).shape == (1, N, 2)
    with pytest.raises(IndexError):
        batch_index(0, 0, 0, N, cfg_halves=1)  # there is no unconditional half
    torch.manual_seed(5)
    x = torch.randn(2 * N, SEQ, HEADS * DIM_HEAD)
    control = AttentionControl.for_samples([0.5] * N, cfg_halves=1)
    control.active = torch.tensor([True, False, True])
    guided = _control([True, False, True])
    with torch.inference_mode():
        alone = SharedSelfAttnProcessor(control)(self_attn, x)
        explicit = ExplicitSharedSelfAttnProcessor(control)(self_attn, x)
        within = SharedSelfAttnProcessor(guided)(self_attn, torch.cat([torch.randn_like(x), x]))[2 * N :]
        default = AttnProcessor2_0()(self_attn, x)
    torch.testing.assert_close(
        alone, within, atol=1e-6, rtol=1e-5
    )  # the same rows as the guided batch's cond half
    torch.testing.assert_close(alone, explicit, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(alone[1], default[1], atol=1e-4)  # sample 0's after row is shared
    torch.testing.assert_close(alone[3], default[3], atol=1e-6, rtol=1e-5)  # sample 1 is not sharing
    assert control.after_rows(torch.device("cpu")).tolist() == [False, True, False, False, False, True]
    with pytest.raises(ValueError, match=r"expected 2 x 3 \(\[cond\]"):
        SharedSelfAttnProcessor(control)(self_attn, torch.cat([x, x]))
