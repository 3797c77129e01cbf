"""CLIP input preprocessing: the reference's resize by default, antialiased + cropped as an option."""

import pytest
import torch
import torch.nn.functional as F

from tasks.common.models import load_clip
from tasks.filter.scorer import ClipScorer


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
