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
