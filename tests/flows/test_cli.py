"""The `editforge` command line: config inspection, clear errors, partition specs, registered commands."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.options import parse_partitions
from tasks import registry
from tasks.common.config import load_config
from tasks.registry import stage_hash

runner = CliRunner()


def test_config_prints_resolved_values_and_hashes():
    result = runner.invoke(app, ["config", "--preset", "paper", "--set", "filter.top_k=2"])
    assert result.exit_code == 0, result.output
    hashes = json.loads(result.output[result.output.index("# config hashes") :].split("\n", 1)[1])
    cfg = load_config("paper", ["filter.top_k=2"])
    assert hashes == {s.name: stage_hash(cfg, s.name) for s in registry.chain()}
    assert hashes["render"] == stage_hash(load_config("paper"), "render")  # a re-selection only
    assert "save_images: kept" in result.output


def test_bad_override_exits_2_naming_the_key():
    result = runner.invoke(app, ["config", "--set", "render.keep.top_kk=2"])
    assert result.exit_code == 2 and "render.keep.top_kk" in result.output


def test_presets_and_commands_listed():
    assert set(runner.invoke(app, ["presets"]).output.split()) >= {"demo", "paper", "fast"}
    help_text = runner.invoke(app, ["--help"]).output
    for command in ("run", "stage", "train", "config", "report", "calibrate-early"):
        assert command in help_text


@pytest.mark.parametrize("spec, ids", [(None, None), ("3", [3]), ("0,2,5-7", [0, 2, 5, 6, 7])])
def test_parse_partitions(spec, ids):
    assert parse_partitions(spec) == ids


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("5-2", "ends before it starts"),
        ("x", "expected partition ids"),
        ("-1", "expected partition ids"),
        ("7", "out of range 0..1"),
    ],
)
def test_bad_partitions_exit_2_before_any_work(tmp_path, spec, needle):
    result = runner.invoke(app, ["stage", "render", "--set", f"output_root={tmp_path}", "--partitions", spec])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written


def test_report_on_an_empty_output_root(tmp_path):
    result = runner.invoke(app, ["report", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 0, result.output


def test_a_bad_run_name_fails_at_once_naming_name():
    from flows.generate import main

    result = runner.invoke(app, ["run", "--set", "name=my_run"])
    assert result.exit_code == 2 and "name" in result.output and "'my-run'" in result.output
    assert main(["--set", "name=My.Run"]) == 2  # `python -m flows.generate` is the same command


def test_report_counts_only_partitions_of_this_config(tmp_path):
    from flows.report import current_manifests
    from tasks.common import storage
    from tasks.common.layout import success_url

    ours = load_config("demo", [f"output_root={tmp_path}"])
    other = load_config("demo", [f"output_root={tmp_path}", "render.steps=3"])  # render, filter, pack differ
    for cfg, stage, pid, out in (
        (ours, "captions", 0, 20),
        (ours, "captions", 1, 20),
        (other, "render", 0, 9),
        (ours, "render", 1, 5),
    ):
        storage.write_json_atomic(
            success_url(str(tmp_path), stage, stage_hash(cfg, stage), pid),
            {"partition_id": pid, "config_hash": stage_hash(cfg, stage), "counts": {"out": out}},
        )
    found = current_manifests(ours)
    assert [m["partition_id"] for m in found["captions"]] == [0, 1]
    assert [m["partition_id"] for m in found["render"]] == [1]  # render part-00000 is another config's
    result = runner.invoke(app, ["report", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 0, result.output
    render_row = next(line for line in result.output.splitlines() if "render" in line and "│" in line)
    assert render_row.split("│")[2].strip() == "1" and render_row.split("│")[5].strip() == "5"
    assert "other versions on disk" in result.output and stage_hash(other, "render") in result.output


def test_verify_finds_flipped_bytes_by_name(tmp_path):
    from tasks.common import storage
    from tasks.common.contract import execute_partition

    cfg = load_config("demo", [f"output_root={tmp_path}", "captions.num_partitions=1"])
    execute_partition(
        "captions",
        0,
        str(tmp_path),
        stage_hash(cfg, "captions"),
        lambda run: storage.write_bytes_atomic(run.output("captions.parquet"), b"0123456789"),
    )
    args = ["verify", "--set", f"output_root={tmp_path}", "--set", "captions.num_partitions=1"]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "captions" / stage_hash(cfg, "captions") / "part-00000/captions.parquet").write_bytes(
        b"0123456780"
    )
    result = runner.invoke(app, args)
    assert (
        result.exit_code == 1
        and "captions part-00000:" in result.output
        and "captions.parquet" in result.output
    )


@pytest.mark.flow
def test_a_run_that_cannot_succeed_prints_one_line_exits_2_and_is_not_retried(prefect_harness, tmp_path):
    result = runner.invoke(
        app,
        [
            "stage",
            "captions",
            "--set",
            f"output_root={tmp_path}",
            "--set",
            f"captions.source={tmp_path}/none-*.parquet",
        ],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: captions.source '{tmp_path}/none-*.parquet' matched no file"], result.output
    assert "Traceback" not in result.output and "Retrying" not in result.output


def test_index_is_rebuilt_from_the_finished_pack_partitions(tmp_path):
    import json

    from tasks.common import storage
    from tasks.common.layout import success_url

    cfg = load_config("demo", [f"output_root={tmp_path}"])
    shards = [{"name": "train-000000.tar", "split": "train", "samples": 3}]
    storage.write_json_atomic(
        success_url(str(tmp_path), "pack", stage_hash(cfg, "pack"), 1),
        {"partition_id": 1, "shards": shards, "config_hash": stage_hash(cfg, "pack")},
    )
    result = runner.invoke(app, ["index", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 0 and "1 shards from 1 pack partition(s); 1 not finished" in result.output, (
        result.output
    )
    index = json.loads((tmp_path / "pack" / stage_hash(cfg, "pack") / "index.json").read_text())
    assert index["splits"]["train"] == {"shards": ["part-00001/train-000000.tar"], "samples": 3}
