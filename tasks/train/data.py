"""The training data: WebDataset shards → augmented (original, edited, instruction) batches.

Shards are the pack stage's (`pack/<hash>/index.json` lists their URLs per split; samples carry `input.<ext>`,
`edited.<ext>`, `instruction.txt`, `json`). They are opened through fsspec, so local paths, `s3://`,
`gs://` and `memory://` all work, and read with webdataset's own tar expander and key grouping.

Augmentation follows the reference `edit_dataset.py` (paper: "images are first resized randomly between
256 and 288 pixels and then cropped to 256", plus random horizontal flips): one random size in
[res, res * 288/256], the same resize, crop window and flip for both images of a pair, pixels in [-1, 1].
The reference squashes to size x size; here the shorter side goes to that size (identical for the square
images the render stage writes). The instruction is tokenized with the model's CLIP tokenizer (padded to 77).

Order is a pure function of the seed, so a resumed run sees exactly the data an uninterrupted run would:

- epoch `e` shuffles the shard list with `Random(seed, e)`, then samples pass a seeded shuffle buffer;
- each data slot (process x DataLoader worker) reads every `n`-th shard (or every `n`-th sample when
  there are fewer shards than slots); torch's DataLoader takes batches from its workers round-robin;
- with `sampling="per_triplet"` (the reference `edit_dataset.py`: one item per triplet, a random one of its
  kept pairs each time) epoch `e` keeps one pair per triplet, drawn with `Random(seed, e, triplet)` from
  the triplet's pairs in key order; the triplet of a sample is its key without the `_<seed>` suffix
  (`{caption_id}_{seed}`, the pack stage's keys). The keys are listed once from the tar headers;
  `per_pair` keeps every pair (diffusers' example: a triplet with 4 kept pairs is seen 4 times as often);
- each sample's augmentation draws from `Random(seed, epoch, key)`, independent of what came before;
- the stream repeats epochs forever (training is counted in steps); `skip_batches` fast-forwards a
  resumed run past the batches already trained on without decoding them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from tasks.common import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Augment:
    """Random resize in [resolution, resolution * max_resize_ratio], crop to resolution, flip both images."""

    resolution: int
    max_resize_ratio: float = 288 / 256
    flip_prob: float = 0.5


@dataclass
class EditExample:
    key: str
    original: Image.Image
    edited: Image.Image
    instruction: str


def shard_urls(index_url: str, split: str = "train") -> list[str]:
    """The shard URLs of `split` listed by an `index.json` (the pack stage's, or any of that format)."""
    from tasks.pack.index import resolve

    index = resolve(storage.read_json(index_url), index_url)
    try:
        return list(index["splits"][split]["shards"])
    except KeyError as err:
        raise ValueError(f"{index_url}: no split {split!r} (has {sorted(index.get('splits', {}))})") from err


def _open_shards(urls: list[str]) -> Iterator[dict[str, Any]]:
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (`__key__` plus raw bytes per extension) of `urls`, in order."""
    return group_by_keys(tar_file_expander(_open_shards(urls)))


def _field(sample: dict[str, Any], name: str) -> bytes:
    for ext in IMAGE_EXTS:
        if f"{name}.{ext}" in sample:
            return sample[f"{name}.{ext}"]
    raise KeyError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no {name}.<{'|'.join(IMAGE_EXTS)}>")


def decode(sample: dict[str, Any]) -> EditExample:
    import io

    def image(name: str) -> Image.Image:
        return Image.open(io.BytesIO(_field(sample, name))).convert("RGB")

    text = sample.get("instruction.txt")
    if text is None:
        raise KeyError(f"sample {sample.get('__key__')!r} has no instruction.txt")
    return EditExample(sample["__key__"], image("input"), image("edited"), text.decode("utf-8").strip())


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → float tensor (3, H, W) in [-1, 1], as the reference (`2 * x / 255 - 1`)."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).mul(2.0 / 255.0).sub(1.0)


def augment_pair(original: Image.Image, edited: Image.Image, aug: Augment,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random resize, crop window and flip for both images; tensors (3, res, res) in [-1, 1]."""
    a, b, _ = augment_pair_with_geometry(original, edited, aug, rng)
    return a, b


def augment_pair_with_geometry(original: Image.Image, edited: Image.Image, aug: Augment, rng: random.Random
                               ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int, int, int]]:
    """`augment_pair` plus SDXL's micro-conditioning of the view: (original height, width, crop top, crop
    left, target height, width) — the source image's size, the crop's corner in the resized image."""
    res = aug.resolution
    size = rng.randint(res, max(res, math.floor(res * aug.max_resize_ratio)))
    w, h = original.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    left, top = rng.randint(0, new[0] - res), rng.randint(0, new[1] - res)
    flip = rng.random() < aug.flip_prob
    out = []
    for img in (original, edited):
        img = img.resize(new, Image.Resampling.LANCZOS).crop((left, top, left + res, top + res))
        out.append(to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img))
    return out[0], out[1], (h, w, top, left, res, res)


def center_pair(example: EditExample, resolution: int) -> EditExample:
    """Deterministic view for evaluation: shorter side to `resolution`, centre crop."""

    def fit(img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = resolution / min(w, h)
        new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        left, top = (new[0] - resolution) // 2, (new[1] - resolution) // 2
        return img.resize(new, Image.Resampling.LANCZOS).crop((left, top, left + resolution, top + resolution))

    return EditExample(example.key, fit(example.original), fit(example.edited), example.instruction)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """CLIP token ids padded/truncated to the tokenizer's max length (77), as the pipeline encodes prompts."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


SAMPLING = ("per_triplet", "per_pair")


def triplet_of(key: str) -> str:
    """The triplet a sample belongs to: its key `{caption_id}_{seed}` without the seed."""
    return key.rsplit("_", 1)[0]


def sample_keys(urls: list[str]) -> list[str]:
    """Every sample key of `urls`, in shard order, from the tar member names (no image is decoded)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            # a seekable file (local, object stores through fsspec): headers only, seeking past the images
            seekable = getattr(stream, "seekable", lambda: False)()
            tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|")
            for member in tar:
                if not member.isfile():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and (not keys or keys[-1] != prefix):
                    keys.append(prefix)
            tar.close()
    return keys


def pairs_by_triplet(keys: list[str]) -> dict[str, list[str]]:
    """Sample keys grouped by triplet, each group sorted (the draw does not depend on shard order)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(triplet_of(key), []).append(key)
    return {t: sorted(set(ks)) for t, ks in groups.items()}


def choose_pairs(groups: dict[str, list[str]], seed: int, epoch: int) -> set[str]:
    """The keys epoch `epoch` trains on under `per_triplet`: one pair per triplet, uniformly at random."""
    return {random.Random(f"{seed}/pair/{epoch}/{t}").choice(ks) for t, ks in groups.items()}


def epoch_samples(urls: list[str], seed: int, epoch: int, shuffle_buffer: int, slot: int = 0,
                  num_slots: int = 1, keep: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """One epoch of raw samples for data slot `slot` of `num_slots`, in the seeded order.

    `keep`: only these keys (the epoch's `choose_pairs` under `per_triplet`); None keeps every sample."""
    shards = list(urls)
    random.Random(f"{seed}/shards/{epoch}").shuffle(shards)
    by_shard = len(shards) >= num_slots
    mine = shards[slot::num_slots] if by_shard else shards
    stream = raw_samples(mine)
    if keep is not None:
        stream = (s for s in stream if s["__key__"] in keep)
    if not by_shard:
        stream = (s for i, s in enumerate(stream) if i % num_slots == slot)
    rng = random.Random(f"{seed}/samples/{epoch}/{slot}")
    yield from _shuffle(iter(stream), bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)


class EditPairStream(IterableDataset):
    """Endless seeded stream of training batches (dicts of tensors), split across processes and workers.

    A batch: `original_pixel_values`, `edited_pixel_values` (B, 3, res, res) in [-1, 1], `input_ids`
    (B, 77) (and `input_ids_2` with a second tokenizer, SDXL), `time_ids` (B, 6: SDXL's original size,
    crop corner, target size of each view), `keys`, `instructions`, `epochs` (each sample's epoch).
    """

    def __init__(self, urls: list[str], tokenizer, aug: Augment, batch_size: int, seed: int,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, rank: int = 0, world_size: int = 1,
                 sampling: str = "per_triplet", tokenizer_2=None):
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        if sampling not in SAMPLING:
            raise ValueError(f"train.sampling={sampling!r}: use one of {', '.join(SAMPLING)}")
        self.urls, self.tokenizer, self.tokenizer_2, self.aug = list(urls), tokenizer, tokenizer_2, aug
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.skip_batches, self.rank, self.world_size = skip_batches, rank, world_size
        self.groups = pairs_by_triplet(sample_keys(self.urls)) if sampling == "per_triplet" else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        # the DataLoader takes batch i from worker i % workers: this worker's share of the skipped batches
        skip = len(range(worker, self.skip_batches, workers)) * self.batch_size
        batch: list[tuple[int, EditExample]] = []
        for epoch in count():
            seen = 0
            keep = None if self.groups is None else choose_pairs(self.groups, self.seed, epoch)
            for raw in epoch_samples(self.urls, self.seed, epoch, self.shuffle_buffer, slot, num_slots, keep):
                seen += 1
                if skip:
                    skip -= 1
                    continue
                batch.append((epoch, decode(raw)))
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
            if seen == 0:
                raise ValueError(f"data slot {slot}/{num_slots} got no samples from {len(self.urls)} shard(s)")

    def collate(self, items: list[tuple[int, EditExample]]) -> dict[str, Any]:
        originals, editeds, views = [], [], []
        for epoch, ex in items:
            rng = random.Random(f"{self.seed}/augment/{epoch}/{ex.key}")
            original, edited, view = augment_pair_with_geometry(ex.original, ex.edited, self.aug, rng)
            originals.append(original)
            editeds.append(edited)
            views.append(view)
        instructions = [ex.instruction for _, ex in items]
        extra = {} if self.tokenizer_2 is None else {"input_ids_2": tokenize(self.tokenizer_2, instructions)}
        return {
            "original_pixel_values": torch.stack(originals),
            "edited_pixel_values": torch.stack(editeds),
            "input_ids": tokenize(self.tokenizer, instructions),
            **extra,
            "time_ids": torch.tensor(views, dtype=torch.float32),
            "keys": [ex.key for _, ex in items],
            "instructions": instructions,
            "epochs": [epoch for epoch, _ in items],
        }


def make_train_loader(urls: list[str], tokenizer, aug: Augment, batch_size: int, seed: int,
                      shuffle_buffer: int = 1000, num_workers: int = 0, skip_batches: int = 0,
                      rank: int = 0, world_size: int = 1, sampling: str = "per_triplet",
                      tokenizer_2=None) -> Iterator[dict[str, Any]]:
    """An endless iterator of batches; `num_workers` DataLoader processes decode and augment in parallel."""
    dataset = EditPairStream(urls, tokenizer, aug, batch_size, seed, shuffle_buffer, skip_batches, rank, world_size,
                             sampling, tokenizer_2)
    if num_workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                        prefetch_factor=2)
    return iter(loader)


def read_examples(urls: list[str], limit: int = 1) -> list[EditExample]:
    """The first `limit` samples of `urls` in shard order (for sample edits on the val split)."""
    out: list[EditExample] = []
    for raw in raw_samples(urls):
        out.append(decode(raw))
        if len(out) >= limit:
            break
    return out
