"""The `paper` and `fast` presets refuse to fine-tune the built-in random tiny LM, before any work,
unless the user names an LM (or the openai backend); the demo keeps the tiny LM."""

from __future__ import annotations

import pytest
from text_helpers import make_captions, write_captions
from typer.testing import CliRunner

from tasks.common.config import ConfigError, load_config, tiny_lm_refusal

FIXES = ("models.lm_path", "text.backend=openai", "text.openai.")


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_the_paper_presets_refuse_the_tiny_lm_before_any_work(tmp_path, preset):
    from tasks.finetune.stage import run as run_finetune
    from tasks.text.stage import run as run_text

    cfg = load_config(
        preset, [f"output_root={tmp_path}"]
    )  # loads: `config`, `train`, render-only stages still work
    assert cfg.models.lm == "tiny" and cfg.text.max_attempts == 4
    with pytest.raises(ConfigError, match="models.lm is the built-in random-init tiny LM") as refused:
        run_finetune(cfg)
    assert all(fix in str(refused.value) for fix in FIXES) and "\n" not in str(refused.value)
    write_captions(str(tmp_path), 0, make_captions(3), preset=preset)
    with pytest.raises(ConfigError, match="models.lm_path"):
        run_text(cfg, 0)  # refused before it looks for its inputs (the fine-tune is missing)
    assert not list(tmp_path.glob("finetune*")) and not list(tmp_path.glob("text*"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["models.lm=tiny"],  # the tiny LM on purpose
        ["models.lm_path=/models/Qwen2.5-1.5B"],
        ["models.lm=Qwen/Qwen2.5-1.5B-Instruct"],
        ["text.backend=openai"],
        ["text.refuse_tiny_lm=false"],
    ],
)
def test_naming_an_lm_or_the_openai_backend_is_accepted(overrides):
    assert tiny_lm_refusal(load_config("paper", overrides)) is None
    assert tiny_lm_refusal(load_config("fast", overrides)) is None


def test_the_demo_keeps_the_tiny_lm_with_one_try_per_caption():
    demo = load_config("demo")
    assert tiny_lm_refusal(demo) is None and demo.models.lm == "tiny" and demo.text.max_attempts == 1


def test_editforge_run_with_the_paper_preset_fails_at_once_with_one_line(tmp_path):
    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--preset", "paper", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 2, (
        result.output
    )  # as for any setting (flows/options.py): a retry cannot fix it
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: preset paper: models.lm is the built-in"), (
        result.output
    )
    assert all(fix in lines[0] for fix in FIXES) and "Traceback" not in result.output
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing ran, not even the captions stage


def test_more_tries_regenerate_the_triplets_but_never_retrain_the_lm():
    from tasks.registry import stage_hash

    one, four = load_config("demo"), load_config("demo", ["text.max_attempts=4"])
    assert stage_hash(one, "finetune") == stage_hash(four, "finetune")
    assert stage_hash(one, "text") != stage_hash(four, "text")
    assert stage_hash(one, "text") == stage_hash(load_config("demo", ["text.refuse_tiny_lm=true"]), "text")


def test_max_attempts_out_of_range_names_the_setting():
    with pytest.raises(ConfigError, match="text.max_attempts: Input should be greater than or equal to 1"):
        load_config("demo", ["text.max_attempts=0"])
