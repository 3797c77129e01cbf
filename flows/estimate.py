"""`editforge estimate`: the command and its table; the cost model is :mod:`tasks.estimate.model`.

editforge estimate --preset paper --from-preset demo --from-set output_root=/tmp/pilot --partitions 0
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from flows.options import Debug, load_or_exit, parse_partitions, reported
from tasks.common import storage
from tasks.estimate.model import CHARS_PER_TOKEN, default_json_url, estimate


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{int(x):,}" if isinstance(x, int | float) else str(x)


def _ci(x: list[float] | None) -> str:
    """An interval as printed; none, or one of zero width (the rule fixes the figure), as '-'."""
    return "-" if not x or x[0] == x[1] else f"{_fmt(x[0])} – {_fmt(x[1])}"


def render_estimate(est: dict, console: Any = None) -> None:
    """The estimate as a table (stage, figure, predicted, 95% interval, per unit / basis)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s, t = est["stages"], est["totals"]
    cap, text, ren, fil, pack = (s[k] for k in ("captions", "text", "render", "filter", "pack"))
    pilot = est["pilot"]
    table = Table(
        title=f"estimate for '{est['target']['name']}' ({est['target']['output_root']}) from pilot "
        f"'{pilot['name']}' ({pilot['output_root']}, render partitions "
        f"{pilot['partitions'].get('render')})"
    )
    for col in ("stage", "figure", "predicted", "95% interval", "basis"):
        table.add_column(col, justify="right" if col in ("predicted", "95% interval") else "left")
    topped = (
        f"incl. {_fmt(text['captions_topped_up'])} topped up for the triplet target"
        if text["captions_topped_up"]
        else ""
    )
    table.add_row("captions", "captions sampled", _fmt(cap["items"]), "-", topped)
    table.add_row(
        "", "CPU-hours", _fmt(cap["hours"]), "-", f"{_fmt(cap['wall_seconds_per_item'])} s per caption"
    )
    table.add_row(
        "text", "acceptance", _fmt(text["acceptance"]), _ci(text["acceptance_ci95"]), text["acceptance_rule"]
    )
    table.add_row(
        "",
        "triplets",
        _fmt(text["triplets"]),
        _ci(text["triplets_ci95"]),
        f"target {text['target_triplets']:,}" if text["target_triplets"] else "captions x acceptance",
    )
    table.add_row(
        "", "LM tries", _fmt(text["generations"]), "-", f"{_fmt(text['tries_per_caption'])} per caption"
    )
    table.add_row(
        "",
        "tokens in / out",
        f"{_fmt(text.get('input_tokens'))} / {_fmt(text.get('output_tokens'))}",
        "-",
        f"chars/{CHARS_PER_TOKEN}" if text.get("token_method") else "no triplets table",
    )
    if text.get("finetune_training_tokens") is not None:
        table.add_row(
            "",
            "fine-tune training tokens",
            _fmt(text["finetune_training_tokens"]),
            "-",
            f"{text['finetune_examples']} examples x {text['finetune_epochs']} epochs",
        )
    if text["backend"] == "local":
        table.add_row(
            "",
            f"{text['device'].upper()}-hours",
            _fmt(text["hours"]),
            "-",
            f"{_fmt(text.get('seconds_per_try'))} s per try (pilot)",
        )
    table.add_row(
        "render",
        "samples",
        _fmt(ren["samples"]),
        _ci(ren.get("samples_ci95")),
        f"{_fmt(ren['samples_per_triplet'])} per triplet",
    )
    table.add_row(
        "",
        "UNet calls",
        _fmt(ren["unet_calls"]),
        _ci(ren.get("unet_calls_ci95")),
        f"{_fmt(ren['unet_calls_per_triplet'])} per triplet (reference loop: {_fmt(ren['unet_calls_reference'])})",
    )
    table.add_row(
        "",
        "kept pairs",
        _fmt(ren["kept_pairs"]),
        _ci(ren.get("kept_pairs_ci95")),
        f"{_fmt(ren['kept_pairs_per_triplet'])} per triplet",
    )
    table.add_row(
        "",
        "triplets with a kept pair",
        _fmt(ren["triplets_with_kept_pair"]),
        _ci(ren.get("triplets_with_kept_pair_ci95")),
        f"{ren['triplets_with_kept_pair_per_triplet']:.0%} of triplets",
    )
    table.add_row(
        "",
        f"{ren['device'].upper()}-hours",
        _fmt(ren["hours"]),
        _ci(ren.get("hours_ci95")),
        f"{_fmt(ren['unet_calls_per_s'])} UNet calls/s ({ren['unet_calls_per_s_source']}); "
        f"wall: {_fmt(ren['hours_wall'])} h",
    )
    if ren.get("elapsed_hours") is not None:
        table.add_row(
            "",
            f"elapsed on {t['gpus']} worker(s)",
            _fmt(ren["elapsed_hours"]),
            "-",
            f"{ren['partitions']} partitions of {_fmt(ren['hours_per_partition'])} h",
        )
    table.add_row("filter", "kept pairs", _fmt(fil["kept_pairs"]), "-", f"CPU-hours {_fmt(fil['hours'])}")
    table.add_row("pack", "samples", _fmt(pack["items"]), "-", f"CPU-hours {_fmt(pack['hours'])}")
    if "judge" in s:
        j = s["judge"]
        table.add_row(
            "judge",
            "VLM-judged samples",
            _fmt(j.get("judged_per_kept_pair") and j["judged_per_kept_pair"] * (fil["kept_pairs"] or 0)),
            "-",
            f"{_fmt(j.get('tokens_per_judged'))} tokens and {_fmt(j.get('cost_per_judged_usd'))} USD per "
            f"judged sample (pilot); {_fmt(j.get('cost_per_kept_pair_usd'))} USD per kept pair",
        )
    usd = t["usd_by_stage"]
    table.add_row(
        "total", "GPU-hours / CPU-hours", f"{_fmt(t['gpu_hours'])} / {_fmt(t['cpu_hours'])}", "-", ""
    )
    table.add_row(
        "",
        "USD",
        _fmt(t["usd"]),
        "-",
        ", ".join(f"{k} {_fmt(v)}" for k, v in usd.items())
        + (f" (unknown: {', '.join(t['usd_incomplete'])})" if t["usd_incomplete"] else ""),
    )
    console.print(table)
    console.print(f"render: {ren['rule']}")
    for w in est["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", markup=True, highlight=False)


def estimate_command(
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="the TARGET: preset name or YAML file")
    ] = "demo",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="KEY=VALUE override of the target (repeatable)")
    ] = None,
    from_preset: Annotated[
        str | None,
        typer.Option(
            "--from-preset",
            help="the PILOT run's preset (default: the "
            "target's; with neither --from-* the pilot is the target)",
        ),
    ] = None,
    from_overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--from-set",
            help="KEY=VALUE override of the pilot, e.g. "
            "output_root=/runs/pilot (repeatable; the target's --set "
            "do not apply to the pilot)",
        ),
    ] = None,
    partitions: Annotated[
        str | None,
        typer.Option(help="pilot partitions to measure, e.g. 0,3,10-19 (default: every finished one)"),
    ] = None,
    unet_calls_per_s: Annotated[
        float | None,
        typer.Option(
            "--unet-calls-per-s",
            help="UNet calls per second per GPU on the target's hardware (default: the pilot's)",
        ),
    ] = None,
    gpus: Annotated[int, typer.Option(min=1, help="render workers in parallel, for the elapsed time")] = 1,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", help="where to write the JSON (default: <target output_root>/estimate-<name>.json)"
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Estimate a full run's counts, GPU-hours and cost from a pilot run's finished partitions."""
    target = load_or_exit(preset, overrides)
    if from_preset is None and from_overrides is None:
        pilot, pilot_overrides = target, list(overrides or [])
    else:
        pilot, pilot_overrides = (
            load_or_exit(from_preset or preset, from_overrides, root="none"),
            list(from_overrides or []),
        )
    ids = parse_partitions(partitions)
    if unet_calls_per_s is not None and not unet_calls_per_s > 0:
        raise typer.BadParameter(f"{unet_calls_per_s}: a rate above 0", param_hint="--unet-calls-per-s")
    with reported(debug):
        est = estimate(target, pilot, partitions=ids, unet_calls_per_s=unet_calls_per_s, gpus=gpus)
        est["target"] |= {"preset": preset, "overrides": list(overrides or [])}
        est["pilot"] |= {"preset": from_preset or preset, "overrides": pilot_overrides}
        url = json_out or default_json_url(target)
        render_estimate(est)
        storage.write_bytes_atomic(url, (json.dumps(est, indent=2) + "\n").encode())
    typer.echo(f"wrote {url}")
