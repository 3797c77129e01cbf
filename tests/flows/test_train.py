"""Flow tier: the training flow on synthetic shards under the Prefect test harness."""

import json

import pytest

pytestmark = pytest.mark.flow


def test_train_flow_trains_publishes_and_skips_on_rerun(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import train
    from tasks.train.model import load_pipeline
    from tasks.train.synthetic import write_synthetic_shards

    index = write_synthetic_shards(str(tmp_path / "shards"), train_samples=8, val_samples=2, per_shard=4)
    overrides = [f"output_root={tmp_path / 'out'}", "name=trainflow", "train.steps=3", "train.batch_size=2",
                 "train.checkpoint_every=2", "train.sample_steps=2", "train.shuffle_buffer=4"]
    result = train("demo", overrides, index)
    assert not result["skipped"] and result["train"]["steps"] == 3
    part = tmp_path / "out" / result["path"]
    assert json.loads((part / "_SUCCESS.json").read_text())["config_hash"] == result["config_hash"]
    assert (part / "sample_edit.png").is_file() and result["sample"]["png"].endswith("sample_edit.png")
    assert load_pipeline(part / "model").unet.config.in_channels == 8

    again = train("demo", overrides, index)
    assert again["skipped"] and again["train"] == result["train"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"editforge-trainflow-train-{result['config_hash'][:8]}"])))
    assert artifacts and artifacts[0].type == "table"
    rows = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_cli_rejects_a_bad_key(capsys):
    from flows.train import main

    assert main(["--preset", "demo", "--set", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
