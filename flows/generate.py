"""The end-to-end DAG (Figure 2 of the paper), as one Prefect flow of stage sub-flows:

    captions ─┐
    finetune ─┴► text (triplets) ──► render (P2P pairs + CLIP, DINOv2, SSIM) ──► judge (VLM) ──► filter ──► pack (shards)

    python -m flows.generate --preset demo [--set render.steps=20 ...]    (= editforge run)

With `--set run.mode=fan-out` (as a deployment on a cluster) the stages run as child flow runs of
their own deployments, in blocks of partitions, on the pools those deployments name (flows/fanout.py).
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows import dashboard, report_html
from flows.fanout import fan_out
from flows.target import top_up
from flows.options import Debug, Overrides, Preset, Verify, load_or_exit, reported, run_command, with_verify
from flows.report import render_report, source_stats, summary_lines
from flows.stages import FLOWS
from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import check_text_lm, load_config


def meet_target(cfg, preset: str, overrides: list[str], logger) -> dict[str, list[dict]]:
    """Captions generations until ``text.target_triplets`` is met (flows/target.py); the last manifests."""
    manifests: dict[str, list[dict]] = {}
    for _ in range(cfg.text.max_top_ups):
        wanted = top_up(cfg, logger)
        if wanted is None:
            break
        more = [*overrides, f"captions.num_captions={wanted}"]
        manifests = {name: FLOWS[name](preset, more) for name in ("captions", "text")}
    return manifests


@flow(name="editforge-generate", log_prints=True)
def generate(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    """Run every stage of the chain in order; finished partitions are skipped, so a re-run resumes."""
    cfg = load_config(preset, overrides or [])
    check_text_lm(cfg, f"preset {preset}")  # the random tiny LM refused before any stage runs (paper, fast)
    if cfg.run.mode == "fan-out":  # every block a child flow run of its stage's deployment
        manifests = fan_out(cfg, preset, overrides or [], get_run_logger())
    else:
        manifests = {}
        for stage in registry.chain():
            if stage.name == "render":  # the text stage is done: top the captions up to text.target_triplets
                manifests |= meet_target(cfg, preset, overrides or [], get_run_logger())
            manifests[stage.name] = FLOWS[stage.name](preset, overrides)
    index_url = registry.index_url(cfg)
    index = storage.read_json(index_url) if storage.exists(index_url) else None
    rows = render_report(cfg, manifests, index)
    notes = summary_lines(cfg, manifests, rows, source_stats(cfg))
    create_table_artifact(
        [
            {
                "stage": r["stage"],
                "partitions": r["partitions"],
                "skipped": r["skipped"],
                "in": r["in"],
                "out": r["out"],
                "rejected": ", ".join(f"{k}: {v}" for k, v in r["rejected"].items()) or "-",
            }
            for r in rows
        ],
        key=layout.artifact_key(cfg.name, "summary", registry.stage_hash(cfg, "pack")),
        description=f"EditForge `{cfg.name}` run summary\n\n" + "\n".join(f"- {line}" for line in notes),
    )
    stages = {
        r["stage"]: {"in": r["in"], "out": r["out"], "skipped": r["skipped"], "rejected": r["rejected"]}
        for r in rows
    }
    report = report_html.build_and_publish(cfg, get_run_logger())
    dashboard.run_completed(cfg, stages)
    return {
        "output_root": cfg.output_root,
        "index": index_url if index else None,
        "report": report,
        "stages": stages,
    }


def run(
    preset: Preset = "demo", overrides: Overrides = None, verify: Verify = False, debug: Debug = False
) -> None:
    """Run the whole DAG; finished partitions (outputs checked) are skipped."""
    overrides = with_verify(overrides, verify)
    cfg = load_or_exit(preset, overrides)
    with reported(debug):
        check_text_lm(cfg, f"preset {preset}")  # before Prefect starts: one line, exit 2
        generate(preset, overrides)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv, "python -m flows.generate", __doc__)


if __name__ == "__main__":
    sys.exit(main())
