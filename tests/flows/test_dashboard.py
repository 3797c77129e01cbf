"""The dashboard's tables, progress and ETA from manifests (no Prefect needed), and the alert's set-up."""

import pytest

from flows import dashboard


def _render(pid, samples, passed, out, finished_at=None, wall=10.0):
    return {"partition_id": pid, "config_hash": "h", "counts": {"in": 5, "samples": samples, "passed": passed, "out": out},
            "rejected": {"clip_direction": samples - passed}, "pass_rate": round(passed / samples, 4),
            "samples_per_s": 2.0, "quantiles": {"clip_sim_dir": {"q50": 0.21234}}, "wall_time_s": wall,
            "finished_at": finished_at}


def test_the_stage_table_puts_the_readable_columns_first_and_gives_every_row_the_same_columns():
    rows = dashboard.table("render", [_render(0, 10, 4, 3), {**_render(1, 8, 2, 2), "oom_halvings": 1}],
                           skipped={1: True})
    assert list(rows[0])[:6] == ["partition", "status", "in", "out", "pass_rate", "n_samples"]
    assert list(rows[0])[-2:] == ["rejected", "wall_time_s"]
    assert list(rows[0]) == list(rows[1]) and rows[0]["oom_halvings"] is None and rows[1]["oom_halvings"] == 1
    assert [r["status"] for r in rows] == ["done", "skipped"]
    assert rows[0]["pass_rate"] == 0.4 and rows[0]["median_clip_sim_dir"] == 0.2123
    assert rows[0]["rejected"] == "clip_direction: 6"


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
    line = dashboard.describe("render", 3, {"triplets_done": 12, "triplets": 40, "samples": 96, "passed": 30,
                                            "pass_rate": 0.3125, "kept_so_far": 24, "unet_calls": 9840,
                                            "unet_calls_per_kept_pair": 410.0, "samples_per_s": 2.1})
    assert line == ("render part-00003: 12/40 triplets, 96 samples, pass rate 31.2%, 24 pairs kept so far, "
                    "410.0 UNet calls/kept pair, 2.1 samples/s")
    assert dashboard.describe("text", 0, {"done": 8, "expected": 20, "ok": 6, "per_s": 1.5}) == \
        "text part-00000: 8/20 done, 6 ok, 1.5 /s"
    assert dashboard.describe("text", 0, None) == "text part-00000"


def test_an_alert_without_a_notification_block_is_left_out_saying_how_to_add_one(prefect_harness, monkeypatch):
    from flows.automations import WEBHOOK_ENV, alert_automations

    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    made, skipped = alert_automations()
    assert made == [] and len(skipped) == 1 and WEBHOOK_ENV in skipped[0] and "editforge-alerts" in skipped[0]
    monkeypatch.setenv(WEBHOOK_ENV, "http://127.0.0.1:9/alerts")
    (alert,) = alert_automations()[0]
    assert alert.trigger.expect == {"editforge.partition.failed", "editforge.partition.low-pass-rate"}
    assert alert.actions[0].type == "send-notification" and alert.actions[0].block_document_id
