"""The world build, at a seconds-long scale: the same bytes twice, and a build loads through the registry
with models.*_path like the shipped weights (the full build is `python -m tasks.world.build`)."""

from __future__ import annotations

import json

import pytest

from tasks.common.config import load_config
from tasks.world.build import BuildPlan, build_all

pytestmark = pytest.mark.component
TINY_PLAN = BuildPlan().scaled(0.004)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-build")
    first = build_all(root / "a", TINY_PLAN, log=lambda _: None)
    second = build_all(root / "b", TINY_PLAN, log=lambda _: None)
    return root, first, second


def test_a_build_is_deterministic(builds):
    root, first, second = builds
    assert first["files"] == second["files"]
    assert {
        "clip/open_clip_model.safetensors",
        "diffusion/unet/diffusion_pytorch_model.safetensors",
        "diffusion/vae/diffusion_pytorch_model.safetensors",
        "diffusion/text_encoder/model.safetensors",
        "lm/model.safetensors",
        "diffusion/model_index.json",
    } <= set(first["files"])
    assert json.loads((root / "a" / "build.json").read_text())["plan"]["unet_steps"] == TINY_PLAN.unet_steps


def test_a_build_loads_through_the_model_paths(builds):
    from tasks.common.models import load_clip, load_diffusion, load_lm
    from tasks.registry import stage_hash

    root, _, _ = builds
    cfg = load_config(
        "world",
        [
            f"models.diffusion_path={root / 'a' / 'diffusion'}",
            f"models.clip_path={root / 'a' / 'clip'}",
            f"models.lm_path={root / 'a' / 'lm'}",
        ],
    )
    comps = load_diffusion(cfg.models.diffusion, cfg.models.diffusion_path)
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size
    assert load_clip(cfg.models.clip, cfg.models.clip_path).image_size == 64
    load_lm(cfg.models.lm, cfg.models.lm_path)
    from tasks.world.weights import identity

    # the render hash covers the world weights' bytes (besides the path): two identical builds, one identity
    assert identity("diffusion", str(root / "a" / "diffusion")) == identity(
        "diffusion", str(root / "b" / "diffusion")
    )
    assert identity("diffusion", str(root / "a" / "diffusion")) != identity("diffusion")
    assert stage_hash(cfg, "render") != stage_hash(load_config("world"), "render")


def test_the_lm_loss_in_parts_is_the_whole_batch_loss_of_transformers():
    """lm_loss (parts of similar length, the head on the completions only) against LlamaForCausalLM's own
    loss on the batch padded as a whole: the same value and the same gradient."""
    import torch

    from tasks.world.build import lm_loss, world_lm

    model = world_lm(vocab=64, eos=0, seed=3)
    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(11):  # not a multiple of the parts
        prompt, completion = (torch.randint(0, 20, (2,), generator=gen) + torch.tensor([0, 1])).tolist()
        ids = torch.randint(1, 64, (prompt + completion,), generator=gen).tolist()
        batch.append((ids, [-100] * prompt + ids[prompt:]))
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (row, lab) in enumerate(batch):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = (
            torch.tensor(row),
            torch.tensor(lab),
            1,
        )
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert lm_loss(model, batch, pad=0, groups=4) == pytest.approx(reference.item(), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
