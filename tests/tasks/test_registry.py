"""The stage registry: every stage once, what a partition needs, one hash recipe."""

from tasks.common.config import load_config
from tasks.common.stage import GPU_TAG
from tasks.registry import stage_resources


def test_paper_holds_a_gpu_where_the_models_run():
    res = stage_resources(load_config("paper"))
    assert {s: r.gpus for s, r in res.items()} == {
        "captions": 0, "finetune": 1, "text": 1, "render": 1, "filter": 0, "pack": 0, "train": 1}
    assert "auto" in res["render"].batch and GPU_TAG in res["render"].tags("render")
    assert res["pack"].tags("pack") == ["editforge", "editforge-pack"]


def test_resources_follow_the_config():
    demo = stage_resources(load_config("demo"))
    assert demo["render"].gpus == demo["text"].gpus == demo["train"].gpus == 0  # the demo runs on the CPU
    assert demo["render"].batch.startswith("4 samples")
    api = stage_resources(load_config("paper", ["text.backend=openai", "text.openai.concurrency=32"]))
    assert api["text"].gpus == api["finetune"].gpus == 0 and api["text"].batch == "32 requests in flight"
