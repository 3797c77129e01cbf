"""The world's shipped text data: a LAION-like captions parquet and the seed triplets of its fine-tune.

    python -m tasks.world.data          # rewrites tasks/world/data/{world_captions.parquet,seed_triplets.jsonl}

- ``world_captions.parquet`` (``captions.source: builtin:world``): LAION-Aesthetics V2's schema, as the
  captions stage reads it (``URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark,
  AESTHETIC_SCORE, hash``). One row per scene ``(CAPTIONS_SEED, i)``, its caption as ``TEXT``; the URL
  names the scene (``https://world.editforge.invalid/<seed>/<index>.png``: :func:`scene_of_url` draws
  it), so a caption can be compared with its ground-truth image. Scenes repeat captions now and then
  (positions are not in the caption): the captions stage counts those as duplicates, as on LAION.
- ``seed_triplets.jsonl`` (``text.seed_annotations: builtin:world``): the fine-tune's seed triplets in
  the project's seed format (``input``, ``edit``, ``output``), ``SEEDS_PER_KIND`` of each edit kind, from
  their own world seed.

The world's models train on scenes of seed :data:`TRAIN_SEED`; the captions and the seed triplets come
from other seeds, so the demo's captions are not the training scenes (the world is small, so many
captions recur all the same). Everything is deterministic: a test rebuilds both and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.world.edits import EDIT_KINDS, sample_triplet
from tasks.world.scene import WORLD_IMAGE_SIZE, Scene, caption, sample_scene

TRAIN_SEED = 0
CAPTIONS_SEED = 1
SEEDS_SEED = 2
N_CAPTIONS = 2000
SEEDS_PER_KIND = 32
URL_PREFIX = "https://world.editforge.invalid"
CAPTIONS_FILE = "world_captions.parquet"
SEEDS_FILE = "seed_triplets.jsonl"

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
_URL = re.compile(rf"^{re.escape(URL_PREFIX)}/(\d+)/(\d+)\.png$")


def data_dir() -> Path:
    return Path(str(resources.files("tasks.world").joinpath("data")))


def captions_path() -> Path:
    return data_dir() / CAPTIONS_FILE


def seeds_path() -> Path:
    return data_dir() / SEEDS_FILE


def scene_url(seed: int, index: int) -> str:
    return f"{URL_PREFIX}/{seed}/{index:06d}.png"


def scene_of_url(url: str) -> Scene:
    """The scene a world captions row's URL names."""
    match = _URL.match(url)
    if not match:
        raise ValueError(f"not a world scene URL: {url!r}")
    return sample_scene(int(match.group(1)), int(match.group(2)))


def _row_hash(url: str, text: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{url}\t{text}".encode()).digest()[:8], "big", signed=True)


def captions_table(seed: int = CAPTIONS_SEED, n: int = N_CAPTIONS) -> pa.Table:
    rng = np.random.default_rng([seed, 17])
    urls = [scene_url(seed, i) for i in range(n)]
    texts = [caption(sample_scene(seed, i)) for i in range(n)]
    columns = {
        "URL": urls,
        "TEXT": texts,
        "WIDTH": np.full(n, WORLD_IMAGE_SIZE, dtype=np.int64),
        "HEIGHT": np.full(n, WORLD_IMAGE_SIZE, dtype=np.int64),
        "similarity": np.round(rng.uniform(0.28, 0.42, size=n), 6),
        "punsafe": np.round(rng.beta(0.6, 60.0, size=n), 6),
        "pwatermark": np.round(rng.beta(1.0, 12.0, size=n), 6),
        "AESTHETIC_SCORE": np.round(np.minimum(6.5 + rng.exponential(0.4, size=n), 8.5), 6),
        "hash": [_row_hash(u, t) for u, t in zip(urls, texts)],
    }
    return pa.table(columns, schema=SCHEMA)


def seed_rows(seed: int = SEEDS_SEED, per_kind: int = SEEDS_PER_KIND) -> list[dict]:
    """``per_kind`` triplets of every edit kind, interleaved (kind by kind), distinct (input, edit)."""
    rows, seen, index = [], set(), 0
    pending = {kind: per_kind for kind in EDIT_KINDS}
    while any(pending.values()):
        for kind in EDIT_KINDS:
            if not pending[kind]:
                continue
            t = sample_triplet(seed, index, kind)
            index += 1
            if (t.input, t.edit) in seen:
                continue
            seen.add((t.input, t.edit))
            rows.append({"input": t.input, "edit": t.edit, "output": t.output})
            pending[kind] -= 1
    return rows


def seeds_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = captions_table()
    pq.write_table(table, out / CAPTIONS_FILE, compression="zstd", row_group_size=table.num_rows)
    (out / SEEDS_FILE).write_text(seeds_text(seed_rows()), encoding="utf-8")
    return out / CAPTIONS_FILE, out / SEEDS_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data_dir(), help="folder to write both files to")
    args = parser.parse_args(argv)
    captions_file, seeds_file = write(args.out)
    texts = pq.read_table(captions_file).column("TEXT").to_pylist()
    print(
        f"wrote {captions_file}: {len(texts)} rows, {len(set(texts))} distinct captions; "
        f"{seeds_file}: {len(seed_rows())} seed triplets"
    )


if __name__ == "__main__":
    main()
