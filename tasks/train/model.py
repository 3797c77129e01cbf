"""The editing model: Stable Diffusion's UNet with `conv_in` widened from 4 to 8 input channels.

As paper sec. 3.2: the new input channels' weights start at zero and every pretrained weight is kept,
the ``conv_in`` bias included (diffusers' example drops it), so the widened UNet starts as exactly the
pretrained one. The trained model is a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder (or the
SDXL one), every file but the UNet and ``model_index.json`` copied byte for byte from the base model.

In full: docs/training.md ("In the code").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from tasks.common.errors import MissingFileError, PermanentError
from tasks.common.models import DiffusionComponents, load_diffusion
from tasks.common.storage import local_dir_atomic

EDIT_IN_CHANNELS = 8
PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
PIPELINE_CLASS_XL = "StableDiffusionXLInstructPix2PixPipeline"
SKIPPED_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb")
TEXT_TO_IMAGE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class NotAnEditingModelError(PermanentError, ValueError):
    """A folder given as an editing model is not an (SDXL) InstructPix2Pix pipeline; the message says what it is."""


def widen_conv_in(unet, in_channels: int = EDIT_IN_CHANNELS):
    """Widen `unet.conv_in` in place: original weights in the first channels, zeros in the new, bias kept.

    Updates `unet.config.in_channels` (through `register_to_config`, so `save_pretrained` records it).
    A UNet that already has `in_channels` inputs (an InstructPix2Pix checkpoint) is returned unchanged.
    """
    old: nn.Conv2d = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(
            f"conv_in has {old.in_channels} input channels, more than the {in_channels} asked for"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
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


def load_editing_model(
    preset: str, path: str | None = None, vae_path: str | None = None
) -> DiffusionComponents:
    """The model registry's diffusion components (`tiny`, `sd15`, `sdxl`, `sd15-arch`) with an 8-channel UNet;
    the VAE of `vae_path` (`models.vae_path`) instead of the model's own when given."""
    comps = load_diffusion(preset, path, vae_path=vae_path)  # the one VAE loader (tasks.common.models)
    widen_conv_in(comps.unet)
    return comps


def pipeline_class(sdxl: bool):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASS_XL if sdxl else PIPELINE_CLASS)


def build_pipeline(comps: DiffusionComponents):
    """A `StableDiffusionInstructPix2PixPipeline` (or its SDXL twin) over the components (no safety checker,
    no watermark). SDXL's unconditional prompt is the encoding of "" (`force_zeros_for_empty_prompt=False`),
    the null text training drops to (`tasks.train.conditioning`), not diffusers' default zeros."""
    if comps.unet.config.in_channels != EDIT_IN_CHANNELS:
        raise ValueError(
            f"the UNet has {comps.unet.config.in_channels} input channels; call widen_conv_in first"
        )
    if comps.is_sdxl:
        return pipeline_class(True)(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer,
            tokenizer_2=comps.tokenizer_2,
            unet=comps.unet,
            scheduler=comps.scheduler,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    return pipeline_class(False)(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=comps.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def base_folder(comps: DiffusionComponents) -> Path | None:
    """The local folder the frozen components were loaded from (a hub id: its cached snapshot); None for
    random-init weights (`sd15-arch`)."""
    source = comps.source
    if not source or source == "random-init":
        return None
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: nothing to copy, the components are re-saved
        return None


def _copy_component(src: Path, dest: Path) -> None:
    """Copy one component folder file by file (hub snapshots are symlinks: their targets are copied),
    leaving out pickled weights (safetensors only) and other frameworks' files."""
    for path in sorted(src.rglob("*")):
        if path.is_dir() or path.suffix in SKIPPED_WEIGHT_SUFFIXES:
            continue
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _frozen_components(comps: DiffusionComponents) -> tuple[str, ...]:
    return (
        "text_encoder",
        "tokenizer",
        "scheduler",
        *(("text_encoder_2", "tokenizer_2") if comps.is_sdxl else ()),
    )


def save_pipeline(
    comps: DiffusionComponents,
    folder: str | Path,
    base: str | Path | None = None,
    vae_dir: str | Path | None = None,
) -> Path:
    """Write the pipeline folder atomically (temporary sibling, then rename); replaces an older one.

    With a `base` model folder the folder is that model plus the trained UNet: the frozen text encoder(s),
    tokenizer(s) and scheduler config are copied from `base` as files (not re-saved: a re-save by this
    transformers version renames the text encoder's keys and writes only `tokenizer.json`, which an older
    stack cannot read), the VAE from `vae_dir` (`models.vae_path`) or `base`; only the UNet and
    `model_index.json` are written. Without a base (random-init weights) every component is saved."""
    folder = Path(folder)
    with local_dir_atomic(folder) as tmp:
        pipe = build_pipeline(comps)
        if base is None:
            pipe.save_pretrained(tmp, safe_serialization=True)
        else:
            base = Path(base)
            comps.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            for name in _frozen_components(comps):
                if not (base / name).is_dir():
                    raise MissingFileError(
                        f"base model folder {base} has no {name}/ to copy into the trained model"
                    )
                _copy_component(base / name, tmp / name)
            _copy_component(Path(vae_dir) if vae_dir else base / "vae", tmp / "vae")
            pipe.save_config(tmp)  # model_index.json: the pipeline class and its components' classes
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            scheduler_config = tmp / "scheduler" / "scheduler_config.json"
            if scheduler_config.is_file():  # the class of the copied scheduler config
                index["scheduler"] = ["diffusers", json.loads(scheduler_config.read_text())["_class_name"]]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def _json_class(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def check_editing_model(folder: str | Path) -> str:
    """The pipeline class an InstructPix2Pix model folder names (SD or SDXL), or NotAnEditingModelError saying
    what the folder holds instead (nothing, a single model, another pipeline, a UNet without 8 input channels)."""
    path = Path(folder)
    expected = (
        f"a diffusers {PIPELINE_CLASS} or {PIPELINE_CLASS_XL} folder (model_index.json, unet/, vae/, ...)"
    )
    if not path.exists():
        raise NotAnEditingModelError(f"{folder}: no such folder; expected {expected}")
    if not path.is_dir():
        raise NotAnEditingModelError(f"{folder} is a file, not a model folder; expected {expected}")
    index = path / "model_index.json"
    if not index.is_file():
        single = _json_class(path / "config.json") if (path / "config.json").is_file() else None
        entries = sorted(p.name for p in path.iterdir())
        found = (
            f"a single {single} (config.json), not a pipeline"
            if single
            else f"no model_index.json (it holds {', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''})"
            if entries
            else "an empty folder"
        )
        raise NotAnEditingModelError(
            f"{folder} is not an InstructPix2Pix pipeline: found {found}; expected {expected}"
        )
    name = _json_class(index)
    if name not in (PIPELINE_CLASS, PIPELINE_CLASS_XL):
        why = (
            " (a text-to-image model: train an editing model from it with `editforge train`)"
            if name in TEXT_TO_IMAGE_CLASSES
            else ""
        )
        raise NotAnEditingModelError(
            f"{folder} is not an InstructPix2Pix pipeline: its model_index.json names "
            f"{name or 'no _class_name'}{why}; expected {PIPELINE_CLASS} or {PIPELINE_CLASS_XL}"
        )
    unet = path / "unet" / "config.json"
    try:
        channels = json.loads(unet.read_text(encoding="utf-8")).get("in_channels")
    except (OSError, ValueError) as err:
        raise NotAnEditingModelError(
            f"{folder}: {name} folder without a readable unet/config.json ({err})"
        ) from None
    if channels != EDIT_IN_CHANNELS:
        raise NotAnEditingModelError(
            f"{folder}: model_index.json names {name}, but its UNet takes {channels} input "
            f"channels; an InstructPix2Pix UNet takes {EDIT_IN_CHANNELS} (noise + image latents)"
        )
    return name


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a saved editing model with diffusers' own `from_pretrained` (local files only); the pipeline
    class (SD or SDXL InstructPix2Pix) is the one `model_index.json` names (:func:`check_editing_model`)."""
    sdxl = check_editing_model(folder) == PIPELINE_CLASS_XL
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = pipeline_class(sdxl).from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
