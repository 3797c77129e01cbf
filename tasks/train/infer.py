"""Editing with the trained model: diffusers' `StableDiffusionInstructPix2PixPipeline`, two guidance scales.

Paper eq. 3: e = e(z, ∅, ∅) + s_I (e(z, c_I, ∅) − e(z, ∅, ∅)) + s_T (e(z, c_I, c_T) − e(z, c_I, ∅)), with
s_T = 7.5 (`guidance_scale`) and s_I = 1.5 (`image_guidance_scale`) as defaults. The pipeline applies
guidance only when `guidance_scale > 1 and image_guidance_scale >= 1`; otherwise it silently runs the
fully conditioned prediction alone (a known pitfall) — here that is an error unless `allow_unguided`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from tasks.common.errors import InputError, PermanentError

TEXT_GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5


class GuidanceDisabledError(PermanentError, ValueError):
    """The guidance scales given would make the pipeline skip classifier-free guidance silently."""


def check_guidance(guidance_scale: float, image_guidance_scale: float, allow_unguided: bool = False) -> None:
    """Raise unless the pipeline will apply both guidances (`s_T > 1` and `s_I >= 1`), or `allow_unguided`."""
    if allow_unguided:
        return
    problems = []
    if guidance_scale <= 1:
        problems.append(f"guidance_scale={guidance_scale} (must be > 1)")
    if image_guidance_scale < 1:
        problems.append(f"image_guidance_scale={image_guidance_scale} (must be >= 1)")
    if problems:
        raise GuidanceDisabledError(
            "StableDiffusionInstructPix2PixPipeline silently disables classifier-free guidance for "
            + " and ".join(problems)
            + f"; the paper uses text {TEXT_GUIDANCE} / image {IMAGE_GUIDANCE}. "
            "Pass allow_unguided=True to run the unguided (fully conditioned) prediction on purpose."
        )


def edit_image(
    pipe,
    image: Image.Image,
    instruction: str,
    *,
    guidance_scale: float = TEXT_GUIDANCE,
    image_guidance_scale: float = IMAGE_GUIDANCE,
    steps: int = 50,
    seed: int = 0,
    allow_unguided: bool = False,
) -> Image.Image:
    """Edit one image with `instruction`; the output has the input's size (rounded to the VAE's multiple)."""
    check_guidance(guidance_scale, image_guidance_scale, allow_unguided)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = {}
    if hasattr(
        pipe, "text_encoder_2"
    ):  # the SDXL pipeline defaults to the UNet's sample size, not the image's
        factor = pipe.vae_scale_factor
        size = {"width": image.width // factor * factor, "height": image.height // factor * factor}
    result = pipe(
        instruction,
        image=image.convert("RGB"),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        generator=generator,
        **size,
    )
    return result.images[0]


def edit_images(
    pipe,
    images: list[Image.Image],
    instructions: list[str],
    seeds: list[int],
    *,
    guidance_scale: float = TEXT_GUIDANCE,
    image_guidance_scale: float = IMAGE_GUIDANCE,
    steps: int = 50,
    allow_unguided: bool = False,
) -> list[Image.Image]:
    """Edit a batch of equally sized images in one pipeline call, each with its own generator (`seeds`): each
    image's noise is drawn from its own seed, so an image's edit does not depend on which others share its
    batch (up to float rounding of the batched kernels)."""
    if not (len(images) == len(instructions) == len(seeds)):
        raise InputError(
            f"{len(images)} images, {len(instructions)} instructions, {len(seeds)} seeds: one each"
        )
    if len({img.size for img in images}) > 1:
        raise InputError("edit_images: images of one batch must have the same size")
    check_guidance(guidance_scale, image_guidance_scale, allow_unguided)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    size = {}
    if hasattr(
        pipe, "text_encoder_2"
    ):  # the SDXL pipeline defaults to the UNet's sample size, not the image's
        factor, (w, h) = pipe.vae_scale_factor, images[0].size
        size = {"width": w // factor * factor, "height": h // factor * factor}
    result = pipe(
        list(instructions),
        image=[img.convert("RGB") for img in images],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        generator=generators,
        **size,
    )
    return list(result.images)


def edit_with_model(
    folder: str | Path, image: Image.Image, instruction: str, *, device: str = "cpu", **kwargs
) -> Image.Image:
    """Load a saved editing model folder and edit one image (see `edit_image` for the keyword arguments)."""
    from tasks.train.model import load_pipeline

    check_guidance(
        kwargs.get("guidance_scale", TEXT_GUIDANCE),
        kwargs.get("image_guidance_scale", IMAGE_GUIDANCE),
        kwargs.get("allow_unguided", False),
    )
    return edit_image(load_pipeline(folder, device=device), image, instruction, **kwargs)


def side_by_side(*images: Image.Image) -> Image.Image:
    """A horizontal strip of equally sized images (input | target | model edit)."""
    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, img in enumerate(images):
        strip.paste(img.convert("RGB").resize((w, h)), (i * w, 0))
    return strip
