"""The config explains itself: every field has a description, docs/config.md is the model's, and
`editforge config --explain` prints every setting with its value, default and description."""

from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from tasks.common.config import PipelineConfig
from tasks.common.config_docs import markdown, settings, undocumented

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


def test_every_field_has_a_description():
    assert len(settings()) > 200  # the walk reaches the nested sections (render.keep, judges.vlm, ...)
    assert undocumented() == []


def test_undocumented_fields_are_found():
    from pydantic import Field

    class Probe(PipelineConfig):
        extra_knob: int = 0
        documented: int = Field(0, description="has one")

    assert undocumented(Probe) == ["extra_knob"]


def test_docs_config_md_is_generated_from_the_model():
    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == markdown(), "docs/config.md is stale: regenerate it with `make config-docs`"


def test_explain_prints_every_setting_with_value_default_and_description():
    result = runner.invoke(app, ["config", "--preset", "paper", "--explain"])
    assert result.exit_code == 0, result.output
    out = result.output
    for s in settings():
        if s.is_section:
            assert f"[{s.key}]  {s.info.description}" in out
        else:
            assert f"\n{s.key} = " in f"\n{out}", s.key
            assert " ".join(s.info.description.split()[:6]) in " ".join(out.split()), s.key
    # the preset's value, and the default where it differs
    assert "render.steps = 100   (the default; int)" in out
    assert 'models.diffusion = "sd15"   (default "tiny"; ' in out
    assert 'render.batch_samples = "auto"   (default 4; int or one of: auto; operational' in out


def test_explain_one_key_or_section():
    one = runner.invoke(app, ["config", "--preset", "paper", "--explain", "render.keep"])
    assert one.exit_code == 0 and "render.keep.top_k = 4" in one.output and "render.steps" not in one.output
    key = "render.adaptive.give_up_after"
    leaf = runner.invoke(app, ["config", "--set", f"{key}=8", key])
    assert leaf.exit_code == 0 and leaf.output.startswith(f"{key} = 8   (default null; ")
    bad = runner.invoke(app, ["config", "--explain", "render.stepz"])
    assert bad.exit_code == 2 and "error: no setting 'render.stepz'" in bad.output
    assert "Traceback" not in bad.output
