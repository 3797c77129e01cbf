"""`editforge` command line: run the DAG or one stage, show presets, the resolved config, a report.

    editforge run --preset demo --set render.steps=20
    editforge stage render --preset paper --partitions 0-9
    editforge train --preset demo
    editforge config --preset paper
    editforge report --preset demo
    editforge calibrate-early --preset paper --set render.early_reject_at=0.4 --set render.early_reject_dry_run=true
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import json
from typing import Annotated

import typer
import yaml

from flows.calibrate_cli import calibrate_early
from tasks.common.config import STAGES, ConfigError, PipelineConfig, load_config, preset_names

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EditForge: regenerate an InstructPix2Pix dataset")

Preset = Annotated[str, typer.Option("--preset", "-p", help="preset name or YAML file")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY=VALUE override (repeatable)")]


def _load(preset: str, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(preset, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def parse_partitions(spec: str | None) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> all."""
    if not spec:
        return None
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += list(range(int(lo), int(hi or lo) + 1))
    return ids


@app.command()
def run(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Run the whole DAG; finished partitions are skipped."""
    _load(preset, overrides)
    from flows.generate import generate

    generate(preset, overrides or [])


@app.command()
def stage(name: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGES)}")], preset: Preset = "demo",
          overrides: Overrides = None,
          partitions: Annotated[str | None, typer.Option(help="e.g. 0,3,10-19 (default: all)")] = None) -> None:
    """Run one stage (optionally on some partitions only)."""
    _load(preset, overrides)
    from flows import stages

    flows = {"captions": stages.captions_flow, "text": stages.text_flow, "render": stages.render_flow,
             "filter": stages.filter_flow, "pack": stages.pack_flow}
    if name not in flows:
        typer.echo(f"error: unknown stage {name!r}; expected one of {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    if name == "captions":
        flows[name](preset, overrides or [])
    else:
        flows[name](preset, overrides or [], parse_partitions(partitions))


@app.command()
def train(preset: Preset = "demo", overrides: Overrides = None,
          index: Annotated[str | None, typer.Option(help="pack/index.json to train on (default: the run's)")] = None
          ) -> None:
    """Train the editing model on the shards of a run (the separate training flow)."""
    _load(preset, overrides)
    from flows.train import train as train_flow

    train_flow(preset, overrides or [], index)


@app.command()
def presets() -> None:
    """List the named presets."""
    for name in preset_names():
        typer.echo(name)


@app.command()
def config(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Print the resolved config, each stage's resources and config hash."""
    from tasks.common.resources import stage_resources

    cfg = _load(preset, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo("# per-partition resources (Prefect task tags: editforge-gpu where gpus = 1)")
    typer.echo(yaml.safe_dump({"resources": {s: r.as_dict() for s, r in stage_resources(cfg).items()}}, sort_keys=False))
    typer.echo(json.dumps({s: cfg.stage_hash(s) for s in STAGES}, indent=2))


@app.command()
def report(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Summarise what is on disk for this config (no Prefect needed)."""
    from flows.report import render_report
    from tasks.common import storage
    from tasks.common.contract import partition_dir, read_success

    cfg = _load(preset, overrides)
    manifests = {}
    for s in STAGES:
        found = [read_success(partition_dir(cfg.output_root, s, i)) for i in range(cfg.captions.num_partitions)]
        manifests[s] = [m for m in found if m]
    index_url = storage.url_join(cfg.output_root, "pack", "index.json")
    render_report(cfg, manifests, storage.read_json(index_url) if storage.exists(index_url) else None)


app.command("calibrate-early")(calibrate_early)

if __name__ == "__main__":
    app()
