"""`editforge` command line: run the DAG or one stage, show presets, the resolved config, a report.

    editforge run --preset demo --set render.steps=20
    editforge stage render --preset paper --partitions 0-9
    editforge train --preset demo
    editforge evaluate --preset demo --image-guidance 1.0,1.5,2.0
    editforge edit photo.jpg "make it snowy" --preset demo
    editforge config --preset paper
    editforge report --preset demo
    editforge verify --preset demo
    editforge index --preset demo
    editforge calibrate-early --preset paper --set render.early_reject_at=0.4 --set render.early_reject_dry_run=true
    editforge review --preset world                    # label pairs in a browser (docs/review.md)
    editforge calibrate-filter --preset world --target-precision 0.8
    editforge estimate --preset paper --from-preset demo --partitions 0
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import json
from typing import Annotated

import typer
import yaml

from flows.calibrate_cli import calibrate_early
from flows.calibrate_filter import calibrate_filter
from flows.estimate import estimate_command
from flows.edit import edit_command
from flows.evaluate import evaluate_command
from flows.generate import run
from flows.review import review_command
from flows.options import (
    Debug,
    Overrides,
    Partitions,
    Preset,
    Verify,
    load_or_exit,
    parse_partitions,
    reported,
    with_verify,
)
from flows.train import train_command
from tasks import registry
from tasks.common.config import preset_names

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EditForge: regenerate an InstructPix2Pix dataset")
app.command("run")(run)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("edit")(edit_command)
app.command("calibrate-early")(calibrate_early)
app.command("estimate")(estimate_command)
app.command("review")(review_command)
app.command("calibrate-filter")(calibrate_filter)

CHAIN = [s.name for s in registry.chain()]


@app.command()
def stage(name: Annotated[str, typer.Argument(help=f"one of {', '.join(CHAIN)}")], preset: Preset = "demo",
          overrides: Overrides = None, partitions: Partitions = None, verify: Verify = False,
          debug: Debug = False) -> None:
    """Run one stage (optionally on some partitions only)."""
    overrides = with_verify(overrides, verify)
    cfg = load_or_exit(preset, overrides)
    from flows.stages import FLOWS, partition_ids

    if name not in FLOWS:
        hint = " (the training flow: editforge train)" if name in registry.STAGES else ""
        typer.echo(f"error: unknown stage {name!r}{hint}; expected one of {', '.join(CHAIN)}", err=True)
        raise typer.Exit(2)
    ids = parse_partitions(partitions)
    try:
        partition_ids(cfg, registry.get(name), ids)
    except ValueError as err:
        typer.echo(f"error: --partitions {partitions}: {err}", err=True)
        raise typer.Exit(2) from None
    with reported(debug):
        FLOWS[name](preset, overrides, ids)


@app.command()
def index(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Rebuild pack/<hash>/index.json from every pack partition finished under this config (after partial runs)."""
    from tasks.pack.index import write_index

    cfg = load_or_exit(preset, overrides)
    found = registry.manifests(cfg, "pack")
    manifests = [m for m in found.values() if m]
    with reported(False):
        written = write_index(cfg, manifests)
    missing = len(found) - len(manifests)
    typer.echo(f"{registry.index_url(cfg)}: {len(written['shards'])} shards from {len(manifests)} pack "
               f"partition(s)" + (f"; {missing} not finished under this config left out" if missing else ""))


@app.command()
def verify(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Check every finished partition of this config against its manifest (sizes and sha256); exit 1 on damage."""
    from rich.console import Console
    from rich.table import Table

    from tasks.common.contract import output_problems, read_success

    cfg = load_or_exit(preset, overrides, root="read")
    table = Table(title=f"EditForge run '{cfg.name}' — {cfg.output_root}: outputs against their manifests")
    for column in ("stage", "partitions", "finished", "verified", "damaged"):
        table.add_column(column)
    damaged: list[str] = []
    for s in registry.chain():
        expected, ids = registry.stage_hash(cfg, s.name), s.partition_ids(cfg)
        finished = ok = 0
        for pid in ids:
            folder = registry.partition_url(cfg, s.name, pid, config_hash=expected)
            done = read_success(folder)
            if not done or done.get("config_hash") != expected:
                continue
            finished += 1
            problems = output_problems(folder, done, "sha256")
            ok += not problems
            damaged += [f"{s.name} part-{pid:05d}: {p}" for p in problems]
        table.add_row(s.name, str(len(ids)), str(finished), str(ok), str(finished - ok))
    Console().print(table)
    for line in damaged:
        typer.echo(f"damaged: {line}")
    if damaged:
        typer.echo("re-run the stages above (editforge run): each damaged partition is done again", err=True)
        raise typer.Exit(1)


@app.command()
def presets() -> None:
    """List the named presets."""
    for name in preset_names():
        typer.echo(name)


@app.command()
def config(preset: Preset = "demo", overrides: Overrides = None) -> None:
    """Print the resolved config, each stage's resources and config hash."""
    cfg = load_or_exit(preset, overrides, root="none")
    with reported(False):
        hashes = {s: registry.stage_hash(cfg, s) for s in CHAIN}
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo("# per-partition resources (Prefect task tags: editforge-gpu where gpus = 1)")
    resources = {s: r.as_dict() for s, r in registry.stage_resources(cfg).items()}
    typer.echo(yaml.safe_dump({"resources": resources}, sort_keys=False))
    typer.echo("# config hashes of the chain (train's also covers the shards it trains on)")
    typer.echo(json.dumps(hashes, indent=2))


@app.command()
def report(preset: Preset = "demo", overrides: Overrides = None,
           html: Annotated[bool, typer.Option("--html", help="also (re)build report/<hash>/report.html and its "
                                                             "figures from disk")] = False,
           debug: Debug = False) -> None:
    """Summarise what is on disk for this config: partitions finished under its hashes (no Prefect needed)."""
    from flows.report import current_manifests, render_report
    from tasks.common import storage

    cfg = load_or_exit(preset, overrides, root="read")
    index_url = registry.index_url(cfg)
    index = storage.read_json(index_url) if storage.exists(index_url) else None
    render_report(cfg, current_manifests(cfg), index)
    if html:
        from flows import report_html

        with reported(debug):
            built = report_html.build(cfg)
        typer.echo(f"report: {built['html']} ({len(built['images'])} figures beside it)")


if __name__ == "__main__":
    app()
