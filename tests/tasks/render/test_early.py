"""Early rejection: x0 prediction, threshold rule, batch compaction (surviving samples unchanged)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from tasks.common.config import Selection
from tasks.common.models import load_diffusion, make_scheduler
from tasks.render.early import (
    METRICS,
    EarlyRejection,
    early_keep,
    early_step_count,
    predict_x0,
    select_scheduler_rows,
)
from tasks.render.pairs import PairRequest, RenderSettings, render_pairs

pytestmark = pytest.mark.component

STEPS, SIZE, AFTER = 6, 64, 2
REQUESTS = [
    PairRequest(f"t{i}", f"a photo of a cat {i}", f"a photo of a dog {i}", 1000 + 17 * i) for i in range(4)
]


@pytest.fixture(scope="module")
def components():
    return load_diffusion("tiny")


def settings(**kw):
    return RenderSettings(steps=STEPS, height=SIZE, width=SIZE, **kw)


def rejecting(reject: set[int], seen: list):
    """A judge that drops the given request indexes and reports metrics = request index."""

    def judge(indices, before, after):
        seen.append((list(indices), before.shape, after.shape, float(before.min()), float(after.max())))
        value = torch.tensor(indices, dtype=torch.float32)
        return torch.tensor([i not in reject for i in indices]), {m: value + k for k, m in enumerate(METRICS)}

    return judge


def test_early_step_count():
    assert early_step_count(None, 100) is None and early_step_count(0.5, 1) is None
    assert early_step_count(0.5, 100) == 50 and early_step_count(0.3, 25) == 8
    assert early_step_count(0.001, 10) == 1 and early_step_count(0.999, 10) == 9
    with pytest.raises(ValueError):
        early_step_count(1.0, 10)


def test_early_keep_is_threshold_minus_margin():
    cfg = Selection(clip_image_threshold=0.75, clip_caption_threshold=0.2, clip_direction_threshold=0.2)
    metrics = {
        "clip_sim_image": torch.tensor([0.80, 0.71, 0.69, 0.90]),
        "clip_sim_0": torch.tensor([0.30, 0.30, 0.30, 0.14]),
        "clip_sim_1": torch.tensor([0.30, 0.30, 0.30, 0.30]),
        "clip_sim_dir": torch.tensor([0.16, 0.30, 0.30, 0.30]),
    }
    assert early_keep(metrics, cfg, 0.05).tolist() == [True, True, False, False]
    assert early_keep(metrics, cfg, 0.0).tolist() == [False, False, False, False]
    assert early_keep(metrics, cfg, 0.05, ["clip_sim_dir"]).tolist() == [True] * 4
    assert early_keep(metrics, cfg, 0.0, ["clip_sim_dir"]).tolist() == [False, True, True, True]
    with pytest.raises(ValueError):
        early_keep(metrics, cfg, 0.0, ["bogus"])


def test_predict_x0_formula_matches_scheduler(components):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(make_scheduler("ddim", components.source).config, clip_sample=False)
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    torch.manual_seed(0)
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = ddim.step(eps, t, sample)
    formula = predict_x0(ddim, SimpleNamespace(), eps, sample, t)
    torch.testing.assert_close(formula, out.pred_original_sample, atol=1e-5, rtol=1e-5)
    assert predict_x0(ddim, out, eps, sample, t) is out.pred_original_sample
    with pytest.raises(ValueError):  # k-diffusion latents (init_noise_sigma > 1) need the scheduler's own x0
        predict_x0(components.scheduler, SimpleNamespace(), eps, sample, t)


def test_select_scheduler_rows_indexes_multistep_state():
    state = SimpleNamespace(
        model_outputs=[None, torch.arange(6.0).view(6, 1, 1, 1)],
        last_sample=torch.zeros(6, 1, 1, 1),
        sigmas=torch.arange(6.0),
        other=torch.zeros(4, 1, 1, 1),
    )
    select_scheduler_rows(state, torch.tensor([0, 1, 4, 5]), 6)
    assert state.model_outputs[0] is None and state.model_outputs[1].flatten().tolist() == [0, 1, 4, 5]
    assert state.last_sample.shape[0] == 4 and state.sigmas.shape[0] == 6 and state.other.shape[0] == 4


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m", "unipc"])
def test_rejected_samples_leave_the_batch_survivors_unchanged(components, scheduler):
    comps = components
    if scheduler != "euler_ancestral":
        comps = dataclasses.replace(components, scheduler=make_scheduler(scheduler, components.source))
    full = render_pairs(comps, REQUESTS, settings())
    seen, widths = [], []
    early = EarlyRejection(AFTER, rejecting({1, 2}, seen))
    cut = render_pairs(
        comps, REQUESTS, settings(), early=early, step_callback=lambda i, t, x: widths.append(len(x))
    )
    assert cut.early_rejected == [False, True, True, False]
    assert cut.unet_steps == [STEPS, AFTER, AFTER, STEPS] and cut.unet_calls == 2 * STEPS + 2 * AFTER
    assert full.unet_steps == [STEPS] * 4 and full.early_rejected == [False] * 4
    assert widths == [8] * (AFTER - 1) + [4] * (STEPS - AFTER + 1)  # survivors only, from the scoring step on
    assert (
        seen[0][:3] == ([0, 1, 2, 3], (4, 3, SIZE, SIZE), (4, 3, SIZE, SIZE))
        and 0 <= seen[0][3]
        and seen[0][4] <= 1
    )
    assert cut.early_metrics["clip_sim_0"].tolist() == [0, 1, 2, 3]  # every scored sample's early metrics
    assert torch.isnan(cut.before[[1, 2]]).all() and torch.isnan(cut.after[[1, 2]]).all()
    for i in (0, 3):
        assert cut.params[i] == full.params[i]
        torch.testing.assert_close(cut.before[i], full.before[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cut.after[i], full.after[i], atol=1e-5, rtol=0)


def test_everything_rejected_stops_the_loop(components):
    seen = []
    cut = render_pairs(
        components, REQUESTS[:2], settings(), early=EarlyRejection(AFTER, rejecting({0, 1}, seen))
    )
    assert cut.early_rejected == [True, True] and cut.unet_steps == [AFTER, AFTER]
    assert torch.isnan(cut.before).all() and len(seen) == 1
    with pytest.raises(ValueError):
        render_pairs(components, REQUESTS[:1], settings(), early=EarlyRejection(STEPS, rejecting(set(), [])))
