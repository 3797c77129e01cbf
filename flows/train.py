"""The training flow (paper sec. 3.2): train the InstructPix2Pix editing model on the packed shards.

    pack/index.json ──► train (one resumable task: accelerate loop, checkpoints) ──► train/part-00000/
                                                                                      model/ (IP2P pipeline)
                                                                                      sample_edit.png

    python -m flows.train --preset demo [--set train.steps=100 ...] [--index path/to/index.json]

A finished training (same config and shards) is skipped; a killed or failed one resumes from its latest
checkpoint — the task's retry does exactly that.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import sys

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact

from flows.args import config_ok, preset_parser
from tasks.common.config import PipelineConfig, load_config
from tasks.common.resources import stage_resources
from tasks.train.stage import default_index_url, run_train


@task(name="train-editing-model", retries=1, retry_delay_seconds=5)
def train_task(cfg: PipelineConfig, index_url: str) -> dict:
    return run_train(cfg, index_url, logger=get_run_logger())


def publish_training(cfg: PipelineConfig, manifest: dict) -> None:
    """The loss curve as a keyed table artifact (`editforge-<name>-train`) for the dashboard."""
    key = f"editforge-{cfg.name}-train".lower().replace("_", "-").replace(".", "-")
    summary = manifest.get("train", {})
    sample = manifest.get("sample", {})
    description = (f"EditForge `{cfg.name}` — editing-model training: {summary.get('steps')} steps, loss "
                   f"{summary.get('loss_first')} → {summary.get('loss_last')}; sample edit "
                   f"{sample.get('instruction')!r} in {sample.get('png')}")
    create_table_artifact(manifest.get("loss_curve", []), key=key, description=description)


@flow(name="editforge-train", log_prints=True)
def train(preset: str = "demo", overrides: list[str] | None = None, index: str | None = None) -> dict:
    """Train on `index` (default `{output_root}/pack/index.json`); returns the small manifest."""
    cfg = load_config(preset, overrides or [])
    with tags(*stage_resources(cfg)["train"].tags("train")):
        manifest = train_task(cfg, index or default_index_url(cfg))
    publish_training(cfg, manifest)
    summary = manifest.get("train", {})
    print(f"train: {summary.get('steps')} steps, loss {summary.get('loss_first')} -> {summary.get('loss_last')}, "
          f"{summary.get('steps_per_s')} steps/s{' (already done, skipped)' if manifest.get('skipped') else ''}")
    print(f"model: {manifest.get('model_dir')}  sample edit: {manifest.get('sample', {}).get('png')}")
    return {k: manifest.get(k) for k in ("path", "model_dir", "config_hash", "skipped", "train", "sample", "index")}


def main(argv: list[str] | None = None) -> int:
    parser = preset_parser("python -m flows.train", __doc__)
    parser.add_argument("--index", default=None, help="shard index (default: {output_root}/pack/index.json)")
    args = parser.parse_args(argv)
    if not config_ok(args):
        return 2
    train(args.preset, args.overrides, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
