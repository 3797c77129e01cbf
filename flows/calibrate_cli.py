"""`editforge calibrate-early`: choose ``render.early_reject_margin`` from a dry run's samples.

    editforge stage render --partitions 0-1 --set render.early_reject_at=0.5 --set render.early_reject_dry_run=true
    editforge calibrate-early --partitions 0-1 --set render.early_reject_at=0.5 --set render.early_reject_dry_run=true

Prints, per candidate margin, the share of finally failing samples early rejection would drop, the
share of passing ones it would lose and the UNet calls per passing pair relative to no early
rejection (see `tasks/render/calibrate.py`), then the recommended `--set render.early_reject_margin=...`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from flows.options import load_or_exit, parse_partitions

if TYPE_CHECKING:
    from tasks.common.config import PipelineConfig
    from tasks.render.calibrate import CalibrationSamples

# torch and the render code are imported when the command runs, not when flows.cli registers it


def parse_margins(spec: str | None) -> list[float]:
    """'0,0.05,0.1' or 'start:stop:step' (stop included) -> margins; None -> the default grid."""
    from tasks.render.calibrate import DEFAULT_MARGINS

    if not spec:
        return list(DEFAULT_MARGINS)
    if ":" in spec:
        start, stop, step = (float(x) for x in spec.split(":"))
        if step <= 0 or stop < start:
            raise ValueError(f"margins {spec!r}: need start <= stop and step > 0")
        count = math.floor((stop - start) / step + 1e-9) + 1
        return [round(start + i * step, 6) for i in range(count)]
    return [float(x) for x in spec.split(",") if x.strip()]


def _pct(x: float) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.1f}%"


def _ratio(x: float) -> str:
    return "-" if pd.isna(x) else ("inf" if math.isinf(x) else f"x{x:.3f}")


def _finite(x):
    """JSON-safe: NaN and inf become null, numpy scalars plain Python."""
    if isinstance(x, float | int) and not isinstance(x, bool):
        x = float(x) if isinstance(x, float) else int(x)
        return None if isinstance(x, float) and not math.isfinite(x) else x
    return x


def render_table(table: pd.DataFrame, best: float | None, current: float) -> Table:
    """The table as printed: shares in %, cost per passing pair as a factor of no early rejection."""
    out = Table(title="early rejection by margin (dry-run samples)",
                caption="failing caught = recall, passing lost = false drops; UNet calls and UNet calls per "
                        "passing pair relative to running every sample to the end")
    for name in ("margin", "dropped", "failing caught", "passing lost", "UNet calls", "per passing pair", ""):
        out.add_column(name, justify="right" if name else "left")
    for row in table.itertuples(index=False):
        is_best = best is not None and row.margin == best
        note = " ".join(n for n, on in (("recommended", is_best), ("current", row.margin == current)) if on)
        out.add_row(f"{row.margin:g}", f"{row.dropped}/{row.scored}", _pct(row.recall), _pct(row.false_drop),
                    _pct(row.unet_fraction), _ratio(row.cost_per_pass), note, style="bold green" if is_best else None)
    return out


def calibrate_early(
    preset: Annotated[str, typer.Option("--preset", "-p", help="preset name or YAML file")] = "demo",
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY=VALUE override (repeatable); "
                                                        "the same ones the partitions were rendered with")] = None,
    partitions: Annotated[str | None, typer.Option(help="e.g. 0,3,10-19 (default: all finished ones)")] = None,
    max_false_drop: Annotated[float, typer.Option(help="largest acceptable share of passing samples dropped")] = 0.05,
    margins: Annotated[str | None, typer.Option(help="comma list or start:stop:step (default -0.05:0.3:0.025)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the table and recommendation here")] = None,
) -> None:
    """Calibrate render.early_reject_margin on render partitions rendered with render.early_reject_dry_run=true."""
    from tasks.common.selection import thresholds
    from tasks.registry import stage_hash
    from tasks.render.calibrate import CalibrationError, calibrate, calibration_settings, recommend

    cfg = load_or_exit(preset, overrides, root="read")  # reads render partitions; writes only --json
    try:
        grid = parse_margins(margins)
    except ValueError as err:
        typer.echo(f"error: --margins: {err}", err=True)
        raise typer.Exit(2) from None
    current = cfg.render.early_reject_margin
    grid = sorted({*grid, current})
    try:
        table, data = calibrate(cfg, grid, parse_partitions(partitions))
    except CalibrationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    best = recommend(table, max_false_drop)
    _print(cfg, table, data, best, max_false_drop, current)
    if json_out is not None:
        after_steps, steps = calibration_settings(cfg)
        report = {
            "config": cfg.name,
            "output_root": cfg.output_root,
            "render_hash": stage_hash(cfg, "render"),
            "partitions": data.partitions,
            "skipped_partitions": data.skipped,
            "early_reject_at": cfg.render.early_reject_at,
            "after_steps": after_steps,
            "steps": steps,
            "metrics": list(cfg.render.early_reject_metrics),
            "thresholds": {m: thresholds(cfg.render.keep)[m] for m in cfg.render.early_reject_metrics},
            "current_margin": current,
            "max_false_drop": max_false_drop,
            "recommended_margin": best,
            "recommended_set": f"render.early_reject_margin={best:g}" if best is not None else None,
            "left_out_early_rejected": data.early_rejected,
            "left_out_unscored": data.unscored,
            "table": [{k: _finite(v) for k, v in row.items()} for row in table.to_dict(orient="records")],
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def _print(cfg: PipelineConfig, table: pd.DataFrame, data: CalibrationSamples, best: float | None, max_false_drop: float,
           current: float) -> None:
    from tasks.common.selection import thresholds

    console = Console()
    r = cfg.render
    scored, passing, failing = (int(table[c].iloc[0]) for c in ("scored", "passing", "failing"))
    limits = thresholds(r.keep)
    console.print(f"{scored} samples scored early and finally ({passing} passing, {failing} failing) from render partitions {data.partitions}; early scoring at "
                  f"{r.early_reject_at:g} of {r.steps} steps on "
                  + ", ".join(f"{m} >= {limits[m]:g} - margin" for m in r.early_reject_metrics))
    if data.skipped:
        console.print(f"partitions {data.skipped} left out: not finished under this config")
    if data.early_rejected:
        console.print(f"[yellow]warning:[/] {data.early_rejected} samples were dropped by a real early rejection "
                      "(no final metrics) and are left out, which biases the estimate; render with "
                      "--set render.early_reject_dry_run=true for an unbiased calibration")
    console.print(render_table(table, best, current))
    if best is None:
        reason = ("no scored sample passed, so passing samples lost cannot be estimated"
                  if not passing else f"no margin in the grid loses at most {100 * max_false_drop:g}% "
                  "of the passing samples; widen --margins or raise --max-false-drop")
        console.print(f"no recommendation: {reason}")
        return
    row = table[table["margin"] == best].iloc[0]
    console.print(f"recommended margin {best:g}: catches {_pct(row['recall'])} of the failing samples, loses "
                  f"{_pct(row['false_drop'])} of the passing ones, UNet calls per passing pair "
                  f"{_ratio(row['cost_per_pass'])} of no early rejection")
    if row["cost_per_pass"] >= 1:
        console.print("early rejection does not lower the cost per passing pair on these samples: "
                      "consider leaving render.early_reject_at unset")
    console.print("use it with render.early_reject_dry_run=false (the default):")
    typer.echo(f"  --set render.early_reject_margin={best:g}")
