"""Build ``laion_aesthetics_demo.parquet``: a small, offline stand-in for LAION-Aesthetics V2 6.5+.

The captions come from ``captions.txt`` (hand-written, one per line). Every other column is
synthesised from a seeded NumPy generator, so the output is byte-for-byte reproducible; nothing in
it depends on the clock or the machine. The schema is LAION-Aesthetics V2's:
``URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark, AESTHETIC_SCORE, hash``.

To make the captions stage's de-duplication visible, the table also holds
  * ``N_CAPTION_REPEATS`` rows whose caption repeats an earlier row's caption, differing only in
    case and whitespace, posted under a new URL (a re-upload);
  * ``N_URL_REPEATS`` rows whose URL repeats an earlier row's URL, with a different caption.

Run from anywhere: ``python tasks/captions/demo/build_demo_parquet.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CAPTIONS_PATH = HERE / "captions.txt"
OUTPUT_PATH = HERE / "laion_aesthetics_demo.parquet"

SEED = 20221117  # arXiv 2211.09800 was submitted on 17 Nov 2022
N_CAPTION_REPEATS = 10
N_URL_REPEATS = 5
HOSTS = ("images.example.com", "cdn.example.org", "media.example.net")
# (width, height) shapes common in LAION-Aesthetics: landscape, portrait and square images.
SHAPES = (
    (1024, 683),
    (1200, 800),
    (1600, 1067),
    (1920, 1080),
    (2048, 1365),
    (800, 600),
    (1280, 853),
    (683, 1024),
    (800, 1200),
    (1080, 1350),
    (1000, 1500),
    (1024, 1024),
    (1200, 1200),
    (600, 600),
)

SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.int64()),
        ("HEIGHT", pa.int64()),
        ("similarity", pa.float64()),
        ("punsafe", pa.float64()),
        ("pwatermark", pa.float64()),
        ("AESTHETIC_SCORE", pa.float64()),
        ("hash", pa.int64()),
    ]
)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used to check that duplicates are really duplicates."""
    return " ".join(text.split()).casefold()


def read_captions(path: Path = CAPTIONS_PATH) -> list[str]:
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for number, caption in enumerate(captions, start=1):
        key = normalise(caption)
        if key in seen:
            raise ValueError(f"{path.name} line {number} repeats line {seen[key]}: {caption!r}")
        seen[key] = number
    return captions


def image_url(caption: str, salt: str = "") -> str:
    """A stable, plausible image URL: ``https://<host>/<slug>-<hash>.jpg``."""
    digest = hashlib.sha1((salt + caption).encode("utf-8")).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:60].rstrip("-")
    return f"https://{HOSTS[int(digest[:2], 16) % len(HOSTS)]}/{slug}-{digest[:8]}.jpg"


def row_hash(url: str, text: str) -> int:
    """Signed 64-bit hash of (URL, TEXT), like LAION's ``hash`` column."""
    digest = hashlib.sha1(f"{url}\t{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def recase(caption: str, rng: np.random.Generator) -> str:
    """The same caption as a re-upload might spell it: other case, doubled or trailing spaces."""
    variants = (
        caption.lower(),
        caption.upper(),
        caption.replace(" ", "  ", 2),
        f"  {caption} ",
        caption.title(),
        caption.swapcase(),
    )
    for index in rng.permutation(len(variants)):
        if variants[index] != caption:
            return variants[index]
    raise ValueError(f"cannot vary {caption!r}")


def build_rows(captions: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """URLs and captions in table order, duplicates included."""
    texts = [captions[i] for i in rng.permutation(len(captions))]
    urls = [image_url(text) for text in texts]

    # Caption repeats: a later row re-posts an earlier caption under a new URL.
    originals = rng.choice(len(texts) // 2, size=N_CAPTION_REPEATS, replace=False)
    for original in sorted(originals.tolist(), reverse=True):
        position = int(rng.integers(original + 1, len(texts) + 1))
        text = recase(texts[original], rng)
        texts.insert(position, text)
        urls.insert(position, image_url(text, salt="repost"))

    # URL repeats: a later row (not itself a repeat) reuses an earlier row's URL for another caption.
    first_seen = {normalise(t): i for i, t in reversed(list(enumerate(texts)))}
    candidates = [i for i in range(len(texts) // 2, len(texts)) if first_seen[normalise(texts[i])] == i]
    for position in sorted(rng.choice(candidates, size=N_URL_REPEATS, replace=False).tolist()):
        urls[position] = urls[int(rng.integers(0, position))]
    return urls, texts


def build_table(captions: list[str], seed: int = SEED) -> pa.Table:
    rng = np.random.default_rng(seed)
    urls, texts = build_rows(captions, rng)
    n = len(texts)
    shapes = np.array(SHAPES, dtype=np.int64)[rng.integers(0, len(SHAPES), size=n)]
    # Aesthetic scores of the 6.5+ subset pile up just above the threshold.
    aesthetic = np.minimum(6.5 + rng.exponential(0.35, size=n), 8.0)
    punsafe = rng.beta(0.6, 40.0, size=n)  # almost all safe
    punsafe[rng.choice(n, size=3, replace=False)] = rng.uniform(0.1, 0.3, size=3)
    columns = {
        "URL": urls,
        "TEXT": texts,
        "WIDTH": shapes[:, 0],
        "HEIGHT": shapes[:, 1],
        "similarity": np.round(rng.uniform(0.25, 0.40, size=n), 6),
        "punsafe": np.round(punsafe, 6),
        "pwatermark": np.round(rng.beta(1.2, 5.0, size=n), 6),
        "AESTHETIC_SCORE": np.round(aesthetic, 6),
        "hash": [row_hash(url, text) for url, text in zip(urls, texts, strict=True)],
    }
    return pa.table(columns, schema=SCHEMA)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT_PATH, help="parquet file to write")
    args = parser.parse_args(argv)
    table = build_table(read_captions())
    pq.write_table(table, args.out, compression="zstd", row_group_size=table.num_rows)
    texts = table.column("TEXT").to_pylist()
    urls = table.column("URL").to_pylist()
    print(
        f"wrote {args.out}: {table.num_rows} rows, {len({normalise(t) for t in texts})} distinct captions, "
        f"{len(set(urls))} distinct URLs"
    )


if __name__ == "__main__":
    main()
