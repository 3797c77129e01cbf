"""The end-to-end DAG (Figure 2 of the paper), as one Prefect flow of stage sub-flows:

    captions ──► finetune LM ──► text (triplets) ──► render (P2P pairs + CLIP) ──► filter ──► pack

    python -m flows.generate --preset demo [--set render.steps=20 ...]
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import sys

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.args import config_ok, preset_parser
from flows.report import render_report
from flows.stages import captions_flow, filter_flow, pack_flow, render_flow, text_flow
from tasks.common import storage
from tasks.common.config import load_config


@flow(name="editforge-generate", log_prints=True)
def generate(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    """Run every stage in order; finished partitions are skipped, so a re-run resumes."""
    cfg = load_config(preset, overrides or [])
    manifests = {
        "captions": captions_flow(preset, overrides),
        "text": text_flow(preset, overrides),
        "render": render_flow(preset, overrides),
        "filter": filter_flow(preset, overrides),
        "pack": pack_flow(preset, overrides),
    }
    index_url = storage.url_join(cfg.output_root, "pack", "index.json")
    index = storage.read_json(index_url) if storage.exists(index_url) else None
    rows = render_report(cfg, manifests, index)
    create_table_artifact(
        [{"stage": r["stage"], "partitions": r["partitions"], "skipped": r["skipped"], "in": r["in"], "out": r["out"],
          "rejected": ", ".join(f"{k}: {v}" for k, v in r["rejected"].items())} for r in rows],
        key=f"editforge-{cfg.name}-summary".lower(), description=f"EditForge `{cfg.name}` run summary",
    )
    return {"output_root": cfg.output_root, "index": index_url if index else None,
            "stages": {r["stage"]: {"in": r["in"], "out": r["out"], "skipped": r["skipped"],
                                    "rejected": r["rejected"]} for r in rows}}


def main(argv: list[str] | None = None) -> int:
    parser = preset_parser("python -m flows.generate", __doc__)
    args = parser.parse_args(argv)
    if not config_ok(args):
        return 2
    generate(args.preset, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
