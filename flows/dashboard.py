"""What a run shows on the Prefect dashboard while it runs, at a cost per finished partition that does not
grow with the run (docs/monitoring.md: what each artifact holds, the design, the measured costs).

A finished partition writes its table row to `{stage}/{hash}/_dashboard/done/` (one listing per stage
says what is finished; a process reads each row once). One process publishes: the fan-out parent
(flows/fanout.py), else the flow run that runs the stages; a fan-out child only writes its rows, events
and live figures. Stage tables (`editforge-<name>-<stage>-<hash8>`) are led by at most ``SCREEN``
columns; a new version is stored when the rows double, the newest updated in place in between. The
run-wide status (`-status-`, `-progress-`) shows the stages, the partitions in flight, throughput and
a projected finish, and the fan-out's blocks and waiting pools. A partition's live figures ride on its
task run's progress artifact (description and metadata). Events: ``editforge.partition.completed`` /
``.failed`` / ``.low-pass-rate``, ``editforge.run.completed``. Publishing never fails a partition.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tasks import registry
from tasks.common import contract, layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PROGRESS_HOOK
from tasks.common.stage import Dashboard

log = logging.getLogger("editforge")
ETA_WINDOW = 20  # the ETA's rate: the last this many finished partitions of the stage
FIRST = ("partition", "status", "in", "out")
SCREEN = 12  # a stage table's leading columns: what fits a screen
HEADLINE_MAX = 6  # of them, the stage's headline figures
STATUS_EVERY_S = 10.0  # the in-process status is refreshed at most this often by live figures
IN_FLIGHT_SHOWN = 30  # rows of the status's in-flight table


# -- reading ------------------------------------------------------------------------------------------


def read_manifest(
    output_root: str, stage: str, config_hash: str, partition_id: int, strict: bool = False
) -> dict | None:
    """One partition's `_SUCCESS.json` if it is finished under ``config_hash`` (one request), else None;
    ``strict``: a store that fails (not a missing file) raises instead of counting as not finished."""
    url = layout.success_url(output_root, stage, config_hash, partition_id)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        return None
    except OSError as err:
        if strict:
            raise
        log.warning("dashboard: %s cannot be read (%s): counted as not finished", url, err)
        return None
    except ValueError as err:
        log.warning("dashboard: %s cannot be read (%s): counted as not finished", url, err)
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("config_hash") == config_hash else None


def finished(cfg: PipelineConfig, stage: str, config_hash: str | None = None) -> list[dict]:
    """The manifests of ``stage``'s partitions finished under this config, by partition id (one read each)."""
    expected = config_hash or registry.stage_hash(cfg, stage)
    found = (
        read_manifest(cfg.output_root, stage, expected, pid) for pid in registry.partition_ids(cfg, stage)
    )
    return [m for m in found if m]


def shown(stage: str) -> Dashboard:
    """What the dashboard shows of ``stage``: its record's :class:`tasks.common.stage.Dashboard`."""
    return registry.get(stage).dashboard


def pass_rate(stage: str, manifest: dict) -> float | None:
    """The stage's own pass-rate figure when it declares one (render: passed / samples drawn), else out / in."""
    own = shown(stage).pass_rate
    figures = contract.figures(manifest)
    if own is not None and own in figures:
        return figures[own]
    return _out_rate(manifest.get("counts", {}))


def _out_rate(counts: dict) -> float | None:
    return round(counts["out"] / counts["in"], 4) if counts.get("in") else None


# -- the stage table ---------------------------------------------------------------------------------


def flat_row(stage: str, manifest: dict, skipped: bool | None = None) -> dict[str, Any]:
    """Every figure of one partition's manifest as one flat row (`n_<count>`, `rejected_<reason>`,
    the stage's own numeric figures — those of a figure named after the stage too: finetune's summary —,
    `median_<metric>`)."""
    counts = manifest.get("counts", {})
    rejected = manifest.get("rejected", {})
    own = contract.figures(manifest)
    nested = own[stage] if isinstance(own.get(stage), dict) else {}
    figures = {
        k: v for k, v in {**nested, **own}.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    row = {
        "partition": manifest["partition_id"],
        "status": "skipped" if (skipped if skipped is not None else manifest.get("skipped")) else "done",
        "in": counts.get("in", counts.get("finetune_examples")),
        "out": counts.get("out"),
        "out_rate": _out_rate(counts) if shown(stage).pass_rate is None else None,
        **{f"n_{k}": v for k, v in counts.items()},
        **{f"rejected_{k}": v for k, v in rejected.items()},
        **figures,
        **{f"median_{k}": round(q["q50"], 4) for k, q in manifest.get("quantiles", {}).items()},
        # each rung of the judge ladder: passed / reached (render: CLIP, DINOv2, SSIM; filter: + the VLM judge)
        **{
            f"pass_rate_{k[7:-3]}": round(counts[f"ladder_{k[7:-3]}_passed"] / v, 4)
            for k, v in counts.items()
            if k.startswith("ladder_") and k.endswith("_in") and v
        },
        "rejected": ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) or "-",
        "wall_time_s": manifest.get("wall_time_s"),
    }
    return row


def leading(stage: str, present: Iterable[str]) -> list[str]:
    """The columns a stage table starts with (at most ``SCREEN``): partition, status, in, out, the stage's
    first headline figures, its speed figures and the wall time."""
    present = set(present)
    headline = [h for h in shown(stage).headline if h in present and h not in FIRST][:HEADLINE_MAX]
    tail = [c for c in (*shown(stage).speed, "wall_time_s") if c in present and c not in headline]
    return [*FIRST, *headline, *tail][:SCREEN]


def order_rows(stage: str, rows: list[dict]) -> list[dict]:
    """Every row with the same columns: the leading ones, then every other figure, the rejections last."""
    if not rows:
        return []
    present = {k for r in rows for k in r}
    order = leading(stage, present)
    order += [k for k in sorted(present) if k not in order and k != "rejected"] + ["rejected"]
    return [{k: r.get(k) for k in order} for r in sorted(rows, key=lambda r: r["partition"])]


def table(stage: str, manifests: Iterable[dict], skipped: dict[int, bool] | None = None) -> list[dict]:
    """The stage table of ``manifests``: one row per partition, every row with the same columns."""
    return order_rows(stage, [flat_row(stage, m, (skipped or {}).get(m["partition_id"])) for m in manifests])


def row_record(stage: str, manifest: dict) -> dict:
    """What a finished partition writes to `_dashboard/done/`: its row (status `done`: whether a run skipped
    it is that run's business), and when it finished. The same manifest gives the same bytes."""
    return {
        "stage": stage,
        "partition": manifest["partition_id"],
        "config_hash": manifest.get("config_hash"),
        "finished_at": manifest.get("finished_at"),
        "row": flat_row(stage, manifest, skipped=False),
    }


def write_row(cfg: PipelineConfig, stage: str, manifest: dict) -> None:
    storage.write_json_atomic(
        layout.row_url(cfg.output_root, stage, manifest["config_hash"], manifest["partition_id"]),
        row_record(stage, manifest),
    )


def finished_ids(output_root: str, stage: str, config_hash: str) -> dict[int, dict]:
    """The partitions of a stage version that have a row (one listing): partition id -> size, mtime."""
    found = {}
    for name, info in storage.listing(layout.rows_dir(output_root, stage, config_hash)).items():
        if name.startswith("part-") and name.endswith(".json") and storage.TEMP_MARK not in name:
            try:
                found[int(name[5:-5])] = info
            except ValueError:
                continue
    return found


# -- rates and ETAs ------------------------------------------------------------------------------------


def _window(manifests: Iterable[dict]) -> list[dict]:
    return sorted((m for m in manifests if m.get("finished_at")), key=lambda m: m["finished_at"])[
        -ETA_WINDOW:
    ]


def _span(timed: list[dict], now: float) -> float:
    start = min(m["finished_at"] - (m.get("wall_time_s") or 0.0) for m in timed)
    return max(now, timed[-1]["finished_at"]) - start


def eta_s(manifests: list[dict], remaining: int, now: float | None = None) -> float | None:
    """Seconds left at the rate of the last ``ETA_WINDOW`` finished partitions: k partitions over the span
    from the first one's start to now (so it counts parallel workers and slows when they stop)."""
    timed = _window(manifests)
    if not remaining:
        return 0.0
    if not timed:
        return None
    span = _span(timed, now if now is not None else time.time())
    return round(remaining * span / len(timed), 1) if span > 0 else None


def rate_per_s(manifests: list[dict], figure: str, now: float | None = None) -> float | None:
    """``figure`` summed over the last ``ETA_WINDOW`` finished partitions, per second of their span."""
    timed = [m for m in _window(manifests) if m.get(figure) is not None]
    if not timed:
        return None
    span = _span(timed, now if now is not None else time.time())
    return sum(m[figure] for m in timed) / span if span > 0 else None


def kept_pairs(stage: str, manifests: list[dict]) -> int | None:
    """Pairs kept so far by a stage that keeps pairs (its record says so: render, filter, pack), else None."""
    if not shown(stage).keeps_pairs:
        return None
    return sum(m.get("counts", {}).get("out", 0) for m in manifests)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(t))


# -- a partition's live figures ------------------------------------------------------------------------


def describe(stage: str, partition_id: int, figures: dict | None) -> str:
    """One line of running figures for the partition's progress artifact: the stage's own description
    (its record's ``dashboard.live``), else the checkpoint's done / expected, ok and rate."""
    head = f"{stage} {layout.partition_name(partition_id)}"
    if not figures:
        return head
    live = shown(stage).live
    if live is not None:
        parts = live(figures)
    else:
        parts = [
            f"{figures.get('done')}/{figures.get('expected')} done",
            f"{figures['ok']} ok" if "ok" in figures else "",
            f"{figures['per_s']} /s" if figures.get("per_s") else "",
        ]
    return f"{head}: " + ", ".join(p for p in parts if p)


LIVE_KEY = "editforge"  # the progress artifact's metadata_ entry with the running figures as JSON


def _patch_artifact(artifact_id, body: dict) -> None:
    """Update an artifact in place, without the `prefect.artifact.updated` event Prefect's client sends
    with the whole data (stored in the events table: a table updated N times would be stored N times)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.request("PATCH", "/artifacts/{id}", json=body, path_params={"id": artifact_id})


def _create_progress(description: str) -> Any:
    """A progress artifact (0%) on the current task and flow run, as `create_progress_artifact` makes, without
    the `prefect.artifact.created` event Prefect's client sends with it (~10 KB in its database per
    partition: its flow, deployment, work queue, work pool and tags each a row and index entries)."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.context import get_task_and_flow_run_ids

    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    body = {"type": "progress", "data": 0.0, "description": description}
    body |= {k: str(v) for k, v in (("task_run_id", task_run_id), ("flow_run_id", flow_run_id)) if v}
    with get_client(sync_client=True) as client:
        return client.request("POST", "/artifacts/", json=body).json()["id"]


def live_record(stage: str, partition_id: int, fraction: float, figures: dict | None, started: float) -> dict:
    return {
        "stage": stage,
        "partition": partition_id,
        "fraction": round(fraction, 4),
        "figures": figures or {},
        "started_at": round(started, 3),
        "updated_at": round(time.time(), 3),
    }


@contextmanager
def live_partition(
    stage: str, partition_id: int, min_interval_s: float = 2.0, cfg: PipelineConfig | None = None
) -> Iterator[None]:
    """A progress artifact on the task run, updated in place (at most every `min_interval_s`) as the
    partition checkpoints: its description the running figures, its metadata the same as JSON. With
    ``cfg`` in a publishing process, the run-wide status shows them too."""
    artifact_id = _create_progress(describe(stage, partition_id, None))
    t0, started = time.monotonic(), time.time()
    last: dict[str, Any] = {"t": 0.0, "pct": 0.0}
    board = _board(cfg) if cfg is not None and publishes(cfg) else None

    def hook(fraction: float, figures: dict | None = None) -> None:
        pct = round(100 * fraction, 1)
        now = time.monotonic()
        if pct > last["pct"] and (pct >= 100 or now - last["t"] >= min_interval_s):
            if figures and "done" in figures and now > t0:
                figures = {**figures, "per_s": round(figures["done"] / (now - t0), 2)}
            record = live_record(stage, partition_id, fraction, figures, started)
            try:
                _patch_artifact(
                    artifact_id,
                    {
                        "data": pct,
                        "description": describe(stage, partition_id, figures),
                        "metadata_": {LIVE_KEY: json.dumps(record)},
                    },
                )
                if board is not None:
                    with board.lock:
                        board.live[(stage, partition_id)] = record
                        board.publish_status(min_interval_s=STATUS_EVERY_S)
            except Exception as err:  # the dashboard never stops the work
                log.warning(
                    "dashboard: the progress of %s part-%05d was not updated (%s)", stage, partition_id, err
                )
            last.update(t=now, pct=pct, figures=figures)

    token = PROGRESS_HOOK.set(hook)
    try:
        yield
    except BaseException as err:  # this attempt's bar says so (a retry shows its own)
        try:
            _patch_artifact(
                artifact_id,
                {"description": f"{describe(stage, partition_id, None)}: failed ({type(err).__name__})"},
            )
        except Exception as patch_err:
            log.warning(
                "dashboard: the failure of %s part-%05d was not shown (%s)", stage, partition_id, patch_err
            )
        raise
    finally:
        PROGRESS_HOOK.reset(token)
        if board is not None:
            with board.lock:
                board.live.pop((stage, partition_id), None)
    if last["pct"] < 100:  # finished (or skipped as already done): no longer in flight
        try:
            _patch_artifact(
                artifact_id,
                {
                    "data": 100.0,
                    "metadata_": {
                        LIVE_KEY: json.dumps(
                            live_record(stage, partition_id, 1.0, last.get("figures"), started)
                        )
                    },
                },
            )
        except Exception as err:
            log.warning(
                "dashboard: the progress of %s part-%05d was not updated (%s)", stage, partition_id, err
            )


# -- the board: what one process knows, and what it publishes ------------------------------------------


@dataclass
class _Published:
    id: Any
    rows: int  # at the version's creation
    digest: str
    at: float


class Board:
    """What one process knows of a run version — every stage's finished rows (each read once: from a
    manifest it holds, or a row file a listing revealed), the partitions in flight — and the artifacts it
    publishes (a new version at 1, 2, 4, ... rows, else in place)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.hashes = {s.name: registry.stage_hash(cfg, s.name) for s in registry.chain()}
        self.rows: dict[str, dict[int, dict]] = {s: {} for s in self.hashes}  # stage -> pid -> row record
        self.seen: dict[str, tuple] = {}  # row URL -> (size, mtime) it was read at
        self.skipped: dict[str, set[int]] = {
            s: set() for s in self.hashes
        }  # finished before this process ran
        self.totals: dict[str, int] = {}
        self.live: dict[tuple[str, int], dict] = {}  # (stage, pid) -> live_record
        self.published: dict[str, _Published] = {}
        self.started = time.time()
        self.extra: dict[str, Any] = {}  # the fan-out's blocks and waiting pools (flows/fanout.py)
        self.lock = threading.RLock()  # partitions finish in threads: one publishes at a time (one version)

    # knowing
    def add(self, stage: str, manifest: dict, skipped: bool = False) -> None:
        """A finished partition whose manifest this process holds (no request)."""
        pid = manifest["partition_id"]
        self.rows[stage][pid] = row_record(stage, manifest)
        (self.skipped[stage].add if skipped else self.skipped[stage].discard)(pid)

    def sync(self, stage: str) -> int:
        """One listing of the stage's rows; read the rows not read yet (or rewritten since). Returns how many
        partitions became known."""
        new = 0
        for pid, info in finished_ids(self.cfg.output_root, stage, self.hashes[stage]).items():
            url = layout.row_url(self.cfg.output_root, stage, self.hashes[stage], pid)
            stamp = (info["size"], info["mtime"])
            if pid in self.rows[stage] and self.seen.get(url, stamp) == stamp:
                continue
            try:
                record = storage.read_json(url)
            except (OSError, ValueError):
                continue  # rewritten as we read, or damaged: the manifest is the truth
            if isinstance(record, dict) and record.get("config_hash") == self.hashes[stage]:
                new += pid not in self.rows[stage]
                self.rows[stage][pid] = record
                self.seen[url] = stamp
        return new

    def total(self, stage: str, refresh: bool = False) -> int:
        if refresh or stage not in self.totals:
            self.totals[stage] = len(registry.partition_ids(self.cfg, stage))
        return self.totals[stage]

    # the figures
    def _timed(self, stage: str) -> list[dict]:
        calls = shown(stage).throughput
        return [
            {
                "finished_at": r.get("finished_at"),
                "wall_time_s": r["row"].get("wall_time_s"),
                "out": r["row"].get("out"),
                "calls": r["row"].get(calls.calls) if calls else None,
            }
            for r in self.rows[stage].values()
        ]

    def stage_rows(self, now: float | None = None) -> list[dict]:
        """Per chain stage: partitions done / total, running, kept pairs, pass rate, ETA (seconds)."""
        now = now if now is not None else time.time()
        out = []
        for stage in self.hashes:
            rows = [r["row"] for r in self.rows[stage].values()]
            total = max(self.total(stage), len(rows))
            rate = None
            if shown(stage).run_pass_rate is not None:
                passed, drawn = (sum(r.get(c) or 0 for r in rows) for c in shown(stage).run_pass_rate)
                rate = passed / drawn if drawn else None
            out.append(
                {
                    "stage": stage,
                    "done": len(rows),
                    "total": total,
                    "percent": round(100 * len(rows) / total, 1) if total else 100.0,
                    "running": max(
                        self.extra.get("running", {}).get(stage, 0),
                        sum(1 for s, _ in self.live if s == stage),
                    ),
                    "kept_pairs": sum(r.get("out") or 0 for r in rows) if shown(stage).keeps_pairs else None,
                    "pass_rate": rate,
                    "eta_s": eta_s(self._timed(stage), max(0, total - len(rows)), now),
                }
            )
        return out

    def throughput_stage(self) -> str | None:
        """The chain stage whose record declares the status's throughput (render)."""
        return next((s for s in self.hashes if shown(s).throughput is not None), None)

    def throughput(self, stages: list[dict], now: float | None = None) -> dict:
        """Kept pairs per hour and work per second (:meth:`throughput_stage`'s last finished partitions,
        plus its running figure in flight), and the projected finish: now + the slowest unfinished
        stage's ETA."""
        now = now if now is not None else time.time()
        stage = self.throughput_stage()
        timed = self._timed(stage) if stage else []
        pairs, calls = rate_per_s(timed, "out", now), rate_per_s(timed, "calls", now)
        figure = shown(stage).throughput.live if stage else None
        live = sum((r["figures"].get(figure) or 0) for (s, _), r in self.live.items() if s == stage)
        etas = [s["eta_s"] for s in stages if s["done"] < s["total"] and s["eta_s"] is not None]
        return {
            "pairs_per_h": None if pairs is None else round(pairs * 3600, 1),
            "calls_per_s": None if calls is None else round(calls, 2),
            "live_per_s": round(live, 2) if live else None,
            "finish": now + max(etas)
            if etas
            else (now if all(s["done"] >= s["total"] for s in stages) else None),
        }

    def status_markdown(self, now: float | None = None) -> str:
        now = now if now is not None else time.time()
        stages = self.stage_rows(now)
        speed = self.throughput(stages, now)
        lines = [
            f"# EditForge `{self.cfg.name}`: status",
            "",
            f"Updated {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(now))} from `{self.cfg.output_root}`"
            + (f" · {self.extra['mode']}" if self.extra.get("mode") else ""),
            "",
        ]
        if self.extra.get("blocks"):
            b = self.extra["blocks"]
            lines += ["**Blocks**: " + ", ".join(f"{v} {k}" for k, v in b.items()), ""]
        pairs = "-" if speed["pairs_per_h"] is None else f"{speed['pairs_per_h']:,.0f}"
        calls = "-" if speed["calls_per_s"] is None else f"{speed['calls_per_s']:,.1f}"
        finish = (
            "-"
            if speed["finish"] is None
            else f"{_clock(speed['finish'])} (in {_duration(speed['finish'] - now)})"
        )
        through = self.throughput_stage()
        labels = shown(through).throughput if through else None
        lines += [
            f"**Throughput**: {pairs} kept pairs/h"
            + (f" · {calls} {labels.calls_label}" if labels else "")
            + (f" · {speed['live_per_s']} {labels.live_label}" if labels and speed["live_per_s"] else "")
            + f" · projected finish {finish}",
            "",
        ]
        for pool in self.extra.get("waiting", []):
            lines += [f"> **Waiting for a worker** on work pool `{pool['pool']}`: {pool['message']}", ""]
        lines += [
            "| stage | partitions done | running | kept pairs | pass rate | ETA |",
            "|---|---|---|---|---|---|",
        ]
        for r in stages:
            kept = "-" if r["kept_pairs"] is None else f"{r['kept_pairs']:,}"
            rate = "-" if r["pass_rate"] is None else f"{r['pass_rate']:.1%}"
            lines.append(
                f"| {r['stage']} | {r['done']} of {r['total']} ({r['percent']:.0f}%) | {r['running']} | {kept} | "
                f"{rate} | {_duration(r['eta_s'])} |"
            )
        if self.live:
            order = list(self.hashes)
            live = sorted(
                self.live.values(),
                key=lambda r: (order.index(r["stage"]) if r["stage"] in order else 99, r["partition"]),
            )
            lines += [
                "",
                "## In flight",
                "",
                "| partition | done | samples | pass rate | kept so far | per s | updated |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in live[:IN_FLIGHT_SHOWN]:
                f = r["figures"]
                done, rate_of, kept, per_s = shown(r["stage"]).in_flight
                rate = f.get(rate_of)
                lines.append(
                    f"| {r['stage']} {layout.partition_name(r['partition'])} | {100 * r['fraction']:.0f}% | "
                    f"{f.get(done, '-')} | {'-' if rate is None else f'{rate:.1%}'} | "
                    f"{f.get(kept, '-')} | {f.get(per_s, '-')} | "
                    f"{_duration(max(0.0, now - r['updated_at']))} ago |"
                )
            if len(live) > IN_FLIGHT_SHOWN:
                lines.append(f"| … {len(live) - IN_FLIGHT_SHOWN} more | | | | | | |")
        lines += [
            "",
            f"ETA: the rate of each stage's last {ETA_WINDOW} finished partitions; pass rate: "
            f"{self.pass_rate_note()}. Every partition's figures: the stage tables and each partition's "
            "`_SUCCESS.json`.",
        ]
        return "\n".join(lines)

    def pass_rate_note(self) -> str:
        """What the status's pass rate is per stage, from the records ("render's passed / samples drawn;
        text, judge, filter: out / in")."""
        rated = [s for s in self.hashes if shown(s).run_pass_rate is not None]
        default = Dashboard().pass_rate_label
        own = [f"{s}'s {shown(s).pass_rate_label}" for s in rated if shown(s).pass_rate_label != default]
        plain = [s for s in rated if shown(s).pass_rate_label == default]
        return "; ".join(own + ([f"{', '.join(plain)}: {default}"] if plain else [])) or "-"

    # publishing
    def _publish(
        self,
        key: str,
        kind: str,
        data: Any,
        description: str,
        rows: int | None = None,
        min_interval_s: float = 0.0,
    ) -> None:
        """A new version of ``key`` when this process has none yet or (tables) the rows doubled since the
        newest was created; else that version updated in place; nothing when nothing changed."""
        with self.lock:
            self._publish_locked(key, kind, data, description, rows, min_interval_s)

    def _publish_locked(
        self, key: str, kind: str, data: Any, description: str, rows: int | None, min_interval_s: float
    ) -> None:
        from prefect.artifacts import (
            create_markdown_artifact,
            create_progress_artifact,
            create_table_artifact,
        )

        blob = json.dumps(data, sort_keys=True, default=str) + description
        digest = hashlib.sha1(blob.encode()).hexdigest()
        held = self.published.get(key)
        now = time.monotonic()
        if held is not None and (held.digest == digest or now - held.at < min_interval_s):
            return
        if held is None or (rows is not None and rows >= 2 * max(held.rows, 1)):
            make = {
                "table": create_table_artifact,
                "markdown": create_markdown_artifact,
                "progress": create_progress_artifact,
            }[kind]
            artifact_id = make(data, key=key, description=description)
            self.published[key] = _Published(artifact_id, rows or 0, digest, now)
            return
        body = {"data": json.dumps(_sanitize(data)) if kind == "table" else data, "description": description}
        _patch_artifact(held.id, body)
        held.digest, held.at = digest, now

    def publish_stage(self, stage: str) -> None:
        from tasks.common.stage import Resources

        rows = order_rows(
            stage,
            [
                {**r["row"], "status": "skipped" if pid in self.skipped[stage] else "done"}
                for pid, r in self.rows[stage].items()
            ],
        )
        if not rows:
            return
        res: Resources = registry.get(stage).resources(self.cfg)
        lead = ", ".join(leading(stage, rows[0]))
        self._publish(
            layout.artifact_key(self.cfg.name, stage, self.hashes[stage]),
            "table",
            rows,
            f"EditForge `{self.cfg.name}` — {stage}: {len(rows)} of {self.total(stage)} partitions finished "
            f"(per partition: {res.cpus} CPU, {res.gpus} GPU, batch {res.batch}). Columns first: {lead}; "
            "every other figure after them; each partition's full manifest: "
            f"`{layout.stage_dir(self.cfg.output_root, stage, self.hashes[stage])}/part-*/_SUCCESS.json`.",
            rows=len(rows),
        )

    def publish_status(self, min_interval_s: float = 0.0) -> list[dict]:
        """The run-wide status (markdown) and progress bar, in place."""
        stages = self.stage_rows()
        done, total = sum(r["done"] for r in stages), sum(r["total"] for r in stages)
        pack = self.hashes.get("pack") or registry.stage_hash(self.cfg, "pack")
        summary = "; ".join(f"{r['stage']} {r['done']}/{r['total']}" for r in stages)
        self._publish(
            layout.artifact_key(self.cfg.name, "progress", pack),
            "progress",
            round(100 * done / total, 1) if total else 100.0,
            f"EditForge `{self.cfg.name}`: {summary}",
            min_interval_s=min_interval_s,
        )
        self._publish(
            layout.artifact_key(self.cfg.name, "status", pack),
            "markdown",
            self.status_markdown(),
            f"EditForge `{self.cfg.name}` status: {summary}",
            min_interval_s=min_interval_s,
        )
        return stages


def _sanitize(item: Any) -> Any:
    if isinstance(item, list):
        return [_sanitize(i) for i in item]
    if isinstance(item, dict):
        return {k: _sanitize(v) for k, v in item.items()}
    return None if isinstance(item, float) and math.isnan(item) else item


_BOARDS: dict[str, Board] = {}
_BOARDS_LOCK = threading.Lock()


def _board(cfg: PipelineConfig) -> Board:
    """This process's board for the run version of ``cfg`` (kept across the stage flows of one process)."""
    key = cfg.model_dump_json()  # (hashing the stages again would read their extra inputs each time)
    with _BOARDS_LOCK:  # partitions finishing at once in threads share one board
        if key not in _BOARDS:
            _BOARDS[key] = Board(cfg)
        return _BOARDS[key]


def publishes(cfg: PipelineConfig) -> bool:
    """Whether a stage flow publishes the tables itself: not as a fan-out child (the parent does)."""
    return cfg.run.mode != "fan-out"


# -- events ------------------------------------------------------------------------------------------


def _resource(cfg: PipelineConfig, stage: str, partition_id: int | None = None) -> dict[str, str]:
    rid = f"editforge.{cfg.name}.{stage}" + (
        "" if partition_id is None else f".{layout.partition_name(partition_id)}"
    )
    labels = {
        "prefect.resource.id": rid,
        "prefect.resource.name": rid.removeprefix("editforge."),
        "editforge.run": cfg.name,
        "editforge.stage": stage,
    }
    if partition_id is not None:
        labels["editforge.partition"] = str(partition_id)
    return labels


def _emit(event: str, resource: dict[str, str], payload: dict) -> None:
    """Send an event related to the flow run it comes from, and nothing else: Prefect would attach the
    task run, flow, deployment, work queue, work pool and every tag too, each a row and index entries in
    its database (about 14 KB an event instead of 3; the resource names the partition)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.events import emit_event

    flow, task = FlowRunContext.get(), TaskRunContext.get()
    flow_run_id = (
        flow.flow_run.id if flow and flow.flow_run else (task.task_run.flow_run_id if task else None)
    )
    related = (
        [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
        if flow_run_id
        else []
    )

    def send() -> None:  # without the run contexts, Prefect adds no related resources of its own
        FlowRunContext.__var__.set(None)
        TaskRunContext.__var__.set(None)
        emit_event(event, resource=resource, payload=payload, related=related)

    try:
        contextvars.copy_context().run(send)
    except Exception as err:  # the dashboard never stops the work
        log.warning("dashboard: event %s not sent (%s)", event, err)


def partition_completed(cfg: PipelineConfig, stage: str, manifest: dict) -> None:
    """A finished (or skipped as done) partition: its row on storage, its events (not for a skipped one),
    and, in a publishing process, the stage table and the status."""
    pid = manifest["partition_id"]
    try:
        write_row(cfg, stage, manifest)
    except Exception as err:
        log.warning("dashboard: the row of %s part-%05d was not written (%s)", stage, pid, err)
    if not manifest.get("skipped"):
        rate = pass_rate(stage, manifest)
        payload = {
            "stage": stage,
            "partition": pid,
            "config_hash": manifest.get("config_hash"),
            "counts": manifest.get("counts", {}),
            "rejected": manifest.get("rejected", {}),
            "pass_rate": rate,
            "wall_time_s": manifest.get("wall_time_s"),
            "path": manifest.get("path"),
        }
        _emit("editforge.partition.completed", _resource(cfg, stage, pid), payload)
        floor = cfg.run.alert_min_pass_rate  # on a stage's own pass-rate figure (render's)
        if shown(stage).pass_rate is not None and floor is not None and rate is not None and rate < floor:
            _emit(
                "editforge.partition.low-pass-rate",
                _resource(cfg, stage, pid),
                {**payload, "threshold": floor},
            )
    if publishes(cfg):
        try:
            _board(cfg).add(stage, manifest, skipped=bool(manifest.get("skipped")))
        except Exception as err:
            log.warning("dashboard: %s part-%05d not added to the tables (%s)", stage, pid, err)
        if not manifest.get("skipped"):
            refresh(cfg, stage)


def partition_failed(
    cfg: PipelineConfig, stage: str, partition_id: int, err: BaseException, wall_time_s: float
) -> None:
    message = str(err).splitlines()[0][:500] if str(err) else ""
    _emit(
        "editforge.partition.failed",
        _resource(cfg, stage, partition_id),
        {
            "stage": stage,
            "partition": partition_id,
            "error": type(err).__name__,
            "message": message,
            "wall_time_s": round(wall_time_s, 3),
            "config_hash": registry.stage_hash(cfg, stage),
        },
    )


def run_completed(cfg: PipelineConfig, stages: dict[str, dict]) -> None:
    _emit(
        "editforge.run.completed",
        _resource(cfg, "run"),
        {
            "name": cfg.name,
            "output_root": cfg.output_root,
            "pack_hash": registry.stage_hash(cfg, "pack"),
            "stages": stages,
        },
    )


def refresh(cfg: PipelineConfig, stage: str, this_run: list[dict] | None = None) -> None:
    """In a publishing process: learn the stage's rows other processes wrote (one listing), republish its
    table and the status; ``this_run``: a stage flow's manifests at its end (the totals are re-read then).
    Errors logged, never raised; a fan-out child does nothing (its parent publishes)."""
    if not publishes(cfg):
        return
    try:
        board = _board(cfg)
        with board.lock:
            _refresh(board, stage, this_run)
    except Exception as err:
        log.warning("dashboard: %s tables not published (%s)", stage, err)


def _refresh(board: Board, stage: str, this_run: list[dict] | None) -> None:
    for m in this_run or []:
        board.add(stage, m, skipped=bool(m.get("skipped")))
    if this_run is not None:  # a stage flow's end; the captions stage may have added partitions
        for name in board.hashes if stage == "captions" else (stage,):
            board.total(name, refresh=True)
    for name in board.hashes:  # every other stage once (a resumed run's earlier work), this one each time
        if name == stage or name not in board.totals:
            board.sync(name)
            board.total(name)
    board.publish_stage(stage)
    board.publish_status()


def read_events(client, run_name: str, prefix: str = "editforge.") -> list[dict]:
    """EditForge's events of run ``run_name`` on the server of ``client`` (a sync Prefect client), oldest
    first, every page (the API's filter, for scripts and tests; the UI's Event Feed shows the same)."""
    body = {
        "filter": {"event": {"prefix": [prefix]}, "resource": {"id_prefix": [f"editforge.{run_name}."]}},
        "limit": 50,
    }
    page = client.request("POST", "/events/filter", json=body).json()
    events = list(page["events"])
    while page.get("next_page"):
        page = client._client.get(page["next_page"]).json()
        events += page["events"]
    return sorted(events, key=lambda e: e["occurred"])
