"""The stage flows come from the registry: one flow and one deployment per stage of the chain."""

from pathlib import Path

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
