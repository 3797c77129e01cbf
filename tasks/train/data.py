"""The training data: WebDataset shards → augmented (original, edited, instruction) batches.

Shards are the pack stage's (`pack/<hash>/index.json` lists their URLs per split; samples carry `input.<ext>`,
`edited.<ext>`, `instruction.txt`, `json`). They are opened through fsspec, so local paths, `s3://`,
`gs://` and `memory://` all work, and read with webdataset's own tar expander and key grouping.

Augmentation follows the reference `edit_dataset.py` (paper: "images are first resized randomly between
256 and 288 pixels and then cropped to 256", plus random horizontal flips): one random size in
[res, res * 288/256], the same resize, crop window and flip for both images of a pair, pixels in [-1, 1].
The reference squashes to size x size; here the shorter side goes to that size (identical for the square
images the render stage writes). The instruction is tokenized with the model's CLIP tokenizer (padded to 77).

Order is a pure function of the seed, and the same for any number of processes and DataLoader workers,
so a resumed run sees exactly the data an uninterrupted run would, on 1 or N GPUs:

- the samples are listed once from the tar headers (:class:`SampleIndex`: key, shard, byte range; no image
  decoded); keys must be unique;
- epoch `e` shuffles the shard list with `Random(seed, e)`, then the samples pass a seeded shuffle buffer
  (webdataset's): one global sequence per epoch, and the epochs follow each other forever (training is
  counted in steps);
- with `sampling="per_triplet"` (the reference `edit_dataset.py`: one item per triplet, a random one of its
  kept pairs each time) epoch `e` keeps one pair per triplet, drawn with `Random(seed, e, triplet)` from
  the triplet's pairs in key order; the triplet of a sample is its key without the `_<seed>` suffix
  (`{caption_id}_{seed}`, the pack stage's keys); `per_pair` keeps every pair (diffusers' example: a
  triplet with 4 kept pairs is seen 4 times as often);
- the sequence is cut into global micro-batches of `batch_size`; with N processes, process r trains
  global batches r, r + N, r + 2N, ... and its DataLoader workers take its batches round-robin, each
  reading only its own samples' bytes (split below the shard: any shard count gives every process a
  disjoint, equal share of each epoch); `skip_batches` starts a resumed process past its batches already
  trained on, without reading them;
- each sample's augmentation draws from `Random(seed, epoch, key)`, independent of what came before.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

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
    return index_samples(urls).keys


def pairs_by_triplet(keys: list[str]) -> dict[str, list[str]]:
    """Sample keys grouped by triplet, each group sorted (the draw does not depend on shard order)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(triplet_of(key), []).append(key)
    return {t: sorted(set(ks)) for t, ks in groups.items()}


def choose_pairs(groups: dict[str, list[str]], seed: int, epoch: int) -> set[str]:
    """The keys epoch `epoch` trains on under `per_triplet`: one pair per triplet, uniformly at random."""
    return {random.Random(f"{seed}/pair/{epoch}/{t}").choice(ks) for t, ks in groups.items()}


TAR_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped meta files


@dataclass
class SampleIndex:
    """Every sample of the shards, from their tar headers: its key, shard and byte range (header of its first
    file to the end of its last), in shard order. What every process and worker computes the order from."""

    urls: list[str]
    keys: list[str]
    shard: np.ndarray  # int32, index into urls
    start: np.ndarray  # int64
    end: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.keys)

    def by_shard(self) -> list[np.ndarray]:
        """The sample indices of each shard, in order."""
        bounds = np.searchsorted(self.shard, np.arange(len(self.urls) + 1))
        return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(self.urls))]


def index_samples(urls: list[str]) -> SampleIndex:
    """List the samples of `urls` from the tar headers (seeking past the images where the file allows it).

    Files are grouped into samples as webdataset does (consecutive files with the same key, meta files
    skipped); a key found twice is a ValueError naming it and its shards."""
    import tarfile

    keys: list[str] = []
    shard: list[int] = []
    start: list[int] = []
    end: list[int] = []
    where: dict[str, str] = {}
    for n, url in enumerate(urls):
        with fsspec.open(url, "rb") as stream:
            seekable = getattr(stream, "seekable", lambda: False)()
            tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|")
            for member in tar:
                if not member.isreg() or _META.match(member.name):
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if not keys or shard[-1] != n or keys[-1] != prefix:
                    if prefix in where:
                        raise ValueError(f"sample key {prefix!r} appears twice (in {where[prefix]} and {url}): "
                                         "the training shards need unique keys")
                    where[prefix] = url
                    keys.append(prefix)
                    shard.append(n)
                    start.append(member.offset)
                    end.append(0)
                end[-1] = member.offset_data + member.size
            tar.close()
    return SampleIndex(list(urls), keys, np.asarray(shard, dtype=np.int32), np.asarray(start, dtype=np.int64),
                       np.asarray(end, dtype=np.int64))


def read_sample(index: SampleIndex, i: int) -> dict[str, Any]:
    """The raw sample `i` of `index` (`__key__` plus bytes per extension), reading only its byte range."""
    url = index.urls[int(index.shard[i])]
    fs, path = storage.filesystem(url)
    begin, finish = int(index.start[i]), int(index.end[i])
    blob = fs.cat_file(path, start=begin, end=finish + (-(finish - begin) % TAR_BLOCK))
    samples = list(group_by_keys(tar_file_expander(iter([{"url": url, "stream": io.BytesIO(blob)}]))))
    if len(samples) != 1 or samples[0]["__key__"] != index.keys[i]:
        raise ValueError(f"{url}: bytes {begin}-{finish} do not hold sample {index.keys[i]!r} any more (was the "
                         "shard rewritten while training?)")
    return samples[0]


def epoch_order(index: SampleIndex, seed: int, epoch: int, shuffle_buffer: int,
                groups: dict[str, list[str]] | None = None) -> list[int]:
    """The sample indices of epoch `epoch` in training order: shards shuffled with `Random(seed, epoch)`, then
    webdataset's shuffle buffer; with `groups` (`per_triplet`) only the epoch's `choose_pairs`."""
    order = list(range(len(index.urls)))
    random.Random(f"{seed}/shards/{epoch}").shuffle(order)
    per_shard = index.by_shard()
    refs = [int(i) for s in order for i in per_shard[s]]
    if groups is not None:
        keep = choose_pairs(groups, seed, epoch)
        refs = [i for i in refs if index.keys[i] in keep]
    rng = random.Random(f"{seed}/samples/{epoch}/0")
    return list(_shuffle(iter(refs), bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng))


class EditPairStream(IterableDataset):
    """Endless seeded stream of training batches (dicts of tensors) for one process of `world_size`.

    A batch: `original_pixel_values`, `edited_pixel_values` (B, 3, res, res) in [-1, 1], `input_ids`
    (B, 77) (and `input_ids_2` with a second tokenizer, SDXL), `time_ids` (B, 6: SDXL's original size,
    crop corner, target size of each view), `keys`, `instructions`, `epochs` (each sample's epoch),
    `batch` (its global micro-batch index: the same samples whatever the process count).
    """

    def __init__(self, urls: list[str], tokenizer, aug: Augment, batch_size: int, seed: int,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, rank: int = 0, world_size: int = 1,
                 sampling: str = "per_triplet", tokenizer_2=None, index: SampleIndex | None = None):
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        if sampling not in SAMPLING:
            raise ValueError(f"train.sampling={sampling!r}: use one of {', '.join(SAMPLING)}")
        self.urls, self.tokenizer, self.tokenizer_2, self.aug = list(urls), tokenizer, tokenizer_2, aug
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.skip_batches, self.rank, self.world_size = skip_batches, rank, world_size
        self.index = index if index is not None else index_samples(self.urls)
        self.groups = pairs_by_triplet(self.index.keys) if sampling == "per_triplet" else None
        self.epoch_size = len(self.groups) if self.groups is not None else len(self.index)
        if self.epoch_size == 0:
            raise ValueError(f"no training samples in {len(self.urls)} shard(s)")
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # at most the previous one
            self._orders[epoch] = epoch_order(self.index, self.seed, epoch, self.shuffle_buffer, self.groups)
        return self._orders[epoch]

    def global_batch(self, j: int) -> list[tuple[int, EditExample]]:
        """Global micro-batch `j`: the `batch_size` samples from position `j * batch_size` of the endless
        sequence of epochs, each with its epoch."""
        items = []
        for position in range(j * self.batch_size, (j + 1) * self.batch_size):
            epoch, at = divmod(position, self.epoch_size)
            items.append((epoch, decode(read_sample(self.index, self.order(epoch)[at]))))
        return items

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes this process's batch i from worker i % workers, counting from the first it yields
        local = self.skip_batches + worker
        while True:
            j = local * self.world_size + self.rank
            yield {**self.collate(self.global_batch(j)), "batch": j}
            local += workers

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
                      tokenizer_2=None, index: SampleIndex | None = None) -> Iterator[dict[str, Any]]:
    """An endless iterator of this process's batches; `num_workers` DataLoader processes decode and augment in
    parallel (the batches are the same for any number); `index`: the shards' :class:`SampleIndex`, if listed."""
    dataset = EditPairStream(urls, tokenizer, aug, batch_size, seed, shuffle_buffer, skip_batches, rank, world_size,
                             sampling, tokenizer_2, index)
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
