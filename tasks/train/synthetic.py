"""Small synthetic edit shards in the pack stage's exact layout, and a tiny editing model, for tests and smoke runs.

Each sample is its own triplet (key `synthetic<seed>-<index>_<seed>`, the pack stage's `{caption_id}_{seed}`
form). Each sample is a coloured square on a plain background (input) and the same scene after a simple,
learnable edit (edited), with the instruction that describes it ("make the square red", "make the
background blue"). Shards are written with the pack stage's own `write_shard` (TarWriter, mtime 0,
atomic) and listed in an `index.json` of the same format as `pack/<hash>/index.json`, so the training flow reads
them exactly as it reads real shards.
"""

from __future__ import annotations

import io
import json
import random

from PIL import Image, ImageDraw

from tasks.common import storage
from tasks.pack.shards import write_shard

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}


def _scene(
    size: int, square: tuple[int, int, int], background: tuple[int, int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).rectangle(box, fill=square)
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG"}[fmt], **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def synthetic_sample(index: int, size: int = 64, seed: int = 0, fmt: str = "jpg") -> dict[str, bytes | str]:
    """One WebDataset sample dict (key without dots, input/edited images, instruction, json)."""
    rng = random.Random(f"{seed}/{index}")
    names = list(COLOURS)
    square, background, target = rng.sample(names, 3)
    lo = rng.randint(size // 8, size // 3)
    hi = rng.randint(size // 2, size - size // 8)
    box = (lo, lo + rng.randint(0, size // 8), hi, hi)
    original = _scene(size, COLOURS[square], COLOURS[background], box)
    if rng.random() < 0.5:
        edited, instruction = (
            _scene(size, COLOURS[target], COLOURS[background], box),
            f"make the square {target}",
        )
        output = f"a {target} square on {background}"
    else:
        edited, instruction = (
            _scene(size, COLOURS[square], COLOURS[target], box),
            f"make the background {target}",
        )
        output = f"a {square} square on {target}"
    record = {
        "input": f"a {square} square on {background}",
        "edit": instruction,
        "output": output,
        "synthetic": True,
        "index": index,
    }
    return {
        "__key__": f"synthetic{seed:04d}-{index:06d}_{seed}",  # `{triplet}_{seed}` as the pack stage's keys
        f"input.{fmt}": _encode(original, fmt),
        f"edited.{fmt}": _encode(edited, fmt),
        "instruction.txt": instruction.encode("utf-8"),
        "json": json.dumps(record, sort_keys=True).encode("utf-8"),
    }


def write_synthetic_shards(
    folder: str,
    train_samples: int = 24,
    val_samples: int = 4,
    per_shard: int = 8,
    size: int = 64,
    seed: int = 0,
    fmt: str = "jpg",
) -> str:
    """Write `train-*.tar` / `val-*.tar` shards and `index.json` under `folder`; return the index URL."""
    shards = []
    start = 0
    for split, count in (("train", train_samples), ("val", val_samples)):
        for n, first in enumerate(range(0, count, per_shard)):
            samples = [
                synthetic_sample(start + i, size, seed, fmt)
                for i in range(first, min(count, first + per_shard))
            ]
            url = storage.url_join(folder, f"{split}-{n:06d}.tar")
            write_shard(url, samples)
            shards.append({"url": url, "split": split, "samples": len(samples), "partition_id": 0})
        start += count
    index = {
        "format": "webdataset",
        "sample_layout": {"image_format": fmt, "keys": ["input", "edited", "instruction.txt", "json"]},
        "splits": {
            split: {
                "shards": [s["url"] for s in shards if s["split"] == split],
                "samples": sum(s["samples"] for s in shards if s["split"] == split),
            }
            for split in ("train", "val")
        },
        "shards": shards,
        "config_hash": f"synthetic-{seed}-{train_samples}-{val_samples}-{size}-{fmt}",
    }
    index_url = storage.url_join(folder, "index.json")
    storage.write_json_atomic(index_url, index)
    return index_url


def write_tiny_editing_model(
    folder: str, sdxl: bool = False, image_weight_scale: float = 0.1, seed: int = 0
) -> str:
    """An untrained (SDXL) InstructPix2Pix pipeline folder on the `tiny` (`tiny-sdxl`) components, in seconds.

    `conv_in`'s image channels get seeded random weights (`image_weight_scale`; zero is what training starts
    from, under which the image guidance scale changes nothing), so edits depend on the input image and on
    the image guidance scale, as a trained model's do."""
    import torch

    from tasks.train.model import base_folder, load_editing_model, save_pipeline

    comps = load_editing_model("tiny-sdxl" if sdxl else "tiny")
    if image_weight_scale:
        weight = comps.unet.conv_in.weight
        noise = torch.randn(weight[:, 4:].shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            weight[:, 4:] = noise * image_weight_scale
    save_pipeline(comps, folder, base=base_folder(comps))
    return folder
