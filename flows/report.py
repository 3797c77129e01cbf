"""The end-of-run summary: counts per stage, rejections by reason, where the shards are.

One row per partitioned stage of the chain; the fine-tune (one partition) gets its own line. Only
manifests of the config being reported count: :func:`current_manifests` reads the partitions
finished under this config's hashes, never those another config left in the same output root.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tasks import registry
from tasks.common import contract, layout
from tasks.common.config import PipelineConfig
from tasks.filter.stage import funnel_line


def current_manifests(cfg: PipelineConfig) -> dict[str, list[dict]]:
    """Per chain stage, the `_SUCCESS.json` of its partitions finished under this config's hash."""
    found: dict[str, list[dict]] = {}
    for stage in registry.chain():
        found[stage.name] = [m for m in registry.manifests(cfg, stage.name).values() if m]
    return found


def source_stats(cfg: PipelineConfig) -> dict:
    """Rows read and rejections by reason in the latest read of the sources (the ledger's last generation:
    each generation reads every source file), and how many generations the ledger holds."""
    from tasks.captions.generations import ledger

    gens = ledger(cfg)
    last = gens[-1].record if gens else {}
    return {
        "counts": last.get("counts", {}),
        "rejected": last.get("rejected", {}),
        "generations": len(gens),
        "captions_taken": last.get("total_taken", 0),
    }


def summarise(manifests: dict[str, list[dict]]) -> list[dict]:
    """One row per stage: partitions run/skipped, items in/out, rejections by reason."""
    rows = []
    for stage, items in manifests.items():
        if registry.get(stage).partitions != "all":
            continue
        total = sum(map(contract.Stats.of, items), contract.Stats())
        counts, rejected = total.counts, total.rejected
        rows.append(
            {
                "stage": stage,
                "partitions": len(items),
                "skipped": sum(bool(m.get("skipped")) for m in items),
                "in": counts.get("in", counts.get("finetune_examples", 0)),
                "out": counts.get("out", 0),
                "rejected": dict(sorted(rejected.items())),
                "counts": dict(counts),
            }
        )
    return rows


def render_report(
    cfg: PipelineConfig, manifests: dict[str, list[dict]], index: dict | None, console: Console | None = None
) -> list[dict]:
    console = console or Console()
    rows = summarise(manifests)
    source = source_stats(cfg)
    table = Table(title=f"EditForge run '{cfg.name}' — {cfg.output_root}")
    for col in ("stage", "partitions", "skipped", "in", "out", "rejected (reason: count)"):
        table.add_column(col)
    for r in rows:
        rejected = dict(r["rejected"])
        if r["stage"] == "captions":
            rejected = source.get("rejected", {})
            r["in"] = source.get("counts", {}).get("rows_read", r["in"])
        table.add_row(
            r["stage"],
            str(r["partitions"]),
            str(r["skipped"]),
            str(r["in"]),
            str(r["out"]),
            ", ".join(f"{k}: {v}" for k, v in rejected.items()) or "-",
        )
    console.print(table)
    for line in summary_lines(cfg, manifests, rows, source):
        console.print(
            line.replace("note:", "[yellow]note:[/yellow]", 1) if line.startswith("note:") else line
        )
    if index:
        for split, info in index["splits"].items():
            console.print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
        console.print(f"shards index: {registry.index_url(cfg)}")
    return rows


# what each stage's `in` counts, from the stage before it (the report says so when two figures differ)
READS = {
    "text": ("captions", "out", "the captions of its partitions"),
    "render": ("text", "in", "every row of text's triplets.parquet, the ones text rejected included"),
    "judge": ("render", "out", "the pairs render kept"),
    "filter": (
        "render",
        "samples",
        "every sample render drew and scored, re-selected with the filter's thresholds",
    ),
    "pack": ("filter", "out", "the pairs the filter kept"),
}


def between_stages(rows: list[dict]) -> list[str]:
    """One line per stage of the chain saying how its `in` follows from the stage it reads, and what it
    dropped on the way out: why the table's figures need not match from one row to the next."""
    by = {r["stage"]: r for r in rows}
    lines = []
    for stage, (upstream, figure, what) in READS.items():
        r, u = by.get(stage), by.get(upstream)
        if r is None or u is None:
            continue
        theirs = u["out"] if figure == "out" else u["counts"].get(figure, 0) if figure != "in" else u["in"]
        head = f"{upstream} -> {stage}: {stage} in {r['in']:,}"
        if r["partitions"] != u["partitions"]:
            lines.append(
                f"{head}, {upstream} {figure} {theirs:,}: {stage} has {r['partitions']} partitions finished, "
                f"{upstream} {u['partitions']} (the rest are not counted yet)"
            )
            continue
        note = (
            f"{head} = {upstream} {figure} {theirs:,} ({what})"
            if r["in"] == theirs
            else f"{head}, {upstream} {figure} {theirs:,}: not what {stage} reads ({what}) — look at the partitions' manifests"
        )
        if stage == "render":
            c, rejected = r["counts"], sum(u["rejected"].values())
            if rejected:
                reasons = ", ".join(
                    f"{k}: {v:,}" for k, v in sorted(u["rejected"].items(), key=lambda kv: -kv[1])
                )
                note += f"; text accepted {u['out']:,} of them and rejected {rejected:,} ({reasons}): render renders the accepted"
            note += (
                f"; {c.get('samples', 0):,} samples drawn, {c.get('passed', 0):,} passed, {r['out']:,} pairs kept "
                "(at most render.keep.top_k per triplet: pairs, not triplets)"
            )
        elif r["out"] != r["in"]:
            lost = r["in"] - r["out"]
            reasons = ", ".join(
                f"{k}: {v:,}" for k, v in sorted(r["rejected"].items(), key=lambda kv: -kv[1])
            )
            note += f"; out {r['out']:,}" + (
                f" ({lost:,} dropped: {reasons})" if reasons and lost > 0 else ""
            )
        lines.append(note)
    return lines


def summary_lines(
    cfg: PipelineConfig, manifests: dict[str, list[dict]], rows: list[dict], source: dict
) -> list[str]:
    """The lines under the table (fine-tune loss, UNet calls against the reference, other versions, notes):
    printed at the end of a run and written into the dashboard's summary artifact."""
    lines = []
    finetune = next(iter(manifests.get("finetune", [])), None)
    if finetune and "finetune" in contract.figures(finetune):
        f = contract.figures(finetune)["finetune"]
        loss = (
            f"train loss {f['train_loss_first10']:.2f} -> {f['train_loss_last10']:.2f}"
            if f.get("train_loss_first10") is not None
            else ""
        )
        val = f", val loss {f['val_loss']:.2f}" if f.get("val_loss") is not None else ""
        lines.append(
            f"fine-tune: {f.get('base_model')} on {f.get('train_examples')} seed triplets "
            f"({f.get('val_examples')} held out); {loss}{val}"
        )
    lines += between_stages(rows)
    render = next((r for r in rows if r["stage"] == "render"), None)
    if render:
        c = render["counts"]
        ref = c.get("unet_calls_reference")
        versus = f" (the reference loop: {ref}, {c.get('unet_calls', 0) / ref:.0%})" if ref else ""
        passed = "the CLIP filter" if not cfg.judges.image_rungs() else "CLIP and the image rungs"
        lines.append(
            f"render: {c.get('samples', 0)} samples drawn, {c.get('passed', 0)} passed {passed}, "
            f"{c.get('out', 0)} kept ({c.get('images_stored', 0)} pairs' images written, "
            f"render.save_images={cfg.render.save_images}); "
            f"{c.get('unet_calls', 0)} UNet calls (sample x step){versus}"
        )
    filtered = next((r for r in rows if r["stage"] == "filter"), None)
    if filtered and (ladder := funnel_line(filtered["counts"])):  # each judge rung's pass rate
        lines.append(ladder)
    others = {
        stage.name: [
            v
            for v in layout.versions(cfg.output_root, stage.name)
            if v != registry.stage_hash(cfg, stage.name)
        ]
        for stage in registry.chain()
    }
    others = {k: v for k, v in others.items() if v}
    if others:
        lines.append(
            "other versions on disk (other configs): "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in others.items())
        )
    if source.get("generations", 0) > 1:
        lines.append(
            f"captions: {source['generations']} generations, {source['captions_taken']} captions taken in all"
        )
    if cfg.filter.note:
        lines.append(f"note: {cfg.filter.note}")
    return lines
