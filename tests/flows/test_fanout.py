"""The fan-out driver on a real Prefect server (the session's test harness): its plan; what it finds finished;
a parent killed at half its blocks and started again; a work pool no worker takes children from.

The children are the real stage flows run by Prefect's engine in this process (the test is their worker),
each stage's work replaced by bench/scale.py's stand-in: the driver sees real child runs and real files."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks import registry
from tasks.common.config import load_config

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("editforge.test")


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def standin(monkeypatch):
    """Every stage's work replaced by the bench's stand-in (this process), and a way to hold one partition
    mid-work: ``hold[(stage, pid)] = (started, release)`` events."""
    bench = _bench()
    hold: dict[tuple[str, int], tuple[threading.Event, threading.Event]] = {}

    def entry(stage):
        run = bench.standin(stage)

        def held(cfg, partition_id, *, logger=None):
            if (stage, partition_id) in hold:
                started, release = hold[(stage, partition_id)]
                started.set()
                assert release.wait(300), "the held partition was never released"
            return run(cfg, partition_id, logger=logger)

        return held

    monkeypatch.setattr(registry, "entry", entry)
    return hold


def _deployments(client, pool: str) -> dict[str, str]:
    """The chain's deployments on ``pool`` (no worker polls it): deployment id -> stage."""
    from flows.local_cluster import deploy_chain

    return {
        str(client.read_deployment_by_name(name).id): name.split("/")[0].removeprefix("editforge-")
        for name in deploy_chain(client, pool, f"{pool}-{{stage}}")
    }


def _scheduled(client, deployments: dict[str, str]) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))
        ),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployments))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=10,
    )


def _run_child(client, deployments: dict[str, str], run) -> bool:
    """Be the worker of one scheduled child run: claim it (Pending), run its flow with Prefect's engine."""
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    from flows.stages import FLOWS

    if client.set_flow_run_state(run.id, Pending()).status.value != "ACCEPT":
        return False
    run_flow(
        FLOWS[deployments[str(run.deployment_id)]],
        flow_run=client.read_flow_run(run.id),
        parameters=run.parameters,
        return_type="state",
    )
    return True


def _runs(client, deployments: dict[str, str]) -> dict[str, list]:
    """Block label -> its child runs, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployments))), limit=200
    )
    found: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: r.created):
        found.setdefault(r.idempotency_key.split("/")[1], []).append(r)
    return found


def test_blocks_cover_every_partition_once_and_one_partition_stages_once(tmp_path):
    from flows.fanout import plan_blocks

    cfg = load_config("demo", [f"output_root={tmp_path}", "captions.num_partitions=5", "run.block_size=2"])
    blocks = plan_blocks(cfg)
    by_stage = {}
    for b in blocks:
        by_stage.setdefault(b.stage, []).append(b.partitions)
    assert by_stage["captions"] == by_stage["render"] == [[0, 1], [2, 3], [4]]
    assert by_stage["finetune"] == [[0]] and "train" not in by_stage


def test_a_block_is_ready_when_what_it_reads_is_finished_under_this_config(
    prefect_harness, tmp_path, standin
):
    """A starting parent knows what is finished from one listing per stage (the dashboard's rows)."""
    from prefect.client.orchestration import get_client

    from flows import dashboard
    from flows.fanout import Block, FanOut

    cfg = load_config("demo", [f"output_root={tmp_path}", "captions.num_partitions=4", "run.block_size=2"])
    other = load_config(
        "demo", [f"output_root={tmp_path}", "captions.num_partitions=4", "text.finetune_steps=7"]
    )

    def finish(c, stage, pid):
        dashboard.write_row(c, stage, registry.entry(stage)(c, pid))

    for pid in (2, 3):
        finish(cfg, "captions", pid)
    finish(other, "finetune", 0)  # another config's fine-tune does not count
    with get_client(sync_client=True) as client:
        driver = FanOut(cfg, "demo", [], log, client)
        driver.start()
        assert driver._ready(Block("text", [2, 3])) is False  # the fine-tune is missing
        finish(cfg, "finetune", 0)
        driver = FanOut(cfg, "demo", [], log, client)
        driver.start()
    assert driver._ready(Block("text", [2, 3])) and not driver._ready(Block("text", [0, 1]))
    assert [b.done for b in driver.blocks if b.stage in ("captions", "finetune")] == [False, True, True]


PARENT_ENV = {"PYTHONUNBUFFERED": "1", "PREFECT_LOGGING_LEVEL": "INFO"}


def _parent(api: str, overrides: list[str], out: Path) -> subprocess.Popen:
    """The `editforge-generate` flow run with run.mode=fan-out, as its own process."""
    args = [sys.executable, "-m", "flows.generate", "--preset", "demo"]
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **PARENT_ENV, "PREFECT_API_URL": api},
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_parent_killed_at_half_its_blocks_and_started_again_submits_only_what_is_missing(
    prefect_harness, tmp_path, standin
):
    """Killed (SIGKILL) once 6 of 13 blocks are done and a 7th is mid-work, the parent is started again: it
    adopts the child runs still scheduled or running (not one block submitted twice) and submits only the
    blocks that had no run; every block ends with exactly one completed run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    overrides = [
        f"output_root={tmp_path / 'run'}",
        "name=restart",
        "captions.num_partitions=4",
        "captions.num_captions=8",
        "run.mode=fan-out",
        "run.block_size=2",
        "run.deployments=restart-{stage}",
        "run.poll_s=0.2",
    ]
    with get_client(sync_client=True) as client:
        deployments = _deployments(client, "restart")
        first = _parent(api, overrides, tmp_path / "first.log")
        done = 0
        while done < 6:  # the kill is placed by a count of finished blocks
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            runs = _scheduled(client, deployments)
            done += sum(_run_child(client, deployments, r) for r in runs[:1])
            if not runs:
                time.sleep(0.1)
        while not (runs := _scheduled(client, deployments)):
            time.sleep(0.1)
        held_run = runs[0]
        stage = deployments[str(held_run.deployment_id)]
        started, release = standin[(stage, held_run.parameters["partitions"][0])] = (
            threading.Event(),
            threading.Event(),
        )
        worker = threading.Thread(target=_run_child, args=(client, deployments, held_run))
        worker.start()
        assert started.wait(300)  # the 7th block's child is running, its first partition mid-work
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        at_kill = _runs(client, deployments)
        finished_at_kill = {b for b, rs in at_kill.items() if rs[-1].state_type.value == "COMPLETED"}
        assert len(finished_at_kill) == 6 and held_run.idempotency_key.split("/")[1] in at_kill

        second = _parent(api, overrides, tmp_path / "second.log")
        while "in flight adopted" not in (tmp_path / "second.log").read_text():
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            time.sleep(0.1)
        release.set()  # the held child finishes under the new parent
        worker.join(timeout=300)
        while second.poll() is None:
            runs = _scheduled(client, deployments)
            for r in runs[:1]:
                _run_child(client, deployments, r)
            if not runs:
                time.sleep(0.1)
        after = _runs(client, deployments)
    text = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, text[-3000:]
    adopted = int(text.split("13 blocks, 6 already finished, ")[1].split(" in flight adopted")[0])
    assert adopted == len(at_kill) - 6 >= 1  # the held run and those scheduled when the parent died
    # every block has exactly one run, completed: those of the first parent kept, new ones for the rest
    assert len(after) == 13 and all(
        len(rs) == 1 and rs[0].state_type.value == "COMPLETED" for rs in after.values()
    ), {b: [r.state_type.value for r in rs] for b, rs in after.items()}
    assert all(after[b][0].id == at_kill[b][0].id for b in at_kill)
    from tasks.pack.index import read_index

    assert read_index(registry.index_url(load_config("demo", overrides)))["splits"]["train"]["samples"] == 16


def test_children_no_worker_takes_make_the_run_name_the_pool_then_fail(prefect_harness, tmp_path, caplog):
    """Warned after run.worker_wait_warn_s and failed after run.worker_wait_fail_s, counted in poll rounds
    (2 and 4 here); the waiting children are cancelled; the status artifact names the pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.fanout import NoWorkerError, fan_out
    from tasks.common.layout import artifact_key

    overrides = [
        f"output_root={tmp_path}",
        "name=idle",
        "captions.num_partitions=2",
        "run.mode=fan-out",
        "run.deployments=idle-{stage}",
        "run.poll_s=0.05",
        "run.worker_wait_warn_s=0.1",
        "run.worker_wait_fail_s=0.2",
    ]
    cfg = load_config("demo", overrides)
    with get_client(sync_client=True) as client:
        deployments = _deployments(client, "idle")
    with caplog.at_level(logging.INFO, logger="editforge.test"), pytest.raises(NoWorkerError) as failed:
        fan_out(cfg, "demo", overrides, log)
    message = str(failed.value)
    assert "waited 4 poll rounds" in message and "work pool 'idle'" in message, message
    assert "no worker is online on it: start one (`prefect worker start --pool idle`)" in message
    warned = [r.getMessage() for r in caplog.records if "waited 2 poll rounds" in r.getMessage()]
    assert (
        len(warned) == 1 and "work pool 'idle'" in warned[0] and "(captions[0-1], finetune[0-0])" in warned[0]
    )
    with get_client(sync_client=True) as client:
        runs = _runs(client, deployments)
        status = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key("idle", "status", registry.stage_hash(cfg, "pack"))])
            )
        )[0]
    assert {b: [r.state_type.value for r in rs] for b, rs in runs.items()} == {
        "captions[0-1]": ["CANCELLED"],
        "finetune[0-0]": ["CANCELLED"],
    }
    assert "Waiting for a worker** on work pool `idle`" in status.data


def test_a_waiting_run_goes_on_once_a_worker_takes_its_children(prefect_harness, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from flows.fanout import FanOut

    overrides = [
        f"output_root={tmp_path}",
        "name=late",
        "captions.num_partitions=2",
        "run.mode=fan-out",
        "run.deployments=late-{stage}",
        "run.poll_s=1",
        "run.worker_wait_warn_s=2",
        "run.worker_wait_fail_s=3600",
    ]
    cfg = load_config("demo", overrides)
    registry.prepare(cfg, "captions")
    with get_client(sync_client=True) as client, caplog.at_level(logging.INFO, logger="editforge.test"):
        _deployments(client, "late")
        driver = FanOut(cfg, "demo", overrides, log, client)
        driver.start()
        for _ in range(2):
            driver.poll()
        assert list(driver.warned) == ["late"] and driver.board.extra["waiting"][0]["pool"] == "late"
        (child,) = [b for b in driver.blocks if b.flow_run_id is not None and b.stage == "captions"]
        client.set_flow_run_state(child.flow_run_id, Pending())  # a worker appeared and took it
        client.set_flow_run_state(child.flow_run_id, Running())
        driver.poll()
    assert driver.warned == {} and driver.stalled == {} and driver.board.extra["waiting"] == []
    assert any("work pool 'late' runs this run's children again" in r.getMessage() for r in caplog.records)
