"""The stage registry: every stage once, what a partition needs, one hash recipe."""

import pytest

from tasks.common.config import load_config
from tasks.common.stage import GPU_TAG
from tasks.registry import stage_resources


def test_paper_holds_a_gpu_where_the_models_run():
    res = stage_resources(load_config("paper"))
    assert {s: r.gpus for s, r in res.items()} == {
        "captions": 0,
        "finetune": 1,
        "text": 1,
        "render": 1,
        "judge": 0,
        "filter": 0,
        "pack": 0,
        "train": 1,
    }
    assert "auto" in res["render"].batch and res["render"].tags() == [GPU_TAG]
    assert res["pack"].tags() == []  # a tag is a row in each of the task run's state events: only the GPU's


def test_resources_follow_the_config():
    demo = stage_resources(load_config("demo"))
    assert demo["render"].gpus == demo["text"].gpus == demo["train"].gpus == 0  # the demo runs on the CPU
    assert demo["render"].batch.startswith("4 samples")
    api = stage_resources(load_config("paper", ["text.backend=openai", "text.openai.concurrency=32"]))
    assert api["text"].gpus == api["finetune"].gpus == 0 and api["text"].batch == "32 requests in flight"


def test_records_form_a_dag_in_order_with_one_entry_shape():
    import inspect

    from tasks import registry

    names = list(registry.STAGES)
    assert names[:2] == ["captions", "finetune"] and names[-1] == "train"
    for i, (name, stage) in enumerate(registry.STAGES.items()):
        assert stage.name == name and all(names.index(u.name) < i for u in stage.reads), name
        params = list(inspect.signature(registry.entry(name)).parameters.values())
        assert [p.name for p in params[:2]] == ["cfg", "partition_id"], name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]) and "logger" in {p.name for p in params}, (
            name
        )
    assert [s.name for s in registry.chain()] == names[:-1]
    with pytest.raises(KeyError, match="unknown stage 'rendr'; expected one of captions, finetune"):
        registry.get("rendr")


def test_one_hash_recipe_leaves_out_operational_settings_everywhere():
    from tasks.registry import stage_hash

    base = load_config("paper")
    operational = load_config(
        "paper",
        [
            "render.device=cpu",
            "render.batch_samples=16",
            "render.compile=true",
            "text.device=cpu",
            "train.device=cpu",
            "text.openai.concurrency=3",
        ],
    )
    assert all(
        stage_hash(base, s) == stage_hash(operational, s) for s in ("finetune", "text", "render", "pack")
    )
    # a sampling setting re-generates triplets (and what follows) but never re-trains the LM
    hotter = load_config("paper", ["text.temperature=0.9"])
    assert stage_hash(hotter, "finetune") == stage_hash(base, "finetune")
    assert stage_hash(hotter, "text") != stage_hash(base, "text") and stage_hash(
        hotter, "pack"
    ) != stage_hash(base, "pack")
    # the openai fine-tune's hash ignores the local-only settings: no paid job over them
    api = ["text.backend=openai"]
    assert stage_hash(load_config("paper", api), "finetune") == stage_hash(
        load_config("paper", [*api, "text.finetune_steps=7"]), "finetune"
    )
    assert stage_hash(load_config("paper", ["text.finetune_steps=7"]), "finetune") != stage_hash(
        base, "finetune"
    )


def test_the_registry_and_the_light_stages_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, tasks.registry, tasks.pack.stage, tasks.filter.stage, tasks.estimate.model, "
        "tasks.render.scheduling, tasks.common.selection, tasks.common.layout; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_architecture_page_lists_every_stage_and_its_entry():
    from pathlib import Path

    from tasks import registry

    page = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    rows = {
        line.split("|")[1].strip(): line
        for line in page.splitlines()
        if line.startswith("| ") and "`tasks." in line
    }
    for name, stage in registry.STAGES.items():
        assert name in rows and f"`{stage.entry}`" in rows[name], f"docs/architecture.md stage table: {name}"
