"""A LAION-shaped corpus with every cleaning and dedup case the caption reader knows (test fixture).

``edge_files`` writes small files, one per column-type variant (float or text numbers, binary or
dictionary captions, missing optional columns); ``mixed_files`` writes a seeded random mix of the same
fragments in bigger files, so that keys and URLs repeat across rows, batches and files in chains.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq

TEXTS = [
    "a cat", "A Cat", "a  cat", " a cat ", "a cat.", "a cat!!", "a cat …", "a cat\t", "a\ncat", "A CAT?", "a cat;:",
    "a cat . ", "a cat\r\n", "café", "cafe\u0301", "CAFÉ", "Straße", "STRASSE", "strasse", "ΣΟΦΟΣ", "σοφος", "σοφοσ",
    "İstanbul", "i̇stanbul", "ﬁne", "fine", "a\u00a0cat", "a\u3000cat", "a\u2009cat", "\u3000", "\u00a0 ", "a\x85cat",
    "a\x07cat", "\x00", "\x07\x1b", "a\x1ccat", "a\x7fcat", "a\u200bcat", "emoji 🐱 cat", "東京タワー", "東京タワー。",
    "e\u0301te\u0301", "été", "a cat\u2028", "x" * 600, "x " * 300, "y" * 500, "y" * 501, "  " + "z" * 499 + "  ",
    "w" + " " * 700 + "w", "\u0958" * 167, "\u0958" * 251, "\u0958" * 240 + "\x07", "\u2000" * 3, "ab\u0301c", "",
    " ", "\t\n", "  a dog  ", "a dog", "a dog.", "A DOG", "a red house", "a red  house", "a red house!", "tree",
    "Tree.", "…", ".", "a bird\u3000", "\u3000a bird", "a bird", "ǅemal", "ǆemal", "Ǆemal", "ﬀ", "FF", None, None,
]
URLS = ["https://x/1.jpg", " https://x/1.jpg ", "https://x/1.jpg\u3000", "https://x/2.jpg", "https://x/3.jpg", "",
        "   ", None, "https://é.example/1.jpg", "\u00a0https://x/4.jpg", "https://x/5.jpg\t", "https://x/6.jpg"]
SCORES = [7.0, 7.5, 6.6, 6.4, 5.0, float("nan"), None, 6.5, 9.9]


def _table(rows: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in rows[0]}
    return pa.table(columns, schema=schema)


def edge_files(folder) -> list[str]:
    """One small file per column-type variant; every text case meets every URL case somewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(TEXTS):
        for j in (0, 3, 7, 11):
            rows.append({"URL": URLS[(i + j) % len(URLS)] if j else f"https://e/{i}.jpg", "TEXT": text,
                         "WIDTH": [512, 100, None, 1024][(i + j) % 4], "HEIGHT": [512, 400, 300, None][(i * j) % 4],
                         "similarity": 0.3, "punsafe": [0.01, 0.9, None][(i + j) % 3],
                         "pwatermark": [0.1, 0.95, 0.2][(i * 3 + j) % 3], "AESTHETIC_SCORE": SCORES[(i + j) % len(SCORES)],
                         "hash": [i * 100 + j, None][(i + j) % 5 == 0]})
    typed = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
                       ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
                       ("AESTHETIC_SCORE", pa.float64()), ("hash", pa.int64())])
    paths = []

    def write(name: str, table: pa.Table) -> None:
        pq.write_table(table, folder / name)
        paths.append(str(folder / name))

    write("a-typed.parquet", _table(rows, typed))
    # numbers as text ("7.5", "abc", None), hash as text, large strings
    as_text = [{**r, "AESTHETIC_SCORE": None if r["AESTHETIC_SCORE"] is None else str(r["AESTHETIC_SCORE"]),
                "punsafe": "abc" if r["punsafe"] == 0.9 else None if r["punsafe"] is None else str(r["punsafe"]),
                "WIDTH": None if r["WIDTH"] is None else f"{r['WIDTH']}.7", "hash": None if r["hash"] is None else f"h{r['hash']}"}
               for r in rows[::2]]
    table = _table(as_text)
    table = table.set_column(1, "TEXT", table.column("TEXT").cast(pa.large_string()))
    write("b-text-numbers.parquet", table)
    # captions and URLs as bytes, one of them not UTF-8; no WIDTH and no hash column
    raw = [{"URL": None if r["URL"] is None else r["URL"].encode(), "TEXT": None if r["TEXT"] is None else r["TEXT"].encode(),
            "HEIGHT": r["HEIGHT"], "AESTHETIC_SCORE": r["AESTHETIC_SCORE"]} for r in rows[1::3]]
    raw += [{"URL": b"https://bin/1.jpg", "TEXT": b"\xff\xfe broken", "HEIGHT": 512, "AESTHETIC_SCORE": 7.0},
            {"URL": b"\xc3\x28", "TEXT": b"a fine caption", "HEIGHT": 512, "AESTHETIC_SCORE": 7.0}]
    write("c-binary.parquet", _table(raw, pa.schema([("URL", pa.binary()), ("TEXT", pa.binary()), ("HEIGHT", pa.int64()),
                                                      ("AESTHETIC_SCORE", pa.float64())])))
    # dictionary-encoded captions, a float hash, no AESTHETIC_SCORE column, float sizes
    dic = [{"URL": r["URL"], "TEXT": r["TEXT"], "WIDTH": None if r["WIDTH"] is None else r["WIDTH"] + 0.5,
            "HEIGHT": r["HEIGHT"], "hash": None if r["hash"] is None else r["hash"] / 4} for r in rows[2::3]]
    table = _table(dic)
    write("d-dictionary.parquet", table.set_column(1, "TEXT", table.column("TEXT").dictionary_encode()))
    # an all-null caption column (null type) and a boolean watermark column
    write("e-nulls.parquet", pa.table({"URL": ["https://n/1", "https://n/2"], "TEXT": pa.nulls(2),
                                       "pwatermark": [True, False]}))
    return paths


def mixed_rows(n: int, seed: int, url_pool: int = 400) -> list[dict]:
    """``n`` rows mixing the fragments: captions and URLs repeat (case, spacing, punctuation variants)."""
    rng = random.Random(seed)
    words = ["cat", "dog", "red", "house", "Café", "STRASSE", "σοφος", "tree", "🐱", "東京", "a", "the", "big"]
    rows = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            text = rng.choice([text, text.upper(), text + ".", " " + text + "  ", text.replace(" ", "\t"), text + " !"])
        elif kind < 0.5:
            text = rng.choice(TEXTS)
        else:
            text = f"caption {rng.randint(0, n)} {rng.choice(words)}"
        url = rng.choice([f"https://m/{rng.randint(0, url_pool)}.jpg", f" https://m/{rng.randint(0, url_pool)}.jpg",
                          rng.choice(URLS)]) if rng.random() < 0.5 else f"https://u/{rng.random()}.jpg"
        rows.append({"URL": url, "TEXT": text, "WIDTH": rng.choice([512, 1024, None, 200]),
                     "HEIGHT": rng.choice([512, 768, 300]), "similarity": 0.3, "punsafe": rng.choice([0.0, 0.2, 0.8]),
                     "pwatermark": rng.choice([0.1, 0.6]), "AESTHETIC_SCORE": rng.choice([7.0, 6.8, 6.0, float("nan"), 8.2]),
                     "hash": rng.randint(-2 ** 40, 2 ** 40)})
    return rows


def mixed_files(folder, files: int = 3, rows: int = 1500, seed: int = 0, prefix: str = "m") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        path = folder / f"{prefix}-{f:03d}.parquet"
        pq.write_table(_table(mixed_rows(rows, seed * 1000 + f)), path, row_group_size=rows // 3)
        paths.append(str(path))
    return paths
