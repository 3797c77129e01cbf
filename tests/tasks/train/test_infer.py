"""The guidance guard: the IP2P pipeline silently skips guidance unless s_T > 1 and s_I >= 1."""

import pytest
from PIL import Image

from tasks.train.infer import GuidanceDisabledError, check_guidance, edit_image, side_by_side


@pytest.mark.parametrize("text, image", [(1.0, 1.5), (0.5, 1.5), (7.5, 0.99), (1.0, 0.0)])
def test_guidance_that_the_pipeline_would_skip_is_an_error(text, image):
    with pytest.raises(GuidanceDisabledError, match="silently disables"):
        check_guidance(text, image)
    check_guidance(text, image, allow_unguided=True)


@pytest.mark.parametrize("text, image", [(7.5, 1.5), (1.01, 1.0), (20.0, 3.0)])
def test_guidance_the_pipeline_applies_passes(text, image):
    check_guidance(text, image)


def test_edit_image_checks_before_calling_the_pipeline():
    def pipe(*args, **kwargs):
        raise AssertionError("the pipeline must not run")

    with pytest.raises(GuidanceDisabledError, match="image_guidance_scale=0.5"):
        edit_image(pipe, Image.new("RGB", (8, 8)), "make it red", image_guidance_scale=0.5)


def test_side_by_side_strip():
    strip = side_by_side(Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 255, 0)))
    assert strip.size == (16, 6) and strip.getpixel((12, 3)) == (0, 255, 0)
