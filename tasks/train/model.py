"""The editing model: Stable Diffusion's UNet with `conv_in` widened from 4 to 8 input channels.

Paper sec. 3.2: "To support image conditioning, we add additional input channels to the first
convolutional layer, concatenating z_t and E(c_I). All available weights of the diffusion model are
initialized from the pretrained checkpoints, and weights that operate on the newly added input channels
are initialized to zero." The pretrained bias is part of "all available weights" and is kept — the
diffusers training example builds a fresh `conv_in` and never copies the bias (a known pitfall), which
shifts every activation of the initial model. With the bias kept and the new weights zero, the widened
UNet computes exactly the pretrained UNet's output for any image latent, so training starts from SD.

The trained model is written as a diffusers `StableDiffusionInstructPix2PixPipeline` folder
(`model_index.json`, `unet/ vae/ text_encoder/ tokenizer/ scheduler/`, safetensors), loadable with
`StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tasks.common.models import DiffusionComponents, load_diffusion

EDIT_IN_CHANNELS = 8
PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"


def widen_conv_in(unet, in_channels: int = EDIT_IN_CHANNELS):
    """Widen `unet.conv_in` in place: original weights in the first channels, zeros in the new, bias kept.

    Updates `unet.config.in_channels` (through `register_to_config`, so `save_pretrained` records it).
    A UNet that already has `in_channels` inputs (an InstructPix2Pix checkpoint) is returned unchanged.
    """
    old: nn.Conv2d = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(f"conv_in has {old.in_channels} input channels, more than the {in_channels} asked for")
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                    padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def load_editing_model(preset: str, path: str | None = None) -> DiffusionComponents:
    """The model registry's diffusion components (`tiny`, `sd15`, `sd15-arch`) with an 8-channel UNet."""
    if preset == "sdxl":
        raise ValueError("InstructPix2Pix training here is for SD 1.x-shaped models (tiny, sd15, sd15-arch), not sdxl")
    comps = load_diffusion(preset, path)
    widen_conv_in(comps.unet)
    return comps


def build_pipeline(comps: DiffusionComponents):
    """A `StableDiffusionInstructPix2PixPipeline` over the components (no safety checker)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    if comps.unet.config.in_channels != EDIT_IN_CHANNELS:
        raise ValueError(f"the UNet has {comps.unet.config.in_channels} input channels; call widen_conv_in first")
    return StableDiffusionInstructPix2PixPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=comps.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(comps: DiffusionComponents, folder: str | Path) -> Path:
    """Write the pipeline folder atomically (temporary sibling, then rename); replaces an older one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build_pipeline(comps).save_pretrained(tmp, safe_serialization=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is an ordinary output
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a saved editing model with diffusers' own `from_pretrained` (local files only)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        str(folder), dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
