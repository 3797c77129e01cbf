"""Calibrate the filter on the world: labels from the world's own knowledge, thresholds checked on held-out labels.

    python bench/review_world.py                   # the `world` preset's 40 captions, every pair labelled
    python bench/review_world.py --captions 120 --partitions 3 --target 0.8
    python bench/review_world.py --smoke           # 4 captions x 4 samples (the test)

1. A world run up to the filter stage with ``render.save_images=all`` (every rendered pair's images stored),
   through the stages' own entries (no Prefect), under ``--root`` (kept: a second call reuses it).
2. Every stored pair labelled by :func:`world_label` — the world's truth, independent of CLIP — and stored
   as reviewer ``world-truth`` through :class:`tasks.filter.labels.LabelStore`, the files the review page
   writes.
3. The triplets split in two halves by a hash of ``caption_id``; ``calibrate-filter``'s code
   (:func:`flows.calibrate_filter.calibrate`) on half A; its suggested CLIP thresholds, the paper's and the
   world preset's scored on half B (precision and recall, Wilson intervals clustered by triplet); the same
   on ``--splits`` random halvings (how often the held-out half reaches the target); then on all labels,
   as the command does it.

:func:`world_label` reads each image the way the world draws it (:mod:`tasks.world.scene`'s palette): the
background is the colour its border is closest to, and a palette colour is present when enough pixels are
closest to it. A pair is a ``good`` edit when the captions describe one world edit
(:func:`tasks.world.grammar.edit_kind`) that the instruction names (the edit templates of
:mod:`tasks.world.edits`, its words checked against the caption change), the before image shows what the
edit starts from (the input's background; the colour a colour change or a removal takes away; not yet
the colour an added shape brings) and the after image shows the output caption (background, every shape
colour, no other colour over a quarter of the shapes' pixels, a colour the edit took away gone) — as a
person judges a pair, by what the instruction did to the before image, not by every detail of the input
caption; ``wrong`` otherwise; ``unsure`` when the instruction is none of the templates. It does not see shape kinds, sizes, positions or the
style (colour alone cannot); its own accuracy on the world's drawn pairs is measured and written too.

Writes ``bench/results/review_world.json`` and prints a summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDITFORGE_CACHE", str(ROOT / ".cache" / "editforge"))

import numpy as np
import pandas as pd

from tasks.world.edits import EDIT_KINDS, TEMPLATES
from tasks.world.grammar import Description, edit_kind, parse_caption
from tasks.world.scene import BACKGROUNDS, COLOURS, SHAPES, STYLES

REVIEWER = "world-truth"
STRIPES = ("white", "black")  # the colours a striped shape's stripes take
MIN_SHARE = 0.008  # a colour is present with at least this share of the image's pixels
MAX_OTHER = 0.25  # an image shows its caption when other colours hold at most this share of the shapes' pixels
_PAL_NAMES = list(COLOURS)
_PAL = np.array([COLOURS[c] for c in _PAL_NAMES], float)
_BG_NAMES = list(BACKGROUNDS)
_BG = np.array([BACKGROUNDS[b] for b in _BG_NAMES], float)
# colours a blurred render mixes up (palette distance under 120: orange with red and yellow, blue with purple)
NEIGHBOURS = {(a, b) for i, a in enumerate(_PAL_NAMES) for j, b in enumerate(_PAL_NAMES)
              if i != j and np.linalg.norm(_PAL[i] - _PAL[j]) < 120}


def read_image(image: np.ndarray) -> tuple[str, dict[str, int], int]:
    """(background name, pixels per palette colour off the background, pixels) of an (H, W, 3) uint8 image."""
    a = image.astype(float)
    m = max(2, a.shape[0] // 16)
    border = np.concatenate([a[:m].reshape(-1, 3), a[-m:].reshape(-1, 3), a[:, :m].reshape(-1, 3),
                             a[:, -m:].reshape(-1, 3)])
    bg = int(np.linalg.norm(_BG - np.median(border, 0), axis=1).argmin())
    px = a.reshape(-1, 3)
    fg = px[np.linalg.norm(px - _BG[bg], axis=1) > 60]
    counts: dict[str, int] = {}
    if len(fg):
        d = np.linalg.norm(fg[:, None] - _PAL[None], axis=2)
        near = d.min(1) < 60
        counts = {_PAL_NAMES[i]: int(n) for i, n in enumerate(np.bincount(d.argmin(1)[near], minlength=len(_PAL)))
                  if n}
    return _BG_NAMES[bg], counts, len(px)


def shows(image: np.ndarray, desc: Description, gone: set[str] = frozenset()) -> tuple[bool, str]:
    """Whether an image shows a caption's background and shape colours (and none of ``gone``)."""
    background, counts, pixels = read_image(image)
    if background != desc.background:
        return False, f"background reads {background}, caption says {desc.background}"
    required = {colour for _, colour, _ in desc.shapes}
    optional = set(STRIPES) if desc.style == "striped" else set()
    for colour in sorted(required):
        if counts.get(colour, 0) < MIN_SHARE * pixels:
            return False, f"no {colour}"
    for colour in sorted(gone - required - optional):
        if not any((colour, r) in NEIGHBOURS for r in required) and counts.get(colour, 0) >= MIN_SHARE * pixels:
            return False, f"{colour} still there"
    shapes = sum(counts.values())
    other = sum(n for c, n in counts.items()
                if c not in required | optional and not any((c, r) in NEIGHBOURS for r in required))
    if shapes and other > MAX_OTHER * shapes:
        return False, f"other colours on {other} of {shapes} shape pixels"
    return True, "ok"


def _template_patterns() -> dict[str, list[re.Pattern]]:
    words = {"kind": "|".join(SHAPES), "colour": "|".join(COLOURS), "background": "|".join(BACKGROUNDS),
             "style": "|".join(STYLES)}
    phrase = rf"an? (?:small )?(?:{words['colour']}) (?:{words['kind']})"
    out = {}
    for kind, templates in TEMPLATES.items():
        pats = []
        for t in templates:
            text = re.escape(t)
            for name, alternatives in words.items():
                text = text.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
            text = text.replace(re.escape("{phrase}"), f"(?P<phrase>{phrase})")
            text = text.replace(re.escape("{a_background}"), "an?")
            pats.append(re.compile(f"^{text}$"))
        out[kind] = pats
    return out


PATTERNS = _template_patterns()


def instruction_names(edit: str) -> tuple[str, dict] | None:
    """(edit kind, its words) when the instruction is one of the world's templates."""
    text = " ".join(edit.strip().rstrip(".").lower().split())
    for kind, pats in PATTERNS.items():
        for p in pats:
            if (m := p.match(text)) is not None:
                return kind, m.groupdict()
    return None


def caption_change(a: Description, b: Description, kind: str) -> dict:
    """The words of the world edit ``kind`` from description ``a`` to ``b``."""
    ka, kb = a.by_kind(), b.by_kind()
    if kind == "colour":
        shape = next(k for k in ka.keys() & kb.keys() if ka[k][0] != kb[k][0])
        return {"kind": shape, "colour": kb[shape][0]}
    if kind == "add":
        shape = next(iter(kb.keys() - ka.keys()))
        colour, size = kb[shape]
        return {"phrase": " ".join(w for w in ("small" if size == "small" else "", colour, shape) if w)}
    if kind == "remove":
        return {"kind": next(iter(ka.keys() - kb.keys()))}
    if kind == "background":
        return {"background": b.background}
    return {"style": b.style}


def gone_colours(a: Description, b: Description) -> set[str]:
    """Shape colours of the input the output no longer has (what a colour change or a removal takes away)."""
    return {c for _, c, _ in a.shapes} - {c for _, c, _ in b.shapes}


def before_state(image: np.ndarray, a: Description, b: Description, kind: str) -> tuple[bool, str]:
    """Whether the before image shows what the edit starts from: the input's background, and the colour a
    colour change or a removal takes away (an added shape's colour, when new to the scene, not yet there)."""
    background, counts, pixels = read_image(image)
    if background != a.background:
        return False, f"background reads {background}, the input caption says {a.background}"
    enough = MIN_SHARE * pixels
    if kind in ("colour", "remove"):
        for colour in sorted(gone_colours(a, b)):
            if counts.get(colour, 0) < enough:
                return False, f"no {colour} to {'change' if kind == 'colour' else 'remove'}"
    if kind == "add":
        before_colours = {c for _, c, _ in a.shapes} | (set(STRIPES) if a.style == "striped" else set())
        for colour in sorted({c for _, c, _ in b.shapes} - before_colours):
            if counts.get(colour, 0) >= enough and not any((colour, r) in NEIGHBOURS for r in before_colours):
                return False, f"{colour} is there before it is added"
    return True, "ok"


def world_label(before: np.ndarray, after: np.ndarray, input_caption: str, edit: str, output_caption: str
                ) -> tuple[str, str]:
    """(label, why) of a rendered world pair (see the module doc)."""
    kind = edit_kind(input_caption, output_caption)
    if kind not in EDIT_KINDS:
        return "wrong", f"the captions are no world edit ({kind})"
    named = instruction_names(edit)
    if named is None:
        return "unsure", "the instruction is none of the world's templates"
    a, b = parse_caption(input_caption), parse_caption(output_caption)
    said_kind, words = named
    if said_kind != kind:
        return "wrong", f"the instruction says {said_kind}, the captions {kind}"
    expected = caption_change(a, b, kind)
    if "phrase" in words:
        words["phrase"] = re.sub(r"^an? ", "", words["phrase"])
    if {k: words.get(k) for k in expected} != expected:
        return "wrong", f"the instruction names {words}, the captions change {expected}"
    ok, why = before_state(before, a, b, kind)
    if not ok:
        return "wrong", f"before: {why}"
    ok, why = shows(after, b, gone_colours(a, b))
    if not ok:
        return "wrong", f"after: {why}"
    return "good", "ok"


def oracle_accuracy(n: int = 200, seed: int = 3) -> dict:
    """world_label on the world's drawn pairs (should be good) and on wrong ones: the after image of another
    edit of the same input, and of another triplet (should be wrong)."""
    from tasks.world.edits import sample_triplet, wrong_edit
    from tasks.world.scene import image_array

    triplets = [sample_triplet(seed, i) for i in range(n)]
    good = [world_label(image_array(t.before), image_array(t.after), t.input, t.edit, t.output)[0] for t in triplets]
    wrong_edit_after = [world_label(image_array(t.before), image_array(wrong_edit(t, seed).after), t.input, t.edit,
                                    t.output)[0] for t in triplets]
    other_after = [world_label(image_array(t.before), image_array(triplets[(i + 1) % n].after), t.input, t.edit,
                               t.output)[0] for i, t in enumerate(triplets)]
    by_kind: dict[str, list[int]] = {}
    for t, lab in zip(triplets, wrong_edit_after):
        by_kind.setdefault(t.kind, []).append(lab != "good")
    return {"pairs": n, "drawn_pairs_good": sum(x == "good" for x in good) / n,
            "wrong_edit_after_rejected": sum(x != "good" for x in wrong_edit_after) / n,
            "other_triplet_after_rejected": sum(x != "good" for x in other_after) / n,
            "wrong_edit_after_rejected_by_kind": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_kind.items())}}


def world_run(root: Path, captions: int, partitions: int, samples: int | None, extra: list[str]):
    """The world config of the bench, and its stages up to the filter run (finished partitions are skipped)."""
    from tasks import registry
    from tasks.common.config import load_config

    overrides = [f"output_root={root}", "name=review-world", f"captions.num_captions={captions}",
                 f"captions.num_partitions={partitions}", "render.save_images=all", "text.finetune_steps=20",
                 *([f"render.samples_per_triplet={samples}", f"render.batch_samples={samples}"] if samples else []),
                 *extra]
    cfg = load_config("world", overrides)
    for name in ("captions", "finetune", "text", "render", "filter"):
        registry.prepare(cfg, name)
        done = [registry.entry(name)(cfg, pid) for pid in registry.get(name).partition_ids(cfg)]
        registry.finalize(cfg, name, done)
    return cfg, overrides


def label_all(cfg) -> pd.DataFrame:
    """world_label of every stored pair of the run, stored as reviewer world-truth (weight 1: every pair)."""
    from PIL import Image

    from tasks import registry
    from tasks.common import layout, storage
    from tasks.filter.labels import LabelStore, check_label
    from tasks.filter.review import load_samples

    render_hash = registry.stage_hash(cfg, "render")
    samples = load_samples(cfg, registry.get("render").partition_ids(cfg))
    samples = samples[samples["image_stored"].astype(bool)].reset_index(drop=True)
    known, rows, whys = {}, [], []
    for s in samples.itertuples():
        folder = layout.partition_dir(cfg.output_root, "render", render_hash, int(s.partition))
        images = [np.asarray(Image.open(storage.url_join(folder, layout.image_name(s.sample_key, w))).convert("RGB"))
                  for w in ("input", "edited")]
        label, why = world_label(*images, s.input, s.edit, s.output)
        known[(int(s.partition), s.sample_key)] = {"render_hash": render_hash, "caption_id": s.caption_id,
                                                   "pair_sha256": s.pair_sha256, "stratum": "all", "weight": 1.0}
        rows.append({"partition": int(s.partition), "sample_key": s.sample_key, "label": label, "reviewer": REVIEWER,
                     "session": "world-truth-" + render_hash})
        whys.append(why)
    store = LabelStore(layout.labels_dir(cfg.output_root, render_hash), writer="bench-review-world", chunk_rows=100_000)
    stored = [check_label(r, known) for r in rows]
    store.append(stored)
    return pd.DataFrame(stored).assign(why=whys)


def half(caption_id: str, split: int = 0) -> str:
    """The half of a triplet in split ``split`` (0: by the hash of its caption id alone)."""
    key = caption_id if split == 0 else f"{split}:{caption_id}"
    return "A" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % 2 == 0 else "B"


def one_split(cfg, stored: pd.DataFrame, split: int, common: dict, world: dict) -> dict:
    """calibrate-filter on half A of a split; the paper's, the world's and the suggested thresholds on half B."""
    from flows.calibrate_filter import PAPER, calibrate

    parts = stored["caption_id"].map(lambda c: half(c, split))
    fit = calibrate(cfg, stored[parts == "A"], **common)
    check = held_out(cfg, stored[parts == "B"], {"paper": PAPER, "world": world,
                                                 "suggested": fit["thresholds"]["suggested"]}, common["confidence"])
    return {"fit": fit, "check": check}


def held_out(cfg, labels: pd.DataFrame, thresholds: dict[str, dict], confidence: float) -> dict:
    """Each threshold set's CLIP rule (all three checks) on the labelled pairs of ``labels``."""
    from flows.calibrate_filter import _clean
    from tasks.filter import calibrate as stats
    from tasks.filter.labels import latest, matched
    from tasks.filter.review import load_samples

    labels = latest(labels)
    samples = load_samples(cfg, sorted(set(int(p) for p in labels["partition"])))
    joined, _ = matched(labels, samples)
    truth = stats.people_truth(joined)
    lab = samples.merge(truth, on=["partition", "sample_key", "pair_sha256"])
    y, w = lab["good"].to_numpy(bool), lab["weight"].to_numpy(float)
    out = {}
    for name, t in thresholds.items():
        if t:
            rule = stats.clip_rules(lab, cfg.selection().model_copy(update=t))["CLIP (all three)"]
            out[name] = _clean(stats.evaluate(rule, y, w, confidence, lab["caption_id"].to_numpy()))
    return {"pairs": len(lab), "good": int(y.sum()), "rules": out}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "review-world")
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--samples", type=int, default=None, help="samples per triplet (default: the preset's 8)")
    parser.add_argument("--target", type=float, default=0.8, help="target precision")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--min-passing", type=int, default=10)
    parser.add_argument("--splits", type=int, default=16, help="random halvings to repeat the held-out check on")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "review_world.json")
    parser.add_argument("--smoke", action="store_true", help="4 captions x 4 samples, one partition")
    args = parser.parse_args(argv)
    if args.smoke:
        args.captions, args.partitions, args.samples, args.min_passing, args.splits = 4, 1, 4, 1, 2
    from flows.calibrate_filter import PAPER, calibrate

    started = time.perf_counter()
    cfg, overrides = world_run(args.root, args.captions, args.partitions, args.samples, args.extra)
    rendered_s = time.perf_counter() - started
    labels = label_all(cfg)
    # the labels as stored (time and all), split by triplet
    from tasks import registry
    from tasks.common import layout
    from tasks.filter.labels import LabelStore

    stored = LabelStore(layout.labels_dir(cfg.output_root, registry.stage_hash(cfg, "render"))).read()
    stored = stored[stored["reviewer"] == REVIEWER]
    common = {"target": args.target, "confidence": args.confidence, "min_passing": args.min_passing}
    world = {f: getattr(cfg.render.keep, f) for f in PAPER}
    splits = [one_split(cfg, stored, k, common, world) for k in range(args.splits)]
    fit, check = splits[0]["fit"], splits[0]["check"]
    everything = calibrate(cfg, stored, **common)
    suggested = check["rules"].get("suggested")
    held = [s["check"]["rules"]["suggested"] for s in splits if "suggested" in s["check"]["rules"]]
    held_p = [h["precision"] for h in held if h["precision"] is not None]
    result = {
        "command": "python bench/review_world.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": overrides, "render_hash": fit["render_hash"], "seconds_to_render": round(rendered_s, 1),
        "labels": {k: int(v) for k, v in labels["label"].value_counts().items()},
        "why_not_good": {k: int(v) for k, v in labels.loc[labels["label"] != "good", "why"]
                         .str.replace(r"[:(].*", "", regex=True).value_counts().items()},
        "oracle_on_drawn_pairs": oracle_accuracy(60 if args.smoke else 200),
        "half_A": {"pairs": fit["labels"]["pairs_decided"], "good": fit["labels"]["good"], "search": fit["search"],
                   "rules": fit["rules"]},
        "suggested": fit["thresholds"]["suggested"], "set": fit["set"],
        "half_B": check,
        "suggested_reaches_target_on_half_B": bool(suggested and suggested["precision"] is not None
                                                   and suggested["precision"] >= args.target),
        "other_splits": {"splits": args.splits, "found": len(held),
                         "held_out_precision_reaches_target": sum(p >= args.target for p in held_p),
                         "held_out_precision_mean": float(np.mean(held_p)) if held_p else None,
                         "held_out_precision_sd": float(np.std(held_p)) if held_p else None,
                         "held_out_recall_mean": float(np.mean([h["recall"] for h in held])) if held else None,
                         "per_split": [{"suggested": s["fit"]["thresholds"]["suggested"],
                                        "held_out": s["check"]["rules"].get("suggested"),
                                        "world_held_out": s["check"]["rules"]["world"]} for s in splits]},
        "all_labels": {k: everything[k] for k in ("labels", "thresholds", "rules", "search", "reselection", "set")},
        "roc_auc": {c: v["auc"] for c, v in everything["roc"].items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    b = check["rules"]

    def pr(name):
        r = b.get(name)
        return (f"{name} P {100 * r['precision']:.0f}% R {100 * r['recall']:.0f}%" if r and r["precision"] is not None
                else f"{name} -")

    print(f"review_world: {len(labels)} pairs labelled ({result['labels']}); suggested "
          f"{result['suggested']} on half A ({fit['labels']['pairs_decided']} pairs); half B "
          f"({check['pairs']} pairs, {check['good']} good): {pr('paper')}, {pr('world')}, {pr('suggested')}; "
          f"target {args.target:g} {'met' if result['suggested_reaches_target_on_half_B'] else 'NOT met'}; "
          f"{args.splits} random halvings: met on {result['other_splits']['held_out_precision_reaches_target']} of "
          f"{result['other_splits']['found']} with a suggestion; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
