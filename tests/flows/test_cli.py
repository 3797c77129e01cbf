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
    hashes = json.loads(result.output[result.output.index("{"):])
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


def test_report_on_an_empty_output_root(tmp_path):
    result = runner.invoke(app, ["report", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 0, result.output
