"""CLIP input preprocessing: the reference's resize by default, antialiased + cropped as an option."""

import pytest
import torch
import torch.nn.functional as F

from tasks.common.models import load_clip
from tasks.scoring.clip import ClipScorer


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


def test_reference_resize_is_the_reference_encode_image(clip):
    scorer = ClipScorer(clip)
    images = torch.rand(2, 3, 96, 96)
    size = clip.image_size
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    # the reference's ClipSimilarity: F.interpolate(image, size=224, mode="bicubic", align_corners=False), normalise
    expected = (F.interpolate(images, size=size, mode="bicubic", align_corners=False) - mean) / std
    torch.testing.assert_close(scorer.preprocess(images), expected)


def test_antialias_resize_differs_and_crops_non_square(clip):
    images = torch.rand(1, 3, 96, 128)
    reference = ClipScorer(clip).preprocess(images)
    antialias = ClipScorer(clip, resize="antialias").preprocess(images)
    assert reference.shape == antialias.shape == (1, 3, clip.image_size, clip.image_size)
    assert not torch.allclose(reference, antialias)
    with pytest.raises(ValueError, match="unknown CLIP resize"):
        ClipScorer(clip, resize="bilinear")


def test_antialias_at_sdxl_size_is_clips_own_preprocessing_and_does_not_alias(clip):
    """paper-sdxl scores 1024² renders with render.clip_resize=antialias: a 4.6x downscale to ViT-L's 224."""
    import dataclasses

    import numpy as np
    import open_clip
    from PIL import Image

    vit_l = dataclasses.replace(clip, image_size=224)  # the preprocessing reads only the input size
    antialias, reference = ClipScorer(vit_l, resize="antialias"), ClipScorer(vit_l)
    checker = (
        ((torch.arange(1024).view(-1, 1) + torch.arange(1024).view(1, -1)) % 2).float().expand(1, 3, -1, -1)
    )
    flat = antialias.preprocess(checker) * torch.tensor(clip.std).view(1, 3, 1, 1) + torch.tensor(
        clip.mean
    ).view(1, 3, 1, 1)
    assert flat.shape == (1, 3, 224, 224) and (flat - 0.5).abs().max() < 0.02  # a 1-px checkerboard is grey
    aliased = reference.preprocess(checker) * torch.tensor(clip.std).view(1, 3, 1, 1) + torch.tensor(
        clip.mean
    ).view(1, 3, 1, 1)
    assert (aliased - 0.5).abs().max() > 0.2
    # open_clip's own eval transform (PIL bicubic resize of the short side + centre crop) on a smooth image
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 16, 16), size=(1024, 1024), mode="bilinear", align_corners=False)
    pil = Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    theirs = open_clip.image_transform(224, is_train=False, mean=clip.mean, std=clip.std)(pil).unsqueeze(0)
    assert (antialias.preprocess(smooth) - theirs).abs().mean() < 0.01  # measured 0.004 (uint8 rounding)
