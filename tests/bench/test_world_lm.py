"""bench/world_lm.py: what the shipped world LM writes, sampled and parsed as the text stage does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_world_lm", ROOT / "bench" / "world_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.component
def test_the_shipped_world_lm_writes_world_edits(tmp_path, capsys):
    out = tmp_path / "lm.json"
    assert _bench().main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["captions"] == 20 and sum(result["kinds"].values()) == 20
    # most completions are one world edit (the build's LM: 81.5% of 400 captions of world seed 3)
    assert result["world_edits"] > 0.5, result["kinds"]
    assert result["accepted"] >= result["world_edits"]
    assert "world LM, 20 captions of world seed 3: " in capsys.readouterr().out


def test_world_lm_names_a_folder_without_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench().main(["--lm", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and f"--lm {tmp_path}: no config.json there" in capsys.readouterr().err
