"""The captions stage at LAION size: memory, CPU against a plain pyarrow floor, growth, the in-process stage.

Writes a synthetic LAION-Aesthetics-shaped source (the schema of `tasks/captions/demo/`: URL, TEXT,
WIDTH, HEIGHT, similarity, punsafe, pwatermark, AESTHETIC_SCORE, hash; Zipf-ish words with non-ASCII
ones, 12% repeated captions in case/space/punctuation variants, 2% repeated URLs, control characters,
blank, null and over-long captions) into a temporary folder, then, each in a child process so that its
peak RSS is its own:

- **floor** (side by side with the ledger, alternating, the lowest CPU of each kept): a plain pyarrow
  read of URL, TEXT and AESTHETIC_SCORE, the score filter, dedup of the lower-cased caption and of the
  URL (first occurrence, dictionary-encoded), and the sample: caption ids and seeded draws with the
  same SHA-1 primitives as the ledger, the `num_captions` lowest kept. No cleaning, no streaming;
- **ledger**: `tasks.captions.generations.extend` with the `paper` preset's counts (454,445 captions,
  455 partitions, min score 6.5) on a fresh output root: CPU, wall, peak RSS;
- **stage**: `editforge stage captions --preset paper` in-process over the 455 partitions (prepare +
  partitions through Prefect): wall and peak RSS;
- **growth**: 100k new rows appended as a new file, `extend` again on the ledger's root: CPU as a
  fraction of the first run's.

    nice python bench/captions_scale.py [--size 0.6m|12m] [--smoke] [--tmp DIR] [--out bench/results/captions_scale.json]

Sizes: `0.6m` is LAION-Aesthetics 6.5+ (every score >= 6.5), `12m` is 6+ (scores 6 + Exp(0.35): about
a quarter over 6.5). The source is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
                    ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
                    ("AESTHETIC_SCORE", pa.float64()), ("hash", pa.int64())])
SIZES = {  # rows, min score of the source, scale of its exponential tail, captions, partitions, growth rows
    "smoke": dict(rows=20_000, low=6.5, tail=0.3, captions=4_000, partitions=20, growth=2_000, rounds=1),
    "0.6m": dict(rows=600_000, low=6.5, tail=0.3, captions=454_445, partitions=455, growth=100_000, rounds=2),
    "12m": dict(rows=12_000_000, low=6.0, tail=0.35, captions=454_445, partitions=455, growth=100_000, rounds=2),
}
ROWS_PER_FILE = 1_000_000
COMMON_WORDS = ("a photo of the an in on with and at by for from beautiful old new red blue green white black house "
                "garden city street sunset mountain river lake forest beach painting portrait art design modern "
                "vintage wedding dress woman man girl boy dog cat flower flowers tree sky night light wall room "
                "kitchen living bedroom interior car road bridge tower church castle landscape poster print canvas "
                "illustration watercolor oil drawing sketch abstract luxury small large cute christmas summer winter "
                "autumn spring view aerial close up stock image vector background pattern texture golden").split()
UNICODE_WORDS = ["café", "Straße", "naïve", "élégant", "Москва", "東京", "北京", "façade", "señora", "Ærø", "ΣΟΦΙΑ",
                 "ﬁne", "cafe\u0301", "Ångström", "smörgåsbord", "İzmir", "“quoted”", "—", "🐱", "½"]


def _vocabulary(size: int = 20_000) -> list[str]:
    rng = np.random.default_rng(12345)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    made = ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(size - len(COMMON_WORDS))]
    return COMMON_WORDS + made


def _chunk(rng: np.random.Generator, words: pa.Array, first_row: int, n: int, low: float, tail: float) -> pa.Table:
    """``n`` LAION-shaped rows; row ``first_row`` names the first one's URL."""
    common, vocab = len(COMMON_WORDS), len(words) - len(UNICODE_WORDS)
    length = np.clip(rng.poisson(9, n), 2, 30)
    draw = rng.random((n, 30))
    idx = np.where(draw < 0.45, rng.integers(0, common, (n, 30)), rng.integers(0, vocab, (n, 30)))
    idx = np.where(draw > 0.985, vocab + rng.integers(0, len(UNICODE_WORDS), (n, 30)), idx)  # ~13% of rows
    columns = [pc.if_else(pa.array(j >= length), pa.nulls(n, pa.string()), words.take(pa.array(idx[:, j])))
               for j in range(30)]
    text = pc.binary_join_element_wise(*columns, " ", null_handling="skip").to_numpy(zero_copy_only=False)
    text = text.astype(object)
    kind, variant = rng.random(n), rng.random(n)
    earlier = np.maximum(0, np.arange(n) - rng.integers(1, 5000, n))
    repeat = kind < 0.12  # the caption of an earlier row, re-posted: case, spacing or punctuation differ
    text[repeat] = text[earlier[repeat]]
    for lo, hi, change in ((0.0, 0.3, str.upper), (0.3, 0.6, lambda t: t + "."),
                           (0.6, 0.7, lambda t: "  " + t.replace(" ", "\t "))):
        pick = repeat & (variant >= lo) & (variant < hi)
        text[pick] = [change(t) for t in text[pick]]
    for lo, hi, change in ((0.5, 0.501, lambda t: t + "\x07"), (0.6, 0.605, lambda t: t.replace(" ", "\n", 1)),
                           (0.7, 0.7002, lambda t: (t + " ") * 60)):
        pick = (kind > lo) & (kind < hi)
        text[pick] = [change(t) for t in text[pick]]
    text[(kind > 0.8) & (kind < 0.8005)] = " "
    text[(kind > 0.9) & (kind < 0.9005)] = None
    hosts = np.array([f"img{i}.example{i % 7}.com" for i in range(300)])
    url = np.char.add(np.char.add("https://" + hosts[rng.integers(0, 300, n)], "/photos/"),
                      np.char.mod("%012x", np.arange(first_row, first_row + n)))
    url = np.char.add(url, ".jpg").astype(object)
    again = (kind > 0.95) & (kind < 0.97)
    url[again] = url[earlier[again]]
    url[(kind > 0.99) & (kind < 0.9902)] = None
    shapes = np.array([(1024, 683), (1200, 800), (800, 600), (683, 1024), (1024, 1024), (600, 600), (1920, 1080)])
    shape = shapes[rng.integers(0, len(shapes), n)]
    return pa.table({"URL": pa.array(url, pa.string()), "TEXT": pa.array(text, pa.string()), "WIDTH": shape[:, 0],
                     "HEIGHT": shape[:, 1], "similarity": rng.normal(0.3, 0.03, n), "punsafe": rng.beta(0.5, 20, n),
                     "pwatermark": rng.beta(1, 5, n), "AESTHETIC_SCORE": low + rng.exponential(tail, n),
                     "hash": rng.integers(-2 ** 62, 2 ** 62, n)}, schema=SCHEMA)


def write_source(folder: Path, rows: int, low: float, tail: float, seed: int = 0, first_file: int = 0) -> list[Path]:
    """``rows`` synthetic rows in files of a million (``part-NNNNN.parquet``, row groups of 128k)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = pa.array(_vocabulary() + UNICODE_WORDS, pa.string())
    paths, done, number = [], 0, first_file
    while done < rows:
        n = min(ROWS_PER_FILE, rows - done)
        path = folder / f"part-{number:05d}.parquet"
        pq.write_table(_chunk(rng, words, number * ROWS_PER_FILE, n, low, tail), path, row_group_size=128 * 1024)
        paths.append(path)
        done, number = done + n, number + 1
    return paths


# ------------------------------------------------------------------------------------------ child processes

def floor(sources: list[str], min_score: float, count: int, seed: int = 0) -> int:
    """Plain pyarrow read + dedup + sample (see the module docstring); returns how many were sampled."""
    from tasks.captions.dedup import hex16, sha1_digests
    from tasks.captions.generations import priorities

    keys, urls = [], []
    for source in sources:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=262_144, columns=["URL", "TEXT", "AESTHETIC_SCORE"]):
            keep = pc.fill_null(pc.greater_equal(batch.column("AESTHETIC_SCORE"), min_score), False)
            keep = pc.and_(keep, pc.and_(pc.is_valid(batch.column("TEXT")), pc.is_valid(batch.column("URL"))))
            batch = batch.filter(keep)
            keys.append(pc.utf8_lower(batch.column("TEXT")))
            urls.append(batch.column("URL"))
    key, url = pa.chunked_array(keys).combine_chunks(), pa.chunked_array(urls).combine_chunks()
    first_key = np.unique(key.dictionary_encode().indices.to_numpy(zero_copy_only=False), return_index=True)[1]
    first_url = np.unique(url.dictionary_encode().indices.to_numpy(zero_copy_only=False), return_index=True)[1]
    kept = key.take(pa.array(np.intersect1d(first_key, first_url)))
    draws = priorities(seed, hex16(sha1_digests(kept)))  # caption ids and their seeded draws
    return len(np.argsort(draws, kind="stable")[:count])


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program (VmHWM: a fork's ``ru_maxrss`` would start at
    its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def _usage() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": own.ru_utime + own.ru_stime, "rss_mb": peak_rss_mb()}


def child(kind: str, args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; printed as JSON by ``--child``."""
    sources = sorted(str(p) for p in Path(args.source).glob("*.parquet"))
    size = SIZES[args.size]
    overrides = [f"output_root={args.root}", f"captions.source={args.source}/*.parquet",
                 f"captions.num_captions={size['captions']}", f"captions.num_partitions={size['partitions']}",
                 f"captions.min_aesthetic_score={args.min_score}"]
    if kind == "floor":
        import tasks.captions.generations  # noqa: F401  (imports outside the measured part)

        before, wall = _usage(), time.perf_counter()
        sampled = floor(sources, args.min_score, size["captions"])
        return {"cpu_s": _usage()["cpu_s"] - before["cpu_s"], "wall_s": time.perf_counter() - wall,
                "rss_mb": _usage()["rss_mb"], "rss_before_mb": before["rss_mb"], "sampled": sampled}
    if kind == "ledger":
        from tasks.captions.generations import _hash, extend
        from tasks.common.config import load_config

        cfg = load_config("paper", overrides)
        _hash(cfg)  # the registry imported before the measured part
        before, wall = _usage(), time.perf_counter()
        gen = extend(cfg)
        record = gen.record if gen else {}
        return {"cpu_s": _usage()["cpu_s"] - before["cpu_s"], "wall_s": time.perf_counter() - wall,
                "rss_mb": _usage()["rss_mb"], "rss_before_mb": before["rss_mb"], "read": record.get("read"),
                "taken": record.get("taken"), "total_taken": record.get("total_taken"),
                "rows_read": record.get("source", {}).get("counts", {}).get("rows_read")}
    if kind == "stage":  # `editforge stage captions` in this process (Prefect's ephemeral server is its own)
        from flows.cli import app

        wall = time.perf_counter()
        try:
            app(["stage", "captions", "--preset", "paper", *sum((["--set", o] for o in overrides), [])])
        except SystemExit as done:
            if done.code:
                raise RuntimeError(f"editforge stage captions exited {done.code}") from None
        return {"wall_s": time.perf_counter() - wall, "rss_mb": peak_rss_mb(), "cpu_s": _usage()["cpu_s"]}
    if kind == "generate":
        write_source(Path(args.source), size["rows"], size["low"], size["tail"])
        return {}
    raise ValueError(kind)


def run_child(kind: str, args: argparse.Namespace, root: Path, source: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--size", args.size, "--root", str(root), "--source", str(source),
           "--min-score", str(args.min_score)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ledger_file(root: Path) -> dict:
    """Size, footer and row groups of the first generation's parquet (what a partition reads of it)."""
    (path,) = root.glob("captions/*/_generations/gen-00000.parquet")
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    return {"bytes": path.stat().st_size, "footer_bytes": meta.serialized_size, "row_groups": meta.num_row_groups,
            "largest_row_group_bytes": max(sizes) if sizes else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.6m")
    parser.add_argument("--smoke", action="store_true", help="the smallest size (what the tests run)")
    parser.add_argument("--tmp", default=None, help="where the synthetic source and output roots go (deleted after)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "captions_scale.json"))
    parser.add_argument("--min-score", type=float, default=6.5,
                        help="captions.min_aesthetic_score (6.5: the paper's; 6.0 keeps every row of the 12m source)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    size = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="captions-scale-", dir=args.tmp))
    try:
        source = work / "source"
        t0 = time.perf_counter()
        run_child("generate", args, work, source)  # in a child: this process stays small
        files = sorted(source.glob("*.parquet"))
        generated_s = time.perf_counter() - t0
        floors, ledgers = [], []
        for i in range(size["rounds"]):  # side by side, alternating
            floors.append(run_child("floor", args, work / f"floor-{i}", source))
            ledgers.append(run_child("ledger", args, work / f"ledger-{i}", source))
        stage = run_child("stage", args, work / "stage", source)
        layout = ledger_file(work / "stage")
        write_source(source, size["growth"], size["low"], size["tail"], seed=1, first_file=90_000)  # 100k rows
        growth = run_child("ledger", args, work / f"ledger-{size['rounds'] - 1}", source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = min(ledgers, key=lambda r: r["cpu_s"])
    base = min(floors, key=lambda r: r["cpu_s"])
    result = {
        "size": args.size, "rows": size["rows"], "files": len(files), "generated_s": round(generated_s, 1),
        "paper_counts": {"num_captions": size["captions"], "num_partitions": size["partitions"],
                         "min_aesthetic_score": args.min_score},
        "floor": floors, "ledger": ledgers, "stage": stage, "growth": {**growth, "rows": size["growth"]},
        "ledger_file": layout,
        "cpu_ratio_ledger_over_floor": round(first["cpu_s"] / base["cpu_s"], 3),
        "growth_fraction_of_first_run": round(growth["cpu_s"] / first["cpu_s"], 4),
        "peak_rss_mb": {"ledger": round(max(r["rss_mb"] for r in ledgers)), "stage": round(stage["rss_mb"]),
                        "floor": round(max(r["rss_mb"] for r in floors))},
    }
    result["meets"] = {"ledger_rss_le_4gb": result["peak_rss_mb"]["ledger"] <= 4096,
                       "stage_rss_le_4gb": result["peak_rss_mb"]["stage"] <= 4096,
                       "cpu_le_1_5x_floor": result["cpu_ratio_ledger_over_floor"] <= 1.5,
                       "growth_le_20pct": result["growth_fraction_of_first_run"] <= 0.2 and growth["read"] == "incremental"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"captions_scale: {args.size} ({size['rows']:,} rows, {size['captions']:,} captions, {size['partitions']} "
          f"partitions): ledger CPU {first['cpu_s']:.1f} s = {result['cpu_ratio_ledger_over_floor']:.2f}x the pyarrow "
          f"floor ({base['cpu_s']:.1f} s); peak RSS ledger {result['peak_rss_mb']['ledger']} MB, in-process stage "
          f"{result['peak_rss_mb']['stage']} MB ({stage['wall_s']:.0f} s); {size['growth']:,} new rows "
          f"{growth['cpu_s']:.2f} s = {100 * result['growth_fraction_of_first_run']:.1f}% of the first run "
          f"({growth['read']} read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
