"""The WebDataset training pipeline: shapes, range, paired augmentation, seeded order, resume, epochs."""

import io
import random

import pytest
import torch
from PIL import Image

from tasks.common.tiny import ensure_tiny
from tasks.pack.shards import write_shard
from tasks.train.data import (
    Augment,
    augment_pair,
    center_pair,
    make_train_loader,
    read_examples,
    shard_urls,
    to_tensor,
)
from tasks.train.synthetic import write_synthetic_shards


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ensure_tiny("diffusion"), subfolder="tokenizer")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), train_samples=20, val_samples=3, per_shard=6)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _half_and_half(size: int = 72) -> Image.Image:
    """Left half black, right half white, with a grey marker row: any flip or crop mismatch shows."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    img.paste((255, 255, 255), (size // 2, 0, size, size))
    img.paste((128, 128, 128), (0, size // 3, size, size // 3 + 2))
    return img


def test_batches_have_the_right_shapes_range_and_tokens(index, tokenizer):
    loader = make_train_loader(shard_urls(index), tokenizer, Augment(64), batch_size=4, seed=0, shuffle_buffer=8)
    batch = next(loader)
    for name in ("original_pixel_values", "edited_pixel_values"):
        x = batch[name]
        assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id
    assert all(i.startswith("make the ") for i in batch["instructions"])
    assert len(set(batch["keys"])) == 4


def test_both_images_get_the_same_resize_crop_and_flip(tmp_path, tokenizer):
    img = _png(_half_and_half())
    samples = [{"__key__": f"k{i:03d}", "input.png": img, "edited.png": img, "instruction.txt": b"same", "json": b"{}"}
               for i in range(8)]
    write_shard(str(tmp_path / "train-000000.tar"), samples)
    urls = [str(tmp_path / "train-000000.tar")]
    for flip_prob, left_is_dark in ((0.0, True), (1.0, False)):
        batch = next(make_train_loader(urls, tokenizer, Augment(64, 288 / 256, flip_prob), 8, seed=3, shuffle_buffer=4))
        original, edited = batch["original_pixel_values"], batch["edited_pixel_values"]
        assert torch.equal(original, edited)
        left, right = original[..., :16].mean().item(), original[..., -16:].mean().item()
        assert (left < right) == left_is_dark


def test_augment_pair_resizes_within_range_crops_and_flips():
    img = _half_and_half(64)
    same = augment_pair(img, img, Augment(64, 1.0, 0.0), random.Random(0))
    assert torch.equal(same[0], to_tensor(img)) and torch.equal(same[1], to_tensor(img))
    flipped = augment_pair(img, img, Augment(64, 1.0, 1.0), random.Random(0))
    assert torch.equal(flipped[0], torch.flip(to_tensor(img), dims=[-1]))
    calls = []

    class Spy(random.Random):
        def randint(self, a, b):
            calls.append((a, b))
            return super().randint(a, b)

    for seed in range(20):
        a, b = augment_pair(img, img, Augment(256), Spy(seed))
        assert a.shape == b.shape == (3, 256, 256)
    assert calls[0] == (256, 288)  # the paper's 256-288 resize range for 256 crops, drawn first


def test_order_is_seeded_and_resume_skips_exactly(index, tokenizer):
    urls = shard_urls(index)

    def keys(seed, n, skip=0):
        loader = make_train_loader(urls, tokenizer, Augment(64), 4, seed=seed, shuffle_buffer=8, skip_batches=skip)
        return [next(loader) for _ in range(n)]

    full = keys(0, 7)
    assert [b["keys"] for b in keys(0, 7)] == [b["keys"] for b in full]
    assert [b["keys"] for b in keys(1, 7)] != [b["keys"] for b in full]
    resumed = keys(0, 3, skip=4)
    for a, b in zip(resumed, full[4:]):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["original_pixel_values"], b["original_pixel_values"])
        assert torch.equal(a["edited_pixel_values"], b["edited_pixel_values"])


def test_epochs_cover_every_sample_once_and_reshuffle(index, tokenizer):
    loader = make_train_loader(shard_urls(index), tokenizer, Augment(64), 5, seed=0, shuffle_buffer=8)
    batches = [next(loader) for _ in range(8)]  # 40 samples = 2 epochs of 20
    keys = [k for b in batches for k in b["keys"]]
    epochs = [e for b in batches for e in b["epochs"]]
    first, second = keys[:20], keys[20:]
    assert sorted(first) == sorted(second) and len(set(first)) == 20
    assert first != second
    assert epochs == [0] * 20 + [1] * 20


def test_the_batches_are_the_same_for_any_number_of_workers_and_processes(index, tokenizer):
    """Global micro-batch j is the same samples and pixels whether 1 process or 3 train, with 0 or 2 workers
    each; process r of N trains batches r, r + N, ... and a resumed one starts past its own."""
    urls = shard_urls(index)
    whole = make_train_loader(urls, tokenizer, Augment(64), 4, seed=0, shuffle_buffer=4)
    reference = [next(whole) for _ in range(9)]
    assert [b["batch"] for b in reference] == list(range(9))
    for world, workers, skip in ((1, 2, 0), (3, 0, 0), (3, 2, 1)):
        for rank in range(world):
            loader = make_train_loader(urls, tokenizer, Augment(64), 4, seed=0, shuffle_buffer=4, num_workers=workers,
                                       rank=rank, world_size=world, skip_batches=skip)
            for local in range(skip, 9 // world):
                batch, j = next(loader), local * world + rank
                assert batch["batch"] == j and batch["keys"] == reference[j]["keys"], (world, workers, rank)
                assert torch.equal(batch["original_pixel_values"], reference[j]["original_pixel_values"])


@pytest.mark.parametrize("per_shard", [20, 7, 3])  # 1 shard, 3 uneven shards, 7 shards
@pytest.mark.parametrize("world", [2, 3])
def test_every_process_gets_a_disjoint_equal_share_of_each_epoch_for_any_shard_count(tmp_path, per_shard, world):
    """The split is below the shard: 18 samples, any shard count, 2 or 3 processes of 3 per micro-batch —
    each epoch's 18 samples once, 18 / world per process (keys only: no image is decoded)."""
    from tasks.train.data import SAMPLING, epoch_order, index_samples

    urls = shard_urls(write_synthetic_shards(str(tmp_path), train_samples=18, val_samples=0, per_shard=per_shard,
                                             size=16))
    samples = index_samples(urls)
    assert len(samples) == 18 and len(set(samples.keys)) == 18 and "per_pair" in SAMPLING
    batch = 3
    for epoch in range(2):
        order = [samples.keys[i] for i in epoch_order(samples, 0, epoch, 4)]
        batches = [order[j * batch:(j + 1) * batch] for j in range(18 // batch)]
        shares = [[k for j, b in enumerate(batches) if j % world == r for k in b] for r in range(world)]
        assert [len(s) for s in shares] == [18 // world] * world
        assert sorted(k for s in shares for k in s) == sorted(samples.keys)


def test_sample_index_reads_each_sample_from_its_own_bytes_and_refuses_duplicate_keys(index, tmp_path):
    from tasks.train.data import index_samples, raw_samples, read_sample

    urls = shard_urls(index)
    samples = index_samples(urls)
    streamed = list(raw_samples(urls))
    assert samples.keys == [s["__key__"] for s in streamed] and len(samples.urls) == 4
    for i in (0, 5, len(samples) - 1):
        got = read_sample(samples, i)
        assert {k: v for k, v in got.items() if k != "__url__"} == \
            {k: v for k, v in streamed[i].items() if k not in ("__url__", "__local_path__")}
    write_shard(str(tmp_path / "again.tar"), [{"__key__": samples.keys[3], "instruction.txt": b"x", "json": b"{}"}])
    with pytest.raises(ValueError, match=f"sample key '{samples.keys[3]}' appears twice"):
        index_samples([*urls, str(tmp_path / "again.tar")])


def test_val_examples_and_index_errors(index):
    examples = read_examples(shard_urls(index, "val"), 2)
    assert len(examples) == 2 and examples[0].original.size == (64, 64)
    view = center_pair(examples[0], 32)
    assert view.original.size == view.edited.size == (32, 32)
    with pytest.raises(ValueError, match="no split 'test'"):
        shard_urls(index, "test")


def _triplet_shards(folder, pairs: dict[str, int], per_shard: int = 3) -> list[str]:
    """Shards of synthetic samples keyed `{triplet}_{seed}` as the pack stage writes them."""
    from tasks.train.synthetic import synthetic_sample

    samples = []
    for t, (triplet, n) in enumerate(sorted(pairs.items())):
        for seed in range(n):
            sample = synthetic_sample(10 * t + seed, size=32)
            sample["__key__"] = f"{triplet}_{seed * 7 + 3}"
            samples.append(sample)
    urls = []
    for n, first in enumerate(range(0, len(samples), per_shard)):
        url = str(folder / f"train-{n:06d}.tar")
        write_shard(url, samples[first: first + per_shard])
        urls.append(url)
    return urls


def test_per_triplet_draws_triplets_equally_and_pairs_uniformly():
    from collections import Counter

    from tasks.train.data import choose_pairs, pairs_by_triplet

    keys = [f"aaaa_{s}" for s in (3, 10, 17, 24)] + ["bbbb_5"]
    groups = pairs_by_triplet(keys)
    assert groups == {"aaaa": ["aaaa_10", "aaaa_17", "aaaa_24", "aaaa_3"], "bbbb": ["bbbb_5"]}
    epochs = 8000
    picks = Counter(k for e in range(epochs) for k in choose_pairs(groups, seed=0, epoch=e))
    by_triplet = Counter()
    for key, n in picks.items():
        by_triplet[key.split("_")[0]] += n
    # one pair of each triplet per epoch: the 4-pair triplet is drawn as often as the 1-pair one
    assert by_triplet == {"aaaa": epochs, "bbbb": epochs}
    # within a triplet uniformly: each of 4 pairs ~2000 times (binomial sd ~39; 200 is a 5-sigma band)
    for key in groups["aaaa"]:
        assert abs(picks[key] - epochs / 4) < 200, picks
    assert choose_pairs(groups, 0, 5) == choose_pairs(groups, 0, 5)
    assert [choose_pairs(groups, 1, e) for e in range(20)] != [choose_pairs(groups, 0, e) for e in range(20)]


def test_the_stream_trains_on_one_pair_per_triplet_per_epoch_or_on_every_pair(tmp_path, tokenizer):
    from collections import Counter

    from tasks.train.data import choose_pairs, pairs_by_triplet, sample_keys

    urls = _triplet_shards(tmp_path, {"aaaa": 4, "bbbb": 1, "cccc": 2})
    keys = sample_keys(urls)
    assert len(keys) == 7 and len(set(keys)) == 7
    loader = make_train_loader(urls, tokenizer, Augment(32), 3, seed=0, shuffle_buffer=4)
    epochs = 40
    batches = [next(loader) for _ in range(epochs)]  # 3 triplets per epoch = one batch of 3
    counts = Counter()
    for e, batch in enumerate(batches):
        assert batch["epochs"] == [e] * 3
        assert sorted(k.split("_")[0] for k in batch["keys"]) == ["aaaa", "bbbb", "cccc"]
        assert set(batch["keys"]) == choose_pairs(pairs_by_triplet(keys), 0, e)
        counts.update(batch["keys"])
    assert counts["bbbb_3"] == epochs and sum(v for k, v in counts.items() if k.startswith("aaaa")) == epochs
    assert len([k for k in counts if k.startswith("aaaa")]) >= 3  # different pairs of the triplet over epochs

    every = make_train_loader(urls, tokenizer, Augment(32), 7, seed=0, shuffle_buffer=4, sampling="per_pair")
    assert sorted(next(every)["keys"]) == sorted(keys)


def test_sampling_setting_is_validated_and_defaults_to_the_reference():
    from tasks.common.config import ConfigError, TrainConfig, load_config

    assert TrainConfig().sampling == "per_triplet" and TrainConfig().max_grad_norm is None
    with pytest.raises(ConfigError, match="train.sampling"):
        load_config("demo", ["train.sampling=per_sample"])
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        load_config("demo", ["train.max_grad_norm=0"])
    assert load_config("demo", ["train.max_grad_norm=1.0"]).train.max_grad_norm == 1.0


def test_sdxl_time_ids_are_the_source_size_the_crop_corner_and_the_target_size():
    from tasks.train.data import augment_pair_with_geometry

    wide = Image.new("RGB", (96, 72), (0, 0, 0))
    _, _, view = augment_pair_with_geometry(wide, wide, Augment(64, 1.0, 0.0), random.Random(0))
    # 96x72 -> shorter side 64: 85x64, the crop's left edge anywhere in [0, 21], top 0
    h, w, top, left, th, tw = view
    assert (h, w, top, th, tw) == (72, 96, 0, 64, 64) and 0 <= left <= 85 - 64
    corners = {augment_pair_with_geometry(wide, wide, Augment(64), random.Random(s))[2][2:4] for s in range(30)}
    assert len(corners) > 5  # the corner follows each sample's random crop, not a fixed (0, 0)
