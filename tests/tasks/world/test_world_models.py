"""The shipped world models: loaded through the model registry like real local weights, and meaningful —
Prompt-to-Prompt sharing keeps the pair together, the CLIP's directional similarity picks the right edit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tasks.common.config import load_config
from tasks.common.models import load_clip, load_diffusion, load_lm
from tasks.scoring.metrics import clip_metrics
from tasks.world.build import _clip_model, file_hashes
from tasks.world.clip_text import check_same_hidden_states
from tasks.world.edits import EDIT_KINDS, wrong_edit
from tasks.world.evaluate import balanced_triplets, ground_truth_metrics, render_triplets
from tasks.world.weights import MANIFEST, identity, model_dir, weights_dir

pytestmark = pytest.mark.component
SAMPLES = 4


@pytest.fixture(scope="module")
def cfg():
    return load_config("world", ["render.batch_samples=8"])


@pytest.fixture(scope="module")
def triplets():
    return balanced_triplets(seed=5, per_kind=2)  # a world seed the models never trained on


@pytest.fixture(scope="module")
def rendered(cfg, triplets):
    """The same seeds rendered with shared attention (ip2p) and as independent generations (none)."""
    from tasks.render.renderer import Renderer

    renderer = Renderer(cfg)
    images: list = []
    shared = render_triplets(cfg, triplets, SAMPLES, renderer=renderer, images=images)
    independent = render_triplets(cfg, triplets, SAMPLES, attention="none", renderer=renderer)
    return shared, independent, images, renderer


def test_world_models_load_through_the_registry_like_any_local_folder(tmp_path):
    comps = load_diffusion("world")
    assert comps.source == str(model_dir("diffusion"))
    assert comps.scheduler.config.prediction_type == "v_prediction" and comps.vae_scale_factor == 4
    assert {type(comps.unet).__name__, type(comps.text_encoder).__name__} == {"UNet2DConditionModel", "CLIPTextModel"}
    clip = load_clip("world")
    assert clip.source == f"local-dir:{model_dir('clip')}" and clip.image_size == 64
    model, tokenizer = load_lm("world")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token == "<|endoftext|>"
    # the diffusion model's text encoder is the filter CLIP's text tower (as SD 1.5's is OpenAI CLIP's)
    open_clip_model, _ = _clip_model(model_dir("clip"))
    check_same_hidden_states(open_clip_model, comps.text_encoder, comps.tokenizer,
                             ["a red circle and a small blue square on a green background, flat style"], atol=1e-4)
    # a copy elsewhere loads through models.diffusion_path, the path for real weights
    copy = shutil.copytree(model_dir("diffusion"), tmp_path / "diffusion")
    other = load_diffusion("world", str(copy))
    assert other.source == str(copy)
    assert torch.equal(other.unet.conv_in.weight, comps.unet.conv_in.weight)


def test_manifest_lists_every_shipped_file_and_names_the_stage_versions():
    manifest = json.loads((weights_dir() / MANIFEST).read_text())
    assert manifest["files"] == file_hashes(weights_dir())
    assert set(manifest["seconds"]) >= {"clip", "vae", "unet", "lm", "total"}
    world, tiny = load_config("world"), load_config("demo")
    from tasks.registry import stage_hash

    assert identity("diffusion") != identity("clip")
    assert stage_hash(world, "render") != stage_hash(load_config("world", ["models.diffusion_path=/elsewhere"]), "render")
    assert "world_models" not in json.dumps(stage_hash(tiny, "render"))


def _sharing_gain(rendered) -> np.ndarray:
    shared, independent, _, _ = rendered
    assert list(shared["seed"]) == list(independent["seed"])  # the same noise, pair by pair
    return shared["clip_sim_image"].to_numpy() - independent["clip_sim_image"].to_numpy()


def test_shared_attention_is_applied_and_costs_no_image_similarity(rendered):
    shared, independent, _, _ = rendered
    assert np.array_equal(shared["clip_sim_0"], independent["clip_sim_0"])  # the before image is never touched
    assert not np.array_equal(shared["clip_sim_1"], independent["clip_sim_1"])  # the after image is
    assert _sharing_gain(rendered).mean() > -0.02


@pytest.mark.xfail(strict=True, reason="measured on the shipped world UNet: ip2p sharing leaves image-image "
                   "similarity where independent sampling from the same noise puts it (mean -0.005, 49% of 640 pairs "
                   "higher; bench/world_pass_rates.py), and the pair's pixel RMSE / SSIM do not move either. The captions "
                   "do not place the shapes, so the layout comes from the noise: one noise already gives the pair a "
                   "shared layout (pixel RMSE 0.255 vs 0.310 from different noise), and the world CLIP barely sees "
                   "layout (image-image 0.646 vs 0.633). The UNet's self-attention maps are near-uniform (entropy "
                   "0.85-0.99 of uniform); a 1-head UNet with attention at 16x16 too (2400 steps) did no better")
def test_shared_attention_raises_image_similarity_over_independent_sampling(rendered):
    gain = _sharing_gain(rendered)
    assert gain.mean() > 0.02 and (gain > 0).mean() > 0.6, (gain.mean(), (gain > 0).mean())


def test_directional_similarity_ranks_the_right_edit_above_a_wrong_one(cfg, triplets, rendered):
    shared, _, images, renderer = rendered
    before = torch.stack([b for b, _ in images])
    after = torch.stack([a for _, a in images])
    wrong = {t.input + t.output: wrong_edit(t, seed=1).output for t in triplets}
    with torch.inference_mode():
        i0, i1 = renderer.scorer.embed_images(before), renderer.scorer.embed_images(after)
        t0 = renderer.scorer.embed_texts(list(shared["input"]))
        right = renderer.scorer.embed_texts(list(shared["output"]))
        other = renderer.scorer.embed_texts([wrong[a + b] for a, b in zip(shared["input"], shared["output"])])
    dir_right = clip_metrics(i0, i1, t0, right)["clip_sim_dir"].numpy()
    dir_wrong = clip_metrics(i0, i1, t0, other)["clip_sim_dir"].numpy()
    assert np.allclose(dir_right, shared["clip_sim_dir"], atol=1e-5)
    by_triplet = (dir_right - dir_wrong).reshape(len(triplets), SAMPLES).mean(1)
    assert (by_triplet > 0).mean() >= 0.7, by_triplet


def test_clip_reads_the_worlds_drawn_pairs(cfg):
    truth = ground_truth_metrics(cfg, balanced_triplets(seed=5, per_kind=4))
    assert set(truth["kind"]) == set(EDIT_KINDS)
    assert (truth["clip_sim_0"] > 0.2).mean() > 0.95 and (truth["clip_sim_dir"] > 0.2).mean() > 0.9


def test_a_branched_world_sample_equals_its_independent_render(cfg, triplets, rendered):
    """p-branching on the world models: each branch of a seed is the sample rendered alone with that seed,
    cfg and p (one tree of 4 branches vs 4 separate renders)."""
    from tasks.render.pairs import PairRequest
    from tasks.render.renderer import settings_from

    renderer = rendered[3]
    settings = settings_from(cfg)
    t = triplets[0]
    tree = [PairRequest("w", t.input, t.output, 4321, b, 4) for b in range(4)]
    together = renderer.render(tree, settings)
    assert sum(together.unet_steps) < 4 * cfg.render.steps  # the before image and the trunk ran once
    for b, request in enumerate(tree):
        alone = renderer.render([request], settings)
        assert alone.params[0] == together.params[b]
        assert (alone.before[0] - together.before[b]).abs().max() < 1e-4  # batching's float noise only
        assert (alone.after[0] - together.after[b]).abs().max() < 1e-4
    # and the branches are different samples (p differs), not one image four times
    assert (together.after[0] - together.after[3]).abs().max() > 1e-2
