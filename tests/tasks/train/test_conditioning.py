"""Conditioning dropout: 5 % text only, 5 % both, 5 % image only; null text = embedding of "", null image = 0."""

import pytest
import torch

from tasks.train.conditioning import apply_dropout, dropout_masks, null_text_embedding


def test_dropout_proportions_match_the_paper():
    n = 400_000
    drop_text, drop_image = dropout_masks(n, 0.05, torch.Generator().manual_seed(1234))
    frac = {
        "text_only": (drop_text & ~drop_image).float().mean().item(),
        "both": (drop_text & drop_image).float().mean().item(),
        "image_only": (~drop_text & drop_image).float().mean().item(),
        "none": (~drop_text & ~drop_image).float().mean().item(),
    }
    # binomial std at p=0.05 is ~3.4e-4 here: 0.002 is a 6-sigma band
    for name in ("text_only", "both", "image_only"):
        assert abs(frac[name] - 0.05) < 0.002, frac
    assert abs(frac["none"] - 0.85) < 0.003, frac


def test_dropout_is_seeded_and_bounded():
    a = dropout_masks(1000, 0.05, torch.Generator().manual_seed(7))
    b = dropout_masks(1000, 0.05, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    text, image = dropout_masks(1000, 0.0, torch.Generator().manual_seed(7))
    assert not text.any() and not image.any()
    with pytest.raises(ValueError, match="1/3"):
        dropout_masks(10, 0.4)


def test_apply_dropout_puts_null_text_and_zero_image_latents():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(4, 77, 32, generator=g)
    image = torch.randn(4, 4, 8, 8, generator=g)
    null = torch.randn(1, 77, 32, generator=g)
    drop_text = torch.tensor([True, True, False, False])
    drop_image = torch.tensor([False, True, True, False])
    out_text, out_image = apply_dropout(text, image, null, drop_text, drop_image)
    assert torch.equal(out_text[0], null[0]) and torch.equal(out_text[1], null[0])
    assert torch.equal(out_text[2:], text[2:])
    assert torch.equal(out_image[0], image[0]) and torch.equal(out_image[3], image[3])
    assert torch.count_nonzero(out_image[1:3]) == 0


@pytest.mark.component
def test_null_text_is_the_pipelines_unconditional_prompt_embedding():
    """Training's ∅_T must equal what the IP2P pipeline feeds for its unconditional branches."""
    from tasks.train.model import build_pipeline, load_editing_model

    comps = load_editing_model("tiny")
    null = null_text_embedding(comps.tokenizer, comps.text_encoder)
    assert null.shape == (1, 77, comps.text_encoder.config.hidden_size)
    pipe = build_pipeline(comps)
    embeds = pipe._encode_prompt("make it red", "cpu", 1, True, None)  # [cond, uncond, uncond]
    torch.testing.assert_close(embeds[1:2], null)
    torch.testing.assert_close(embeds[2:3], null)
    assert not torch.allclose(embeds[0:1], null)


@pytest.mark.component
def test_sdxl_null_text_is_the_sdxl_pipelines_unconditional_prompt():
    """SDXL: ∅_T (hidden states and pooled) equals what the saved SDXL IP2P pipeline feeds as unconditional."""
    from tasks.common.tiny import ensure_tiny
    from tasks.train.conditioning import encode_text, null_text
    from tasks.train.data import tokenize
    from tasks.train.model import build_pipeline, load_editing_model

    comps = load_editing_model("sdxl", str(ensure_tiny("diffusion-sdxl")))
    hidden, pooled = null_text(comps)
    assert hidden.shape == (1, 77, 16 + 24) and pooled.shape == (1, 16)
    pipe = build_pipeline(comps)
    cond, uncond, cond_pooled, uncond_pooled = pipe.encode_prompt(
        "make it red", device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(uncond, hidden)
    torch.testing.assert_close(uncond_pooled, pooled)
    ids = tokenize(comps.tokenizer, ["make it red"]), tokenize(comps.tokenizer_2, ["make it red"])
    with torch.no_grad():
        train_hidden, train_pooled = encode_text(comps, *ids)
    torch.testing.assert_close(train_hidden, cond)
    torch.testing.assert_close(train_pooled, cond_pooled)
    assert not torch.allclose(cond, hidden)
