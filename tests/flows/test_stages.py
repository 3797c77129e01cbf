"""The stage flows come from the registry: one flow and one deployment per stage of the chain."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_chain_stage_has_a_flow_and_a_paper_deployment():
    from prefect import Flow

    import flows.stages as stages
    from tasks import registry

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]}
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
    assert stages.parallel_partitions(cfg, registry.get("render"), 455) == 1  # the worker's GPU: one at a time
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
    manifests = FLOWS["captions"]("demo", [f"output_root={tmp_path}", "captions.num_partitions=6",
                                           "captions.num_captions=24", "run.max_parallel_partitions=2"])
    assert sorted(m["partition_id"] for m in manifests) == list(range(6)) and peak[0] == 2
