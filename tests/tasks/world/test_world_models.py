"""The shipped world models: loaded through the model registry like real local weights, and meaningful —
Prompt-to-Prompt sharing keeps the pair together (measured against independent generations from the same
noise), the CLIP's directional similarity picks the right edit."""

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
from tasks.world.weights import MANIFEST, identity, model_dir, weights_dir
from tasks.world_eval.evaluate import (
    SHARING_METRICS,
    balanced_triplets,
    ground_truth_metrics,
    sharing_pairs,
    sharing_summary,
)

pytestmark = pytest.mark.component
SAMPLES = 5  # x 40 triplets: 200 pairs from the same noise


@pytest.fixture(scope="module")
def cfg():
    return load_config("world", ["render.batch_samples=25"])


@pytest.fixture(scope="module")
def triplets():
    return balanced_triplets(seed=5, per_kind=8)  # a world seed the models never trained on


@pytest.fixture(scope="module")
def rendered(cfg, triplets):
    """The same seeds (p ~ U(0.1, 0.9), cfg ~ the preset's range) rendered with shared attention (ip2p) and as
    independent generations (none), and the pairs' closeness in both arms."""
    from tasks.render.renderer import Renderer

    renderer = Renderer(cfg)
    arms: dict = {}
    pairs = sharing_pairs(cfg, triplets, SAMPLES, renderer=renderer, images=arms)
    (shared, images), (independent, _) = arms["shared"], arms["none"]
    return shared, independent, images, renderer, pairs


def test_world_models_load_through_the_registry_like_any_local_folder(tmp_path):
    comps = load_diffusion("world")
    assert comps.source == str(model_dir("diffusion"))
    assert comps.scheduler.config.prediction_type == "v_prediction" and comps.vae_scale_factor == 4
    assert {type(comps.unet).__name__, type(comps.text_encoder).__name__} == {
        "UNet2DConditionModel",
        "CLIPTextModel",
    }
    clip = load_clip("world")
    assert clip.source == f"local-dir:{model_dir('clip')}" and clip.image_size == 64
    model, tokenizer = load_lm("world")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token == "<|endoftext|>"
    # the diffusion model's text encoder is the filter CLIP's text tower (as SD 1.5's is OpenAI CLIP's)
    open_clip_model, _ = _clip_model(model_dir("clip"))
    check_same_hidden_states(
        open_clip_model,
        comps.text_encoder,
        comps.tokenizer,
        ["a red circle and a small blue square on a green background, flat style"],
        atol=1e-4,
    )
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
    assert stage_hash(world, "render") != stage_hash(
        load_config("world", ["models.diffusion_path=/elsewhere"]), "render"
    )
    assert "world_models" not in json.dumps(stage_hash(tiny, "render"))


def test_shared_attention_is_applied_to_the_after_image_only(rendered):
    shared, independent, *_ = rendered
    assert list(shared["seed"]) == list(independent["seed"])  # the same noise, pair by pair
    assert np.allclose(
        shared["clip_sim_0"], independent["clip_sim_0"], atol=1e-5
    )  # the before image: untouched
    assert not np.allclose(shared["clip_sim_1"], independent["clip_sim_1"], atol=1e-3)  # the after image: not


def test_shared_attention_raises_image_similarity_over_independent_sampling(rendered):
    """The paper's premise on the world: from the same noise, the after image with the before image's
    self-attention shared for the first p of the steps stays closer to the before image than an independent
    generation — under the world CLIP, SSIM and pixel RMSE, each significant by a paired sign test over 200
    pairs — and the more so the larger p."""
    pairs = rendered[-1]
    assert len(pairs) >= 200
    summary = sharing_summary(pairs)
    for metric in SHARING_METRICS:
        m = summary["metrics"][metric]
        assert m["mean_gain"] > 0 and m["sign_test_p"] < 0.01, (metric, m)
    quarters = summary["by_p_quarter"]
    assert all(q["pairs"] >= 30 for q in quarters), quarters
    for metric in SHARING_METRICS:  # the effect grows with p: the last quarter of [0.1, 0.9] gains most
        gains = [q[f"{metric}_mean_gain"] for q in quarters]
        assert gains[3] > gains[0] and gains[3] == max(gains), (metric, gains)


def test_directional_similarity_ranks_the_right_edit_above_a_wrong_one(cfg, triplets, rendered):
    shared, _, images, renderer, _ = rendered
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
