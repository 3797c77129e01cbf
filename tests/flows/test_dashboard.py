"""The dashboard: tables, status and ETA from rows (no Prefect needed); artifact versions that stay O(N) in
the Prefect database; rows another process writes on an S3 API seen by the next listing; the alert's set-up."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import dashboard
from tasks.common.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _render(pid, samples, passed, out, finished_at=None, wall=10.0):
    ladder = {f"ladder_{r}_{k}": samples for r in ("clip", "dino", "ssim") for k in ("in", "passed")}
    return {
        "partition_id": pid,
        "config_hash": "h",
        "counts": {
            "in": 5,
            "samples": samples,
            "passed": passed,
            "out": out,
            "unet_calls": 20 * samples,
            **ladder,
        },
        "rejected": {"clip_direction": samples - passed},
        "pass_rate": round(passed / samples, 4),
        "samples_per_s": 2.0,
        "quantiles": {"clip_sim_dir": {"q50": 0.21234}},
        "wall_time_s": wall,
        "finished_at": finished_at,
        "pass_rate_clip_sim_dir": 0.5,
        "pass_rate_clip_sim_0": 0.9,
        "pass_rate_clip_sim_1": 0.9,
        "pass_rate_clip_sim_image": 0.8,
        "unet_calls_per_kept_pair": 400.0,
        "batch_samples": 4,
    }


def test_a_stage_table_is_led_by_a_screen_of_columns_then_every_figure_with_the_same_columns_per_row():
    rows = dashboard.table(
        "render", [_render(0, 10, 4, 3), {**_render(1, 8, 2, 2), "oom_halvings": 1}], skipped={1: True}
    )
    lead = dashboard.leading("render", rows[0])
    assert len(lead) <= dashboard.SCREEN and list(rows[0])[: len(lead)] == lead
    assert lead == [
        "partition",
        "status",
        "in",
        "out",
        "pass_rate",
        "pass_rate_clip",
        "pass_rate_dino",
        "pass_rate_ssim",
        "n_samples",
        "n_passed",
        "samples_per_s",
        "wall_time_s",
    ]  # speed and wall time on screen
    assert list(rows[0])[-1] == "rejected" and {
        "n_unet_calls",
        "batch_samples",
        "median_clip_sim_dir",
    } <= set(rows[0])
    assert list(rows[0]) == list(rows[1]) and rows[0]["oom_halvings"] is None and rows[1]["oom_halvings"] == 1
    assert [r["status"] for r in rows] == ["done", "skipped"]
    assert rows[0]["pass_rate"] == 0.4 and rows[0]["median_clip_sim_dir"] == 0.2123
    assert rows[0]["rejected"] == "clip_direction: 6"


def _new_format(manifest):
    """The same manifest as written since the stage's figures have their own section."""
    generic = {"partition_id", "config_hash", "counts", "rejected", "quantiles", "wall_time_s", "finished_at"}
    return {k: v for k, v in manifest.items() if k in generic} | {
        "figures": {k: v for k, v in manifest.items() if k not in generic}
    }


def test_a_manifest_with_a_figures_section_and_one_written_before_it_show_the_same_rows():
    old = [_render(0, 10, 4, 3), {**_render(1, 8, 2, 2), "oom_halvings": 1}]
    new = [_new_format(m) for m in old]
    assert "pass_rate" not in new[0] and new[0]["figures"]["pass_rate"] == 0.4
    assert dashboard.table("render", new, skipped={1: True}) == dashboard.table(
        "render", old, skipped={1: True}
    )
    assert dashboard.pass_rate("render", new[1]) == dashboard.pass_rate("render", old[1]) == 0.25
    finetune = {"partition_id": 0, "counts": {"finetune_examples": 4, "out": 1}, "wall_time_s": 1.0}
    summary = {"finetune": {"train_loss_first10": 6.9, "val_loss": 5.0, "loss_curve": [], "backend": "local"}}
    rows = [
        dashboard.flat_row("finetune", m) for m in ({**finetune, **summary}, {**finetune, "figures": summary})
    ]
    assert rows[0] == rows[1] and rows[0]["train_loss_first10"] == 6.9 and "loss_curve" not in rows[0]
    assert dashboard.kept_pairs("render", new) == 5 and dashboard.kept_pairs("text", new) is None


def test_the_eta_counts_parallel_workers_and_is_zero_when_done():
    # three partitions of 10 s one after another: 10 s each, 2 left -> 20 s
    serial = [_render(i, 10, 1, 1, finished_at=100.0 + 10 * (i + 1)) for i in range(3)]
    assert dashboard.eta_s(serial, remaining=2, now=130.0) == pytest.approx(20.0)
    # the same three on three workers at once: 30 s of work in 10 s
    parallel = [_render(i, 10, 1, 1, finished_at=110.0) for i in range(3)]
    assert dashboard.eta_s(parallel, remaining=3, now=110.0) == pytest.approx(10.0)
    # nothing finished for a while since: the rate slows down
    assert dashboard.eta_s(parallel, remaining=3, now=140.0) == pytest.approx(40.0)
    assert dashboard.eta_s(serial, remaining=0) == 0.0 and dashboard.eta_s([], remaining=4) is None


def test_a_partitions_running_figures_read_as_one_line():
    line = dashboard.describe(
        "render",
        3,
        {
            "triplets_done": 12,
            "triplets": 40,
            "samples": 96,
            "passed": 30,
            "pass_rate": 0.3125,
            "kept_so_far": 24,
            "unet_calls": 9840,
            "unet_calls_per_kept_pair": 410.0,
            "samples_per_s": 2.1,
        },
    )
    assert line == (
        "render part-00003: 12/40 triplets, 96 samples, pass rate 31.2%, 24 pairs kept so far, "
        "410.0 UNet calls/kept pair, 2.1 samples/s"
    )
    assert (
        dashboard.describe("text", 0, {"done": 8, "expected": 20, "ok": 6, "per_s": 1.5})
        == "text part-00000: 8/20 done, 6 ok, 1.5 /s"
    )
    assert dashboard.describe("text", 0, None) == "text part-00000"


def test_the_status_shows_what_is_in_flight_the_blocks_throughput_and_a_pool_without_a_worker(tmp_path):
    cfg = load_config("demo", [f"output_root={tmp_path}", "name=watch", "captions.num_partitions=4"])
    board = dashboard.Board(cfg)
    board.totals = {s: (1 if s == "finetune" else 4) for s in board.hashes}
    for pid in (0, 1):  # two render partitions finished, 1 h apart: 6 kept pairs and 400 UNet calls an hour
        board.add(
            "render",
            {
                **_render(pid, 10, 4, 3, finished_at=10_000.0 + 3600 * pid, wall=3600.0),
                "config_hash": board.hashes["render"],
            },
        )
    board.live[("render", 2)] = dashboard.live_record(
        "render",
        2,
        0.45,
        {
            "triplets_done": 9,
            "triplets": 20,
            "samples": 960,
            "passed": 300,
            "pass_rate": 0.3125,
            "kept_so_far": 240,
            "unet_calls": 19200,
            "unet_calls_per_kept_pair": 80.0,
            "samples_per_s": 2.1,
        },
        started=10_000.0,
    )
    board.extra.update(
        blocks={"running": 1, "queued on a pool": 2, "retried": 1, "failed once or more": 1},
        waiting=[{"pool": "editforge-gpu", "message": "no worker is online on it"}],
    )
    text = board.status_markdown(now=13_600.0)
    assert "| render | 2 of 4 (50%) | 1 | 6 | 40.0% | 2.0 h |" in text  # 2 left at 2 partitions in 2 h
    assert "| render part-00002 | 45% | 960 | 31.2% | 240 | 2.1 |" in text
    assert "1 running, 2 queued on a pool, 1 retried, 1 failed once or more" in text
    assert "3 kept pairs/h · 0.1 UNet calls/s · 2.1 samples/s in flight · projected finish" in text
    assert "(in 2.0 h)" in text  # render's ETA: the slowest stage with an ETA
    # what each stage's pass rate is, from the records (Stage.dashboard), not from names in the dashboard
    assert "pass rate: render's passed / samples drawn; text, judge, filter: out / in." in text
    assert "Waiting for a worker** on work pool `editforge-gpu`: no worker is online on it" in text


def test_a_table_is_stored_again_only_when_its_rows_double_and_updated_in_place_between(
    prefect_harness, tmp_path
):
    """The database holds about twice the final table (versions of 1, 2, 4, 8 rows, each updated in place
    until the next), and an in-place update sends no event carrying the data."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    cfg = load_config("demo", [f"output_root={tmp_path}", "name=versions", "captions.num_partitions=12"])
    board = dashboard.Board(cfg)
    board.totals = {s: 12 for s in board.hashes}
    for pid in range(11):
        board.add(
            "render",
            {**_render(pid, 10, 4, 3, finished_at=100.0 + pid), "config_hash": board.hashes["render"]},
        )
        board.publish_stage("render")
    board.publish_stage("render")  # nothing changed: nothing sent
    key = dashboard.layout.artifact_key("versions", "render", board.hashes["render"])
    emit_event("editforge.test.published", resource={"prefect.resource.id": f"editforge.{key}"})
    EventsWorker.drain_all()  # this process's events are sent, in order: the marker last
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )[::-1]
        ids = {str(v.id) for v in versions}

        def events(name):
            body = {"filter": {"event": {"name": [name]}}, "limit": 50}
            return client.request("POST", "/events/filter", json=body).json()["events"]

        for _ in range(600):  # until the server has stored the marker (sent after every update)
            if any(
                e["resource"]["prefect.resource.id"] == f"editforge.{key}"
                for e in events("editforge.test.published")
            ):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the marker event never arrived")
        updated = [
            e for e in events("prefect.artifact.updated") if e["resource"]["prefect.resource.id"][17:] in ids
        ]
        created = [
            e for e in events("prefect.artifact.created") if e["resource"]["prefect.resource.id"][17:] in ids
        ]
    assert [len(json.loads(v.data)) for v in versions] == [1, 3, 7, 11]  # created at 1, 2, 4, 8 rows
    assert len(created) == 4 and updated == []  # 7 updates in place, none sent the table again as an event


S3_WRITER = """
import sys
from flows import dashboard
from tasks import registry
from tasks.common.config import load_config
cfg = load_config("demo", sys.argv[1:])
for pid in (5, 6, 7):  # what a worker elsewhere finishes: its manifest, then its row
    manifest = registry.execute(cfg, "captions", pid, lambda run: None)
    dashboard.write_row(cfg, "captions", manifest)
print("finished 5, 6, 7")
"""


def test_another_process_finishing_partitions_on_an_s3_api_is_seen_by_the_next_listing(s3):
    """The stale-listing bug: s3fs kept listings with no expiry, so a partition listed while in progress was
    never seen finished by that process. Two processes on moto's S3 server: this one lists, the other
    finishes three partitions, this one lists again."""
    from tasks import registry
    from tasks.common import contract, layout, storage

    s3.mkdir("stale")
    overrides = ["output_root=s3://stale/run", "captions.num_partitions=8"]
    cfg = load_config("demo", overrides)
    h = registry.stage_hash(cfg, "captions")
    for pid in range(5):
        dashboard.write_row(cfg, "captions", registry.execute(cfg, "captions", pid, lambda run: None))
    storage.write_bytes_atomic(
        layout.partition_file(cfg.output_root, "captions", h, 5, "half.bin"), b"in progress"
    )
    assert sorted(dashboard.finished_ids(cfg.output_root, "captions", h)) == [0, 1, 2, 3, 4]
    assert (
        storage.list_files(layout.partition_dir(cfg.output_root, "captions", h, 5)) != []
    )  # listed mid-work
    assert not contract.finished(layout.partition_dir(cfg.output_root, "captions", h, 5), h)

    out = subprocess.run(
        [sys.executable, "-c", S3_WRITER, *overrides],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "finished 5, 6, 7" in out.stdout, out.stderr[-3000:]

    assert sorted(dashboard.finished_ids(cfg.output_root, "captions", h)) == list(range(8))
    assert contract.finished(
        layout.partition_dir(cfg.output_root, "captions", h, 5), h
    )  # its folder was listed before it finished
    board = dashboard.Board(cfg)
    assert board.sync("captions") == 8 and board.sync("captions") == 0  # each row read once


def test_an_alert_without_a_notification_block_is_left_out_saying_how_to_add_one(
    prefect_harness, monkeypatch
):
    from flows.automations import WEBHOOK_ENV, alert_automations

    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    made, skipped = alert_automations()
    assert made == [] and len(skipped) == 1 and WEBHOOK_ENV in skipped[0] and "editforge-alerts" in skipped[0]
    monkeypatch.setenv(WEBHOOK_ENV, "http://127.0.0.1:9/alerts")
    (alert,) = alert_automations()[0]
    assert alert.trigger.expect == {"editforge.partition.failed", "editforge.partition.low-pass-rate"}
    assert alert.actions[0].type == "send-notification" and alert.actions[0].block_document_id


def test_a_partitions_progress_bar_says_failed_when_its_attempt_fails_and_100_when_it_finishes(
    prefect_harness,
):
    """A retried partition leaves one bar per attempt: the failed attempt's says so instead of staying at
    its last percentage as if still running; the attempt that finished shows 100."""
    from prefect.client.orchestration import get_client

    with pytest.raises(OSError), dashboard.live_partition("render", 41):
        dashboard.PROGRESS_HOOK.get()(0.5, None)
        raise OSError("lost the disk")
    with dashboard.live_partition("render", 41):
        pass
    with get_client(sync_client=True) as client:
        bars = [a for a in client.read_artifacts() if (a.description or "").startswith("render part-00041")]
    bars.sort(key=lambda a: a.created)
    assert [(a.description, a.data) for a in bars] == [
        ("render part-00041: failed (OSError)", 50.0),
        ("render part-00041", 100.0),
    ]
