"""The training flow (paper sec. 3.2): train the InstructPix2Pix editing model on the packed shards.

    pack/<hash>/index.json ──► train (one resumable task: accelerate loop, checkpoints) ──► train/<hash>/part-00000/
                                                                                      model/ (IP2P pipeline)
                                                                                      sample_edit.png

    python -m flows.train --preset demo [--set train.steps=100 ...] [--index path/to/index.json]   (= editforge train)

A finished training (same config and shards) is skipped; a killed or failed one resumes from its latest
checkpoint — the task's retry does exactly that.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import sys
from typing import Annotated

import typer
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact

from flows.options import Debug, Overrides, Preset, load_or_exit, reported, run_command
from flows import report_html
from flows.stages import retry_unless_permanent
from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig, load_config

STAGE = registry.get("train")


@task(name="train-partition", retries=STAGE.retries, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def train_task(cfg: PipelineConfig, index_url: str | None) -> dict:
    return registry.entry(STAGE.name)(cfg, 0, index_url=index_url, logger=get_run_logger())


def publish_training(cfg: PipelineConfig, manifest: dict) -> None:
    """The loss curve as a keyed table artifact (`editforge-<name>-train`) for the dashboard."""
    key = layout.artifact_key(cfg.name, STAGE.name, manifest["config_hash"])
    summary = manifest.get("train", {})
    sample = manifest.get("sample", {})
    description = (f"EditForge `{cfg.name}` — editing-model training: {summary.get('steps')} steps, loss "
                   f"{summary.get('loss_first')} → {summary.get('loss_last')}; sample edit "
                   f"{sample.get('instruction')!r} in {sample.get('png')}")
    create_table_artifact(manifest.get("loss_curve", []), key=key, description=description)


@flow(name="editforge-train", log_prints=True)
def train(preset: str = "demo", overrides: list[str] | None = None, index: str | None = None) -> dict:
    """Train on `index` (default `{output_root}/pack/<hash>/index.json`); returns the small manifest."""
    cfg = load_config(preset, overrides or [])
    with tags(*STAGE.resources(cfg).tags(STAGE.name)):
        manifest = train_task(cfg, index)
    publish_training(cfg, manifest)
    if index is None:  # the run's own shards: its report gains the training loss curve
        report_html.build_and_publish(cfg, get_run_logger())
    summary = manifest.get("train", {})
    print(f"train: {summary.get('steps')} steps, loss {summary.get('loss_first')} -> {summary.get('loss_last')}, "
          f"{summary.get('steps_per_s')} steps/s{' (already done, skipped)' if manifest.get('skipped') else ''}")
    model, png = (storage.url_join(cfg.output_root, p) for p in (manifest.get("model_dir"), manifest.get("sample", {}).get("png")))
    print(f"model: {model}  sample edit: {png}")
    return {k: manifest.get(k) for k in ("path", "model_dir", "config_hash", "skipped", "train", "sample", "index")}


def train_command(preset: Preset = "demo", overrides: Overrides = None,
                  index: Annotated[str | None, typer.Option(help="pack/<hash>/index.json to train on (default: the run's)")] = None,
                  debug: Debug = False) -> None:
    """Train the editing model on the shards of a run (the separate training flow)."""
    load_or_exit(preset, overrides)
    with reported(debug):
        train(preset, overrides or [], index)


def main(argv: list[str] | None = None) -> int:
    return run_command(train_command, argv, "python -m flows.train", __doc__)


if __name__ == "__main__":
    sys.exit(main())
