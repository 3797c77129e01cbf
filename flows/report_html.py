"""`report/<pack hash>/report.html`: one self-contained page per run (the PNGs embedded, and also
written beside it), and the same figures as the dashboard's markdown artifact
(`editforge-<name>-report-<hash8>`, images as data URIs: the Prefect UI renders them).

    editforge report --preset demo --html      # rebuilds it from disk
"""

from __future__ import annotations

import base64
import html
import time

from flows import dashboard
from flows.report import summarise
from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}code{background:#f3f3f3}"""


def _uri(data: bytes) -> str:
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _stage_rows(data) -> list[dict]:
    rows = []
    for r in summarise(data.manifests):
        rejected, n_in = r["rejected"], r["in"]
        if r["stage"] == "captions":  # what reading the sources rejected (the ledger's last read)
            rejected, n_in = data.source.get("rejected", {}), data.source.get("counts", {}).get("rows_read", n_in)
        rows.append({"stage": r["stage"], "partitions": r["partitions"], "in": n_in, "out": r["out"],
                     "rejected": ", ".join(f"{k}: {v}" for k, v in rejected.items()) or "-"})
    return rows


def _table_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>nothing finished yet</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_md(rows: list[dict]) -> str:
    if not rows:
        return "nothing finished yet"
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)


def _facts(cfg: PipelineConfig) -> list[dict]:
    keep = cfg.render.keep
    return [{"setting": k, "value": v} for k, v in (
        ("diffusion model", cfg.models.diffusion), ("CLIP", cfg.models.clip),
        ("thresholds (image / direction / caption)",
         f"{keep.clip_image_threshold} / {keep.clip_direction_threshold} / {keep.clip_caption_threshold}"),
        ("top k per triplet", keep.top_k), ("samples per triplet", cfg.render.samples_per_triplet),
        ("steps", cfg.render.steps), ("pack hash", registry.stage_hash(cfg, "pack")))]


def build(cfg: PipelineConfig, max_partitions: int = 20) -> dict:
    """Write report.html and the PNGs under `report/<pack hash>/`; return their URLs and the markdown."""
    from flows import figures  # matplotlib: imported when a report is built, not with the flows

    data = figures.gather(cfg, max_partitions)
    pngs = figures.make_all(data)
    folder = layout.report_dir(cfg.output_root, registry.stage_hash(cfg, "pack"))
    files = {name: storage.url_join(folder, file) for name, (_, file, _) in figures.FIGURES.items()}
    for name, blob in pngs.items():
        storage.write_bytes_atomic(files[name], blob)
    progress = [{"stage": r["stage"], "partitions done": f"{r['done']} of {r['total']}",
                 "kept pairs": "-" if r["kept_pairs"] is None else r["kept_pairs"]} for r in dashboard.run_progress(cfg)]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    sections = "".join(f'<h2 id="{name}">{html.escape(title)}</h2><img alt="{name}" src="{_uri(pngs[name])}">'
                       for name, (title, _, _) in figures.FIGURES.items())
    from flows.calibrate_filter import report_section  # "People vs filter", when the run has labels

    people = report_section(cfg) or {"html": "", "markdown": ""}
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>EditForge {html.escape(cfg.name)}</title>"
            f"<style>{CSS}</style></head><body><h1>EditForge run <code>{html.escape(cfg.name)}</code></h1>"
            f"<p>{html.escape(cfg.output_root)} — built {stamp} from the files on disk "
            f"(<code>editforge report --html</code>)</p>"
            f"<h2>Stages</h2>{_table_html(_stage_rows(data))}<h2>Progress</h2>{_table_html(progress)}"
            f"<h2>Settings</h2>{_table_html(_facts(cfg))}{sections}{people['html']}</body></html>")
    html_url = storage.url_join(folder, "report.html")
    storage.write_bytes_atomic(html_url, page.encode())
    markdown = "\n\n".join([
        f"# EditForge run `{cfg.name}`", f"`{cfg.output_root}`, built {stamp}; the same page as `{html_url}`.",
        "## Stages", _table_md(_stage_rows(data)), "## Settings", _table_md(_facts(cfg)),
        *(f"## {title}\n\n![{name}]({_uri(pngs[name])})" for name, (title, _, _) in figures.FIGURES.items()),
        *([people["markdown"]] if people["markdown"] else [])])
    return {"html": html_url, "images": files, "markdown": markdown}


def publish(cfg: PipelineConfig, built: dict) -> None:
    """The report as a keyed markdown artifact (`editforge-<name>-report-<hash8>`)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(built["markdown"], key=layout.artifact_key(cfg.name, "report", registry.stage_hash(cfg, "pack")),
                             description=f"EditForge `{cfg.name}` report: funnel, CLIP metrics, pass rates, pairs, losses")


def build_and_publish(cfg: PipelineConfig, logger) -> str | None:
    """The end of a flow run: build the report, publish it; a failure here is logged, the run stands."""
    try:
        built = build(cfg)
        publish(cfg, built)
    except Exception as err:
        logger.warning("the run's report was not built (%s: %s); `editforge report --html` retries it",
                       type(err).__name__, err)
        return None
    print(f"report: {built['html']}")
    return built["html"]
