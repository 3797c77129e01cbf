"""`editforge calibrate-filter`: the filter against people's labels, and thresholds that reach a precision.

    editforge review --preset world                  # label pairs first (docs/review.md)
    editforge calibrate-filter --preset world --target-precision 0.8
    editforge run --preset world $(cat runs/world/review/<render hash>/filter.set)   # re-select, no re-render

Reads the labels of the config's render version (`review/<render hash>/labels.parquet`), matches them to
the pairs they were given to (same image hashes), and prints, with Wilson intervals on the weighted
sample, clustered by triplet (:mod:`tasks.filter.calibrate`): the precision and recall of each CLIP rule
at the paper's thresholds (0.75 / 0.2 / 0.2) and at the config's, of each judge rung that is on and of
the kept pairs; Cohen's kappa between each rule and people, and between reviewers; the ROC area of every
score; the CLIP thresholds with the highest recall whose precision reaches the target at the interval's
lower end, and how far that holds (the same search on each half of the triplets, scored on the other
half); and what the filter stage would keep with them (re-selected from the stored scores). It writes
`calibration.json`, `people_vs_filter.png` and `filter.set` (the `--set filter.*=...` lines) beside the
labels; the run's report shows the same figures in its "People vs filter" section.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from flows.options import Debug, Overrides, Preset, load_or_exit, reported

# the paper's thresholds (InstructPix2Pix, set for OpenAI's CLIP ViT-L/14): image-image, caption, direction
PAPER = {"clip_image_threshold": 0.75, "clip_caption_threshold": 0.2, "clip_direction_threshold": 0.2}
LABELLER_HINT = "label pairs with `editforge review` (same --preset and --set) first"


class NoLabelsError(ValueError):
    """Nothing to calibrate on (names where the labels were looked for and what to run)."""


def _clean(value: Any) -> Any:
    """JSON-safe (NaN/inf: null; numpy: Python), recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def calibrate(cfg, labels: pd.DataFrame | None = None, *, target: float | None = None,
              confidence: float | None = None, min_passing: int | None = None,
              reviewers: list[str] | None = None) -> dict:
    """Everything `calibrate-filter` prints and writes, as one JSON-able dict (see the module doc).
    ``labels``: these rows instead of the run's labels (a held-out split, a test)."""
    from tasks import registry
    from tasks.common import layout
    from tasks.filter import calibrate as stats
    from tasks.filter.labels import LabelStore, latest, matched
    from tasks.filter.review import decide, finished_partitions, load_samples, reselect

    r = cfg.review
    target = r.target_precision if target is None else target
    confidence = r.confidence if confidence is None else confidence
    min_passing = r.min_passing if min_passing is None else min_passing
    render_hash = registry.stage_hash(cfg, "render")
    folder = layout.labels_dir(cfg.output_root, render_hash)
    if labels is None:
        labels = LabelStore(folder).read()
    if reviewers:
        labels = labels[labels["reviewer"].isin(reviewers)]
    if not len(labels):
        raise NoLabelsError(f"no labels under {folder}" + (f" by {', '.join(reviewers)}" if reviewers else "")
                            + f": {LABELLER_HINT}")
    labels = latest(labels)
    done = set(finished_partitions(cfg))
    partitions = sorted(set(int(p) for p in labels["partition"]) & done)
    if not partitions:
        raise NoLabelsError(f"the labels under {folder} are of render partitions not finished under render hash "
                            f"{render_hash}")
    samples = load_samples(cfg, partitions)
    joined, stale = matched(labels, samples)
    truth = stats.people_truth(joined)
    lab = samples.merge(truth, on=["partition", "sample_key", "pair_sha256"], how="inner")
    if not len(lab):
        raise NoLabelsError(f"none of the {len(labels)} labels under {folder} decides a pair (unsure, ties, or "
                            "given to other images)")
    y, w = lab["good"].to_numpy(bool), lab["weight"].to_numpy(float)
    groups = lab["caption_id"].to_numpy()  # a triplet's samples share its captions: their labels go together
    rungs = cfg.judges.rungs()
    current = cfg.selection()
    paper = current.model_copy(update=PAPER)
    rules: list[dict] = []

    def add(which: str, masks: dict[str, np.ndarray]) -> None:
        for name, mask in masks.items():
            rules.append({"set": which, "rule": name, **stats.evaluate(mask, y, w, confidence, groups)})

    add("paper", stats.clip_rules(lab, paper))
    add("current", stats.clip_rules(lab, current))
    if len(rungs) > 1:
        add("current", stats.rung_rules(lab, current, rungs))
    add("current", {"kept (top-k)": lab["filter_kept"].to_numpy(bool)})
    found = stats.search(lab, y, w, current, rungs, target, confidence, min_passing,
                         extra={f: (PAPER[f],) for f in stats.CLIP_FIELDS}, groups=groups)
    suggested = current.model_copy(update=found["found"]["thresholds"]) if found["found"] else None
    reselection = {"current": _kept(samples, lab, cfg, current, reselect, stats, y, w, confidence, groups)}
    if suggested is not None:
        add("suggested", stats.clip_rules(lab, suggested))
        with_new = decide(samples.copy(), cfg, suggested)
        kept_new = lab[["partition", "sample_key"]].merge(
            with_new[["partition", "sample_key", "filter_kept"]], how="left")["filter_kept"].fillna(False)
        add("suggested", {"kept (top-k)": kept_new.to_numpy(bool)})
        reselection["suggested"] = _kept(samples, lab, cfg, suggested, reselect, stats, y, w, confidence, groups)
    cross = _cross_check(lab, y, w, groups, current, rungs, target, confidence, min_passing, stats)
    scored = stats.with_scores(lab)
    curves = {col: stats.roc(scored[col].to_numpy(float), y, w, confidence) for col in stats.metric_columns(rungs)
              if col in scored}
    thresholds = {"paper": PAPER, "current": {f: getattr(current, f) for f in stats.CLIP_FIELDS},
                  "suggested": found["found"]["thresholds"] if found["found"] else None}
    return _clean({
        "config": cfg.name, "output_root": cfg.output_root, "render_hash": render_hash, "labels_dir": folder,
        "partitions": partitions, "target_precision": target, "confidence": confidence, "min_passing": min_passing,
        "labels": {"rows": len(labels), "reviewers": sorted(labels["reviewer"].unique().tolist()),
                   "counts": stats.label_counts(labels), "not_matching_images": stale,
                   "pairs_decided": len(lab), "good": int(y.sum()), "weighted_good_share": float((w * y).sum() / w.sum()),
                   "strata": {str(k): int(v) for k, v in lab["stratum"].value_counts().sort_index().items()}
                   if "stratum" in lab else {}},
        "people_agreement": stats.reviewer_agreement(joined),
        "thresholds": thresholds, "rules": rules,
        "roc": {col: {"auc": c["auc"], "auc_low": c["auc_low"], "auc_high": c["auc_high"], "points": len(c["fpr"]), "fpr": c["fpr"], "tpr": c["tpr"],
                      "thresholds": c["thresholds"],
                      "at": {name: stats.rate_at(c, t[f]) if t else None for name, t in thresholds.items()
                             for f in [_field_of(col)] if f}} for col, c in curves.items()},
        "search": {k: v for k, v in found.items() if k != "grid"}, "cross_check": cross,
        "reselection": reselection,
        "set": [f"filter.{f}={v:g}" for f, v in found["found"]["thresholds"].items()] if found["found"] else [],
    })


def _cross_check(lab, y, w, groups, current, rungs, target, confidence, min_passing, stats) -> list[dict]:
    """The search on each half of the triplets (a hash of caption_id), its suggestion scored on the other half:
    how far the precision of a suggestion holds on labels it was not chosen on."""
    import hashlib

    from tasks.common.selection import passes

    half = np.array([int(hashlib.sha1(str(c).encode()).hexdigest(), 16) % 2 for c in groups])
    out = []
    for k in (0, 1):
        fit, held = half != k, half == k
        if not fit.any() or not held.any():
            continue
        found = stats.search(lab[fit], y[fit], w[fit], current, rungs, target, confidence, min_passing,
                             groups=groups[fit])["found"]
        if found is None:
            out.append({"held_out_half": k, "thresholds": None})
            continue
        rule = passes(lab[held], current.model_copy(update=found["thresholds"]), rungs).to_numpy(bool)
        check = stats.evaluate(rule, y[held], w[held], confidence, groups[held])
        out.append({"held_out_half": k, "thresholds": found["thresholds"], "precision_chosen_on": found["precision"],
                    **{f"held_out_{m}": check[m] for m in ("precision", "precision_low", "precision_high", "recall",
                                                           "passing")}})
    return out


def _field_of(column: str) -> str | None:
    from tasks.filter.calibrate import CLIP_SCORES

    return next((f for f, c in CLIP_SCORES.items() if c == column), None)


def _kept(samples, lab, cfg, selection, reselect, stats, y, w, confidence, groups) -> dict:
    """What the filter keeps under ``selection`` on every sample read, and its precision on the labelled ones."""
    kept, not_stored = reselect(samples, cfg, selection)
    keys = samples.loc[kept.to_numpy(bool), ["partition", "sample_key"]]
    on_lab = lab[["partition", "sample_key"]].merge(keys.assign(_k=True), how="left")["_k"].fillna(False)
    mask = on_lab.to_numpy(bool)
    est = stats.evaluate(mask, y, w, confidence, groups)
    return {"kept": int(kept.sum()), "triplets_with_kept": int(samples.loc[kept.to_numpy(bool), "caption_id"].nunique()),
            "samples": len(samples), "triplets": int(samples["caption_id"].nunique()), "image_not_stored": not_stored,
            "labelled_kept": int(mask.sum()), "precision": est["precision"], "precision_low": est["precision_low"],
            "precision_high": est["precision_high"]}


def plot(result: dict) -> bytes:
    """people_vs_filter.png: each score's ROC with the paper's / the config's / the suggested thresholds
    marked, and each rule's precision and recall with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    markers = {"paper": "x", "current": "o", "suggested": "*"}
    for col, curve in result["roc"].items():
        if not curve["fpr"]:
            continue
        auc = curve["auc"]
        line, = left.plot(curve["fpr"], curve["tpr"], label=f"{col} (AUC {auc:.2f})" if auc is not None else col)
        for name, point in curve["at"].items():
            if point:
                left.plot(*point, markers[name], color=line.get_color(), markersize=9 if name == "suggested" else 7,
                          markerfacecolor="none" if name == "current" else line.get_color())
    left.plot([0, 1], [0, 1], ":", color="#999")
    left.set_xlabel("false positive rate (pairs people rejected, passed)")
    left.set_ylabel("true positive rate (good pairs passed)")
    left.set_title("ROC per score (x paper, o config, * suggested threshold)", fontsize=9)
    left.legend(fontsize=7, loc="lower right")
    picks = [("paper", "CLIP (all three)", "paper CLIP"), ("current", "CLIP (all three)", "config CLIP"),
             ("suggested", "CLIP (all three)", "suggested CLIP"), ("current", "kept (top-k)", "kept now"),
             ("suggested", "kept (top-k)", "kept, suggested")]
    rows = {(r["set"], r["rule"]): r for r in result["rules"]}
    shown = [(label, rows[(s, rule)]) for s, rule, label in picks if (s, rule) in rows]
    x = np.arange(len(shown))
    for offset, (metric, colour) in zip((-0.12, 0.12), (("precision", "#2b6cb0"), ("recall", "#c05621"))):
        vals = [r[metric] if r[metric] is not None else np.nan for _, r in shown]
        lows = [max(0.0, v - r[f"{metric}_low"]) if r[f"{metric}_low"] is not None else 0.0
                for v, (_, r) in zip(vals, shown)]
        highs = [max(0.0, r[f"{metric}_high"] - v) if r[f"{metric}_high"] is not None else 0.0
                 for v, (_, r) in zip(vals, shown)]
        right.errorbar(x + offset, vals, yerr=[lows, highs], fmt="o", color=colour, capsize=4, label=metric)
    right.axhline(result["target_precision"], ls="--", color="#2b6cb0", lw=0.8,
                  label=f"target precision {result['target_precision']:g}")
    right.set_xticks(x, [label for label, _ in shown], fontsize=8, rotation=15)
    right.set_ylim(0, 1.05)
    right.set_title(f"against {result['labels']['pairs_decided']} labelled pairs ({result['confidence']:.0%} Wilson "
                    "intervals)", fontsize=9)
    right.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{result['config']}: people vs filter (render {result['render_hash'][:8]})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write(cfg, result: dict, png: bytes) -> dict[str, str]:
    """calibration.json, people_vs_filter.png and filter.set beside the labels; their URLs."""
    from tasks.common import layout, storage

    folder = layout.review_dir(cfg.output_root, result["render_hash"])
    urls = {"json": storage.url_join(folder, layout.CALIBRATION_FILE),
            "plot": storage.url_join(folder, layout.PEOPLE_PLOT),
            "set": storage.url_join(folder, layout.FILTER_OVERRIDES_FILE)}
    storage.write_bytes_atomic(urls["json"], (json.dumps(result, indent=1) + "\n").encode())
    storage.write_bytes_atomic(urls["plot"], png)
    storage.write_bytes_atomic(urls["set"], "".join(f"--set {line}\n" for line in result["set"]).encode())
    return urls


def _f(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _interval(row: dict, metric: str) -> str:
    if row[metric] is None:
        return "-"
    return f"{100 * row[metric]:.1f}% ({100 * row[f'{metric}_low']:.0f}-{100 * row[f'{metric}_high']:.0f})"


def rule_rows(result: dict) -> list[dict]:
    return [{"thresholds": r["set"], "rule": r["rule"], "precision": _interval(r, "precision"),
             "recall": _interval(r, "recall"), "passing": f"{r['passing']} of {r['labelled']}",
             "kappa": "-" if r["kappa"] is None else f"{r['kappa']:.2f}"} for r in result["rules"]]


def summary_lines(result: dict) -> list[str]:
    lab = result["labels"]
    t = result["thresholds"]
    lines = [f"{lab['rows']} labels by {', '.join(lab['reviewers'])} ({', '.join(f'{k} {v}' for k, v in lab['counts'].items())}); "
             f"{lab['pairs_decided']} pairs decided ({lab['good']} good edits), {lab['not_matching_images']} labels "
             f"left out (given to other images); render partitions {result['partitions']}",
             "thresholds (image-image / caption / direction): paper " + _trio(t["paper"]) + ", config "
             + _trio(t["current"]) + (", suggested " + _trio(t["suggested"]) if t["suggested"] else "")]
    for agree in result["people_agreement"]:
        lines.append(f"reviewers {' and '.join(agree['reviewers'])}: agree on {_f(agree['agree'])} of "
                     f"{agree['shared']} shared pairs, kappa " + ("-" if agree["kappa"] is None else f"{agree['kappa']:.2f}"))
    lines.append("ROC area: " + ", ".join(f"{c} {v['auc']:.2f} ({v['auc_low']:.2f}-{v['auc_high']:.2f})"
                                          for c, v in result["roc"].items() if v["auc"] is not None))
    search = result["search"]
    target = f"{result['target_precision']:g} at the {result['confidence']:.0%} interval's lower end"
    if search["found"]:
        f = search["found"]
        lines.append(f"suggested: precision {_f(f['precision'])} (lower bound {_f(f['precision_low'])}, target {target}), "
                     f"recall {_f(f['recall'])}, {f['passing']} labelled pairs pass")
    else:
        best = search["best_precision_low"]
        lines.append(f"no CLIP thresholds on the grid ({search['combinations']} combinations) reach precision {target} "
                     f"with at least {result['min_passing']} labelled pairs passing (best lower bound: {_f(best)}); "
                     "label more pairs or lower --target-precision")
    for c in result.get("cross_check", []):
        if c["thresholds"] is None:
            lines.append(f"cross-check: on the triplets of half {1 - c['held_out_half']} alone no thresholds reach the target")
        elif c["held_out_precision"] is not None:
            lines.append(f"cross-check: chosen on half {1 - c['held_out_half']} of the triplets ({_trio(c['thresholds'])}, "
                         f"precision there {_f(c['precision_chosen_on'])}), on the other half: precision "
                         f"{_f(c['held_out_precision'])} ({_f(c['held_out_precision_low'])}-{_f(c['held_out_precision_high'])}),"
                         f" recall {_f(c['held_out_recall'])}")
    for name, k in result["reselection"].items():
        lines.append(f"re-selection, {name} thresholds: {k['kept']} pairs kept of {k['samples']} samples "
                     f"({k['triplets_with_kept']} of {k['triplets']} triplets keep a pair), precision of the kept "
                     + _interval(k, "precision")
                     + (f"; {k['image_not_stored']} wanted pairs have no stored images (render.save_images)"
                        if k["image_not_stored"] else ""))
    return lines


def _trio(t: dict) -> str:
    return "/".join(f"{t[f]:g}" for f in ("clip_image_threshold", "clip_caption_threshold", "clip_direction_threshold"))


def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"people vs filter: '{result['config']}', render {result['render_hash']}",
                  caption="precision: share of passing pairs people call good edits; recall: share of the good "
                          f"pairs passing; ({result['confidence']:.0%} Wilson interval); kappa: agreement with people")
    rows = rule_rows(result)
    for name in rows[0]:
        table.add_column(name, justify="left" if name in ("thresholds", "rule") else "right")
    for row in rows:
        table.add_row(*row.values(), style="bold green" if row["thresholds"] == "suggested" else None)
    console.print(table)
    for line in summary_lines(result):
        console.print(line, highlight=False)


def report_section(cfg) -> dict | None:
    """The report's "People vs filter" section (html and markdown, the plot embedded), or None without labels:
    every label so far, at the target precision of the last `calibrate-filter` (else ``review.*``)."""
    from tasks import registry
    from tasks.common import layout, storage
    from tasks.filter.labels import LabelStore
    from tasks.filter.review import NoRenderError

    render_hash = registry.stage_hash(cfg, "render")
    folder = layout.labels_dir(cfg.output_root, render_hash)
    if not storage.list_files(folder, "*.parquet"):
        return None
    last = storage.url_join(layout.review_dir(cfg.output_root, render_hash), layout.CALIBRATION_FILE)
    asked = storage.read_json(last) if storage.exists(last) else {}  # the target of the last calibrate-filter
    try:
        result = calibrate(cfg, LabelStore(folder).read(), target=asked.get("target_precision"),
                           confidence=asked.get("confidence"))
    except (NoLabelsError, NoRenderError) as err:
        text = f"People vs filter: {err}"
        return {"html": f"<h2 id='people'>People vs filter</h2><p>{html.escape(text)}</p>", "markdown": f"## {text}"}
    uri = "data:image/png;base64," + base64.b64encode(plot(result)).decode()
    lines = summary_lines(result)
    rows = rule_rows(result)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    overrides = " ".join(f"--set {s}" for s in result["set"])
    page = (f"<h2 id='people'>People vs filter</h2><p>{'<br>'.join(html.escape(x) for x in lines)}</p>"
            f"<img alt='people' src='{uri}'><table><tr>{head}</tr>{body}</table>"
            + (f"<p>re-select with: <code>{html.escape(overrides)}</code></p>" if overrides else ""))
    md_rows = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md_rows += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    markdown = "\n\n".join(["## People vs filter", "\n".join(f"- {x}" for x in lines), f"![people]({uri})",
                            "\n".join(md_rows)] + ([f"re-select with: `{overrides}`"] if overrides else []))
    return {"html": page, "markdown": markdown}


def calibrate_filter(
    preset: Preset = "demo",
    overrides: Overrides = None,
    target_precision: Annotated[float | None, typer.Option(help="precision the suggested thresholds reach (default: "
                                                                 "review.target_precision)")] = None,
    confidence: Annotated[float | None, typer.Option(help="Wilson intervals' level (default: review.confidence)")] = None,
    reviewer: Annotated[list[str] | None, typer.Option(help="only these reviewers' labels (repeatable)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result here")] = None,
    debug: Debug = False,
) -> None:
    """Precision/recall of the filter's rules against people's labels; thresholds that reach a target precision."""
    cfg = load_or_exit(preset, overrides)
    for name, value in (("--target-precision", target_precision), ("--confidence", confidence)):
        if value is not None and not 0 < value < 1:
            typer.echo(f"error: {name} {value}: a share between 0 and 1 (exclusive)", err=True)
            raise typer.Exit(2)
    with reported(debug):
        result = calibrate(cfg, target=target_precision, confidence=confidence, reviewers=reviewer)
        urls = write(cfg, result, plot(result))
    print_result(result)
    typer.echo(f"wrote {urls['json']}, {urls['plot']}, {urls['set']}")
    if result["set"]:
        typer.echo("re-select with them (the filter stage reads the stored scores; nothing is rendered again):")
        typer.echo("  " + " ".join(f"--set {s}" for s in result["set"]))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(f"wrote {json_out}")
