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


def test_paper_prints_its_total_batch_first_and_derives_32_accumulation_on_one_gpu(prefect_harness, tmp_path, capsys,
                                                                                   caplog):
    """The flow's first line is the batch it will train (here no index yet: the run then stops, exit 2)."""
    from flows.train import main

    caplog.set_level("INFO", logger="prefect.flow_runs")
    assert main(["--preset", "paper", "--set", f"output_root={tmp_path}", "--set", "train.processes=1"]) == 2
    ours = [r.getMessage() for r in caplog.records if r.name == "prefect.flow_runs" and "train:" in r.getMessage()]
    assert ours[0] == "train: total batch 1024 = 32 × 32 × 1 process"
    assert "error: no shard index at" in capsys.readouterr().err


def test_started_by_a_launcher_it_refuses_and_says_how_to_run_it(monkeypatch, capsys):
    from flows.train import main

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["--preset", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: editforge train was started by a launcher (WORLD_SIZE=2, RANK=1)")
    assert "--set train.processes=2" in err and "Traceback" not in err


def test_a_batch_the_processes_cannot_make_stops_before_prefect(capsys):
    from flows.train import main

    assert main(["--preset", "demo", "--set", "train.processes=3"]) == 2
    assert "total_batch_size 4 is not a multiple of batch_size x processes = 4 x 3 processes" in capsys.readouterr().err
    assert main(["--preset", "demo", "--node-rank", "1"]) == 2
    assert "--node-rank 1: the nodes of train.nodes=1" in capsys.readouterr().err


def test_another_node_takes_its_settings_from_the_flow_run(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.train import flow_run_parameters, train

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(train, parameters={"preset": "paper", "overrides": ["train.nodes=2"],
                                                        "index": "s3://b/pack/h/index.json"})
    assert flow_run_parameters(str(run.id)) == ("paper", ["train.nodes=2"], "s3://b/pack/h/index.json")
