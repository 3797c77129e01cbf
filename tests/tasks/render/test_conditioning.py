"""SDXL conditioning (two text encoders, pooled embeddings, added time ids) on a tiny random SDXL-shaped model."""

import copy
import dataclasses
import warnings

import pytest
import torch

from tasks.common.models import DiffusionComponents, load_diffusion
from tasks.common.tiny import ensure_tiny
from tasks.render.conditioning import build_conditioning, encode_prompts, encode_prompts_sdxl
from tasks.render.pairs import PairRequest, RenderSettings, render_pairs

pytestmark = pytest.mark.component

SIZE, STEPS = 64, 4
REQUESTS = [
    PairRequest("cat", "a photo of a cat", "a photo of a dog", 11),
    PairRequest("sea", "a house by the sea", "a house by the sea at night", 2**31 + 7),
]


@pytest.fixture(scope="module")
def sdxl() -> DiffusionComponents:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tiny = load_diffusion("tiny")
    tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny("diffusion") / "tokenizer")

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )

    torch.manual_seed(0)
    encoder, encoder_2 = CLIPTextModel(text_config(16)), CLIPTextModelWithProjection(text_config(24))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    for module in (unet, encoder, encoder_2):
        module.eval().requires_grad_(False)
    return DiffusionComponents(
        unet,
        tiny.vae,
        encoder,
        tokenizer,
        copy.deepcopy(tiny.scheduler),
        encoder_2,
        tokenizer,
        preset="sdxl",
        source="test",
    )


def settings(**kw) -> RenderSettings:
    return RenderSettings(steps=STEPS, height=SIZE, width=SIZE, **kw)


def test_conditioning_layout(sdxl):
    hidden, pooled = encode_prompts_sdxl(sdxl, ["a", "b", "c"])
    assert hidden.shape == (3, 77, 40) and pooled.shape == (3, 16)
    cond = build_conditioning(sdxl, [("a", "b"), ("c", "d")], SIZE, SIZE, torch.device("cpu"), torch.float32)
    kwargs = cond.unet_kwargs()
    assert kwargs["encoder_hidden_states"].shape == (8, 77, 40)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (8, 16)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 8
    assert (
        not cond.embeddings[:4].any() and not cond.text_embeds[:4].any()
    )  # zero unconditional (SDXL default)
    torch.testing.assert_close(cond.embeddings[4:], encode_prompts_sdxl(sdxl, ["a", "b", "c", "d"])[0])
    kept = cond.select(torch.tensor([False, True]))
    torch.testing.assert_close(kept.embeddings, cond.embeddings[[2, 3, 6, 7]])
    assert kept.time_ids.shape == (4, 6)
    with pytest.raises(ValueError):
        encode_prompts(sdxl, ["a"])


def test_identical_captions_give_identical_images(sdxl):
    same = [dataclasses.replace(r, output_caption=r.input_caption) for r in REQUESTS]
    batch = render_pairs(sdxl, same, settings(p_range=(0.3, 0.9)))
    assert torch.isfinite(batch.before).all() and batch.before.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(batch.before, batch.after, atol=1e-6, rtol=0)
    shared = render_pairs(sdxl, REQUESTS, settings(p_range=(0.5, 0.9)))
    torch.testing.assert_close(
        shared.before, batch.before, atol=1e-5, rtol=0
    )  # the before image is never changed
    assert (shared.after - shared.before).abs().max() > 1e-3


def test_p0_equals_diffusers_sdxl_pipeline(sdxl):
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline(
            vae=sdxl.vae,
            text_encoder=sdxl.text_encoder,
            text_encoder_2=sdxl.text_encoder_2,
            tokenizer=sdxl.tokenizer,
            tokenizer_2=sdxl.tokenizer_2,
            unet=sdxl.unet,
            scheduler=copy.deepcopy(sdxl.scheduler),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    batch = render_pairs(sdxl, REQUESTS, settings(p_range=(0.0, 0.0)))
    for i, req in enumerate(REQUESTS):
        expected = pipe(
            req.output_caption,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=batch.params[i].cfg_scale,
            generator=torch.Generator().manual_seed(req.seed),
            output_type="pt",
        ).images[0]
        torch.testing.assert_close(batch.after[i], expected, atol=2e-5, rtol=0)


def test_without_guidance_sdxl_is_the_conditional_half_and_equals_the_turbo_call(sdxl):
    """SDXL-Turbo's documented call is guidance_scale=0.0: diffusers then runs the conditional rows only."""
    from diffusers import StableDiffusionXLPipeline

    cond = build_conditioning(
        sdxl, [("a", "b"), ("c", "d")], SIZE, SIZE, torch.device("cpu"), torch.float32, guidance=False
    )
    kwargs = cond.unet_kwargs()
    assert cond.n_samples == 2 and kwargs["encoder_hidden_states"].shape == (4, 77, 40)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (4, 16) and cond.time_ids.shape == (4, 6)
    torch.testing.assert_close(cond.embeddings, encode_prompts_sdxl(sdxl, ["a", "b", "c", "d"])[0])
    torch.testing.assert_close(cond.select(torch.tensor([False, True])).embeddings, cond.embeddings[[2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline(
            vae=sdxl.vae,
            text_encoder=sdxl.text_encoder,
            text_encoder_2=sdxl.text_encoder_2,
            tokenizer=sdxl.tokenizer,
            tokenizer_2=sdxl.tokenizer_2,
            unet=sdxl.unet,
            scheduler=copy.deepcopy(sdxl.scheduler),
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    batch = render_pairs(sdxl, REQUESTS, settings(p_range=(0.0, 0.0), guidance=False))
    for i, req in enumerate(REQUESTS):
        expected = pipe(
            req.output_caption,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(req.seed),
            output_type="pt",
        ).images[0]
        torch.testing.assert_close(batch.after[i], expected, atol=2e-5, rtol=0)
    shared = render_pairs(sdxl, REQUESTS, settings(p_range=(0.5, 0.9), guidance=False))
    torch.testing.assert_close(shared.before, batch.before, atol=1e-5, rtol=0)
    assert (shared.after - batch.after).abs().max() > 3e-5
