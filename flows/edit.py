"""`editforge edit`: edit one image, or every image of a folder, with an InstructPix2Pix model.

    editforge edit photo.jpg "make it snowy" --image-guidance 1.5 --text-guidance 7.5 --preset demo
    editforge edit photos/ "turn it into a watercolour" --model /models/instruct-pix2pix --steps 50 --out edited/

The model is the one `editforge train` finished for the config (`--preset`, `--set`), or `--model PATH`: any
diffusers `StableDiffusionInstructPix2PixPipeline` or `StableDiffusionXLInstructPix2PixPipeline` folder (the
class its model_index.json names). Each input `<stem>.<ext>` (png, jpg, jpeg, webp) is written as
`<stem>.edited.png` next to it, or into `--out DIR`; an input is never overwritten, and `*.edited.png` files
in a folder are outputs, not inputs. Every image is edited with the same seed, so editing a folder gives the
images editing each file alone gives. The edit keeps the input's size, rounded down to the VAE's multiple.
No Prefect: a plain command.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (environment defaults: offline, the cache folder)

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flows.options import Debug, Overrides, Preset, load_or_exit, reported, run_command
from tasks.common.errors import PermanentError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
OUTPUT_SUFFIX = ".edited.png"


class EditInputError(PermanentError, ValueError):
    """An input path that cannot be edited (missing, not an image, a folder without images)."""


def input_images(path: Path) -> list[Path]:
    """The images to edit: `path` itself, or the images of the folder `path` (sorted; outputs left out)."""
    if not path.exists():
        raise EditInputError(f"{path}: no such file or folder")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.endswith(OUTPUT_SUFFIX))
        if not found:
            raise EditInputError(f"{path}: no images in this folder (expected {', '.join(IMAGE_SUFFIXES)} files; "
                                 f"*{OUTPUT_SUFFIX} outputs are left out)")
        return found
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise EditInputError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
    return [path]


def output_paths(inputs: list[Path], out: Path | None) -> dict[Path, Path]:
    """`<stem>.edited.png` in `out` (default: the input's folder); inputs whose stems collide there
    (`a.png`, `a.jpg`) are written as `<name>.edited.png` (`a.png.edited.png`, `a.jpg.edited.png`)."""
    def folder(src: Path) -> Path:
        return out if out is not None else src.parent

    first = {src: folder(src) / f"{src.stem}{OUTPUT_SUFFIX}" for src in inputs}
    taken = [dest.resolve() for dest in first.values()]
    dests = {src: (dest if taken.count(dest.resolve()) == 1 else folder(src) / f"{src.name}{OUTPUT_SUFFIX}")
             for src, dest in first.items()}
    for src, dest in dests.items():
        if dest.resolve() == src.resolve():  # cannot happen with the suffix, kept as the guarantee
            raise EditInputError(f"{src}: the output would overwrite the input")
    return dests


# what `edit` takes, checked from the file's header before any pixel is decoded: the model works on
# multiples of 8 pixels (the VAE), and a picture above 4096² is more than a UNet edits in one piece
MIN_EDIT_SIDE = 8
MAX_EDIT_PIXELS = 4096 * 4096


def open_image(path: Path):
    """The image as RGB, once its header says it is an editable size (no decoding before that)."""
    from PIL import Image, UnidentifiedImageError

    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own, lower, limit is checked below
    try:
        img = Image.open(path)  # reads the header only
    except (UnidentifiedImageError, OSError) as err:
        raise EditInputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    with img:
        w, h = img.size
        if min(w, h) < MIN_EDIT_SIDE:
            raise EditInputError(f"{path}: {w}x{h} pixels is too small to edit: at least {MIN_EDIT_SIDE}x{MIN_EDIT_SIDE} "
                                 f"(the model works on multiples of {MIN_EDIT_SIDE} pixels)")
        if w * h > MAX_EDIT_PIXELS:
            raise EditInputError(f"{path}: {w}x{h} pixels ({w * h / 1e6:.0f} megapixels by its header) is larger than "
                                 f"editforge edit takes ({MAX_EDIT_PIXELS / 1e6:.1f} megapixels); resize it first")
        try:
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # a header that lies about its data
            raise EditInputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def edit_command(
    path: Annotated[Path, typer.Argument(help="an image (png, jpg, webp) or a folder of images", show_default=False)],
    instruction: Annotated[str, typer.Argument(help='the edit, e.g. "make it snowy"', show_default=False)],
    image_guidance: Annotated[float, typer.Option(help="image guidance scale s_I (>= 1; higher: closer to the input)")] = 1.5,
    text_guidance: Annotated[float, typer.Option(help="text guidance scale s_T (> 1)")] = 7.5,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: train.sample_steps of the config)")] = None,
    seed: Annotated[int, typer.Option(help="noise seed (the same for every image)")] = 0,
    model: Annotated[str | None, typer.Option(help="any diffusers (SDXL) InstructPix2Pix folder (default: the "
                                                   "model `editforge train` finished for this config)")] = None,
    preset: Preset = "demo", overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option(help="write the edits into this folder (default: next to each input)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default: train.device)")] = None,
    debug: Debug = False,
) -> None:
    """Edit an image, or every image in a folder, with the trained model (or --model PATH)."""
    from flows.evaluate import check_device

    cfg = load_or_exit(preset, overrides, root="none")  # the model's run is read by resolve_model, if at all
    with reported(debug):
        from tasks.train.evaluate import command_args, resolve_model

        if image_guidance < 1 or text_guidance <= 1:  # the pipeline would silently skip guidance (tasks.train.infer)
            raise ValueError(f"--image-guidance {image_guidance:g} / --text-guidance {text_guidance:g}: image guidance "
                             "must be >= 1 and text guidance > 1 (the paper: 1.5 / 7.5)")
        steps = steps if steps is not None else cfg.train.sample_steps
        if steps < 1:
            raise ValueError(f"--steps {steps}: must be >= 1")
        if device:
            check_device(device)
        inputs = input_images(path)
        if out is not None and out.exists() and not out.is_dir():
            raise EditInputError(f"--out {out}: exists and is not a folder")
        dests = output_paths(inputs, out)
        images = {src: open_image(src) for src in inputs}  # every input readable before the model is looked for
        folder, _ = resolve_model(cfg, model, None, command_args(preset, overrides))

        from tasks.common.devices import torch_device
        from tasks.train.evaluate import quiet_loading
        from tasks.train.infer import edit_image
        from tasks.train.model import load_pipeline

        quiet_loading()
        pipe = load_pipeline(folder, device=torch_device(device or cfg.train.device, "--device" if device else "train.device"))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        for src, dest in dests.items():
            started = time.perf_counter()
            edited = edit_image(pipe, images[src], instruction, guidance_scale=text_guidance,
                                image_guidance_scale=image_guidance, steps=steps, seed=seed)
            tmp = dest.with_name(f".{dest.name}.tmp")
            edited.save(tmp, format="PNG")
            tmp.replace(dest)
            w, h = images[src].size
            resized = "" if edited.size == (w, h) else f" (input {w}x{h})"
            typer.echo(f"{src} -> {dest}  {edited.width}x{edited.height}{resized}, {steps} steps, image guidance "
                       f"{image_guidance:g}, text guidance {text_guidance:g}, seed {seed}, "
                       f"{time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(edit_command, argv, "python -m flows.edit", __doc__)


if __name__ == "__main__":
    sys.exit(main())
