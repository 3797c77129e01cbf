"""Stages declare what one partition needs; the flows turn it into Prefect tags."""

import pytest
import torch

from tasks.common.config import load_config
from tasks.common.models import torch_device
from tasks.common.resources import GPU_TAG, stage_resources


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_names_the_setting():
    assert torch_device("auto", "text.device").type == "cpu"
    with pytest.raises(ValueError, match=r"text\.device=cuda.*no CUDA device"):
        torch_device("cuda", "text.device")
