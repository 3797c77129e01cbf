"""The stage flows come from the registry: one flow and one deployment per stage of the chain."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_chain_stage_has_a_flow_and_a_paper_deployment():
    from prefect import Flow

    import flows.stages as stages
    from tasks import registry

    deployments = {
        d["name"]: d for d in yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
    }
    for stage in registry.chain():
        flow = getattr(stages, f"{stage.name}_flow")
        assert isinstance(flow, Flow) and flow.name == f"editforge-{stage.name}"
        assert set(flow.parameters.properties) == {"preset", "overrides", "partitions"}
        assert deployments[f"paper-{stage.name}"]["entrypoint"] == f"flows/stages.py:{stage.name}_flow"
    assert deployments["paper-train"]["entrypoint"] == "flows/train.py:train"


def test_partition_ids_are_checked_against_the_stage():
    import pytest

    from flows.stages import partition_ids
    from tasks import registry
    from tasks.common.config import load_config

    cfg = load_config("demo")  # 2 partitions
    assert partition_ids(cfg, registry.get("render"), None) == [0, 1]
    assert partition_ids(cfg, registry.get("finetune"), None) == [0]
    with pytest.raises(ValueError, match=r"render: partitions \[5\] out of range 0\.\.1"):
        partition_ids(cfg, registry.get("render"), [5, 0])


def test_parallel_partitions_come_from_the_resources_and_the_run_setting(monkeypatch):
    import flows.stages as stages
    from tasks import registry
    from tasks.common.config import load_config

    monkeypatch.setattr(stages, "cpus_available", lambda: 8)
    cfg = load_config("paper")
    assert stages.parallel_partitions(cfg, registry.get("captions"), 455) == 8  # 8 CPUs, 1 per partition
    assert stages.parallel_partitions(cfg, registry.get("captions"), 3) == 3
    assert (
        stages.parallel_partitions(cfg, registry.get("render"), 455) == 1
    )  # the worker's GPU: one at a time
    capped = load_config("paper", ["run.max_parallel_partitions=2"])
    assert stages.parallel_partitions(capped, registry.get("pack"), 455) == 2
    assert stages.parallel_partitions(capped, registry.get("text"), 455) == 1


@pytest.mark.flow
def test_a_stage_never_runs_more_partitions_at_once_than_allowed(prefect_harness, tmp_path, monkeypatch):
    import threading

    import tasks.captions.stage as captions_stage
    from flows.stages import FLOWS

    running, peak, lock = [0], [0], threading.Lock()
    pair = threading.Barrier(2, timeout=300)  # the first two meet: the pool really has two workers
    real = captions_stage.partition_captions

    def counted(cfg, partition_id, config_hash):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            if partition_id < 2:
                pair.wait()
            return real(cfg, partition_id, config_hash)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(captions_stage, "partition_captions", counted)
    manifests = FLOWS["captions"](
        "demo",
        [
            f"output_root={tmp_path}",
            "captions.num_partitions=6",
            "captions.num_captions=24",
            "run.max_parallel_partitions=2",
        ],
    )
    assert sorted(m["partition_id"] for m in manifests) == list(range(6)) and peak[0] == 2


@pytest.mark.flow
@pytest.mark.parametrize("error, attempts", [("library", 2), ("permanent", 1)])
def test_a_partition_is_retried_unless_the_project_called_its_error_permanent(
    prefect_harness, tmp_path, monkeypatch, error, attempts
):
    """A library's ValueError (pyarrow's, meaning unknown here) is retried; the project's InputError is not."""
    import pyarrow as pa

    import tasks.captions.stage as captions_stage
    from flows.stages import FLOWS
    from tasks.common.errors import InputError

    calls, real = [], captions_stage.partition_captions

    def failing_once(cfg, partition_id, config_hash):
        calls.append(partition_id)
        if len(calls) == 1:
            raise pa.ArrowInvalid("flaky read") if error == "library" else InputError("a bad setting")
        return real(cfg, partition_id, config_hash)

    monkeypatch.setattr(captions_stage, "partition_captions", failing_once)
    overrides = [f"output_root={tmp_path}", "captions.num_partitions=1", "captions.num_captions=8"]
    if error == "library":
        assert [m["partition_id"] for m in FLOWS["captions"]("demo", overrides)] == [0]
    else:
        with pytest.raises(InputError, match="a bad setting"):
            FLOWS["captions"]("demo", overrides)
    assert calls == [0] * attempts


@pytest.mark.flow
def test_one_task_run_per_block_and_a_retry_goes_on_from_the_unfinished_partitions(
    prefect_harness, tmp_path, monkeypatch
):
    """Blocks of `run.block_size` partitions, each one task run with the stage's tags (Prefect stores three
    state events per task run); a transient error in a block's second partition retries the block from it."""
    import time

    import pyarrow as pa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    import tasks.captions.stage as captions_stage
    from flows.stages import FLOWS

    calls, real = [], captions_stage.partition_captions

    def flaky(cfg, partition_id, config_hash):
        calls.append(partition_id)
        if calls == [0, 1]:
            raise pa.ArrowInvalid("flaky read")
        return real(cfg, partition_id, config_hash)

    monkeypatch.setattr(captions_stage, "partition_captions", flaky)
    overrides = [
        f"output_root={tmp_path}",
        "captions.num_partitions=3",
        "captions.num_captions=12",
        "run.block_size=2",
        "run.max_parallel_partitions=1",
    ]
    state = FLOWS["captions"]("demo", overrides, return_state=True)
    manifests = state.result()
    assert [(m["partition_id"], m.get("skipped", False)) for m in manifests] == [(i, False) for i in range(3)]
    assert calls == [0, 1, 1, 2]  # partition 0, finished before the error, is not run again
    EventsWorker.drain_all()  # the task runs' state events sent; the server records them as they come
    with get_client(sync_client=True) as client:
        for _ in range(600):  # until the server has recorded both blocks' ends
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            blocks = sorted(
                (r.name, r.run_count, r.state_type.value, tuple(sorted(r.tags)))
                for r in runs
                if "-partitions" in r.name
            )
            if [b[2] for b in blocks] == ["COMPLETED", "COMPLETED"]:
                break
            time.sleep(0.1)
    assert blocks == [
        ("captions-partitions[0-1]", 2, "COMPLETED", ()),  # a CPU stage's block carries no tag
        ("captions-partitions[2-2]", 1, "COMPLETED", ()),
    ]
