"""The training flow (paper sec. 3.2): train the InstructPix2Pix editing model on the packed shards.

    python -m flows.train --preset demo [--set train.steps=100 ...] [--index path/to/index.json]   (= editforge train)
    python -m flows.train --preset paper --set train.nodes=2 --node-rank 1 ...   (node 1 of 2: its workers only)

A finished training is skipped; a killed or failed one resumes from its latest checkpoint (the task's
retry). The flow run launches the ``train.processes`` x ``train.nodes`` processes itself
(:mod:`tasks.train.launch`) and refuses to start under torchrun. In full: docs/training.md ("In the code").
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
from tasks.common import contract, layout, storage
from tasks.common.config import ConfigError, PipelineConfig, load_config
from tasks.train import launch

STAGE = registry.get("train")


@task(
    name="train-partition",
    retries=STAGE.retries,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_permanent,
)
def train_task(cfg: PipelineConfig, index_url: str | None) -> dict:
    return registry.entry(STAGE.name)(cfg, 0, index_url=index_url, logger=get_run_logger())


def publish_training(cfg: PipelineConfig, manifest: dict) -> None:
    """The loss curve as a keyed table artifact (`editforge-<name>-train`) for the dashboard."""
    key = layout.artifact_key(cfg.name, STAGE.name, manifest["config_hash"])
    own = contract.figures(manifest)
    summary, sample = own.get("train", {}), own.get("sample", {})
    description = (
        f"EditForge `{cfg.name}` — editing-model training: {summary.get('steps')} steps, loss "
        f"{summary.get('loss_first')} → {summary.get('loss_last')}; sample edit "
        f"{sample.get('instruction')!r} in {sample.get('png')}"
    )
    create_table_artifact(own.get("loss_curve", []), key=key, description=description)


@flow(name="editforge-train", log_prints=True)
def train(preset: str = "demo", overrides: list[str] | None = None, index: str | None = None) -> dict:
    """Train on `index` (default `{output_root}/pack/<hash>/index.json`); returns the small manifest."""
    launch.refuse_launcher()
    cfg = load_config(preset, overrides or [])
    print(f"train: {batch_line(cfg)}")
    with tags(*STAGE.resources(cfg).tags()):
        manifest = train_task(cfg, index)
    publish_training(cfg, manifest)
    if index is None:  # the run's own shards: its report gains the training loss curve
        report_html.build_and_publish(cfg, get_run_logger())
    own = contract.figures(manifest)
    summary = own.get("train", {})
    print(
        f"train: {summary.get('steps')} steps, loss {summary.get('loss_first')} -> {summary.get('loss_last')}, "
        f"{summary.get('steps_per_s')} steps/s{' (already done, skipped)' if manifest.get('skipped') else ''}"
    )
    model, png = (
        storage.url_join(cfg.output_root, p) for p in (own.get("model_dir"), own.get("sample", {}).get("png"))
    )
    print(f"model: {model}  sample edit: {png}")
    return {
        k: (own if k in ("model_dir", "train", "sample", "index") else manifest).get(k)
        for k in ("path", "model_dir", "config_hash", "skipped", "train", "sample", "index")
    }


def batch_line(cfg: PipelineConfig) -> str:
    """'total batch 1024 = 32 × 4 × 8 processes', or ConfigError naming the settings that disagree."""
    try:
        return cfg.train.batch_line(launch.check(cfg.train))
    except ValueError as err:
        raise ConfigError(f"train: {err}") from None


def join_node(preset: str, overrides: list[str], index: str | None, node_rank: int) -> None:
    """Node `node_rank` of a multi-node training: this node's workers, no flow run (node 0's run writes)."""
    from tasks.train.stage import join

    cfg = load_config(preset, overrides)
    print(f"train: node {node_rank} of {cfg.train.nodes}, {batch_line(cfg)}")
    join(cfg, node_rank, index_url=index, logger=_node_logger())
    print(f"train: node {node_rank} done")


def _node_logger():
    import logging

    logger = logging.getLogger("editforge.train.node")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def flow_run_parameters(flow_run_id: str) -> tuple[str, list[str], str | None]:
    """(preset, overrides, index) of a flow run of this flow, read from the Prefect API."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise ConfigError(f"--flow-run {flow_run_id!r} is not a flow run id (a UUID)") from None
    with get_client(sync_client=True) as client:
        params = client.read_flow_run(run_id).parameters
    return params.get("preset", "demo"), list(params.get("overrides") or []), params.get("index")


def train_command(
    preset: Preset = "demo",
    overrides: Overrides = None,
    index: Annotated[
        str | None, typer.Option(help="pack/<hash>/index.json to train on (default: the run's)")
    ] = None,
    node_rank: Annotated[
        int,
        typer.Option(
            "--node-rank",
            min=0,
            help="this machine's node (train.nodes > 1): 0 runs the flow, K >= 1 "
            "joins node 0's run with its workers only",
        ),
    ] = 0,
    flow_run: Annotated[
        str | None,
        typer.Option(
            "--flow-run",
            help="with --node-rank K: take preset, overrides and index from this flow "
            "run of editforge-train (a Kubernetes pod of an indexed Job)",
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Train the editing model on the shards of a run (the separate training flow)."""
    with reported(debug):
        launch.refuse_launcher()
        if flow_run is not None:
            if node_rank == 0:
                raise ConfigError(
                    "--flow-run is for the other nodes (--node-rank K, K >= 1); node 0 is the flow run"
                )
            preset, overrides, index = flow_run_parameters(flow_run)
    cfg = load_or_exit(preset, overrides)
    with reported(debug):
        batch_line(cfg)  # a batch the processes cannot make is refused before Prefect starts
        if node_rank:
            join_node(preset, overrides or [], index, node_rank)
        else:
            train(preset, overrides or [], index)


def main(argv: list[str] | None = None) -> int:
    return run_command(train_command, argv, "python -m flows.train", __doc__)


if __name__ == "__main__":
    sys.exit(main())
