"""The ladder's image rungs against independent computations: SSIM by hand (numpy, Gaussian window) and
DINOv2's cosine through transformers' own image processor and model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.common.config import load_config
from tasks.common.models import load_dino
from tasks.scoring.image_rungs import DinoScorer, score_image_rungs, ssim

pytestmark = pytest.mark.component


def ssim_by_hand(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM: Gaussian-weighted local statistics in an 11x11 window at every pixel (the borders
    reflection-padded, torchmetrics' convention), averaged over pixels and channels."""
    radius = int(3.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()

    def blur(img: np.ndarray) -> np.ndarray:  # separable Gaussian, 'valid' region
        rows = np.stack([np.convolve(r, g, mode="valid") for r in img])
        return np.stack([np.convolve(c, g, mode="valid") for c in rows.T]).T

    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[0]):
        x_, y_ = (np.pad(img[ch].astype(np.float64), radius, mode="reflect") for img in (a, b))
        mx, my = blur(x_), blur(y_)
        vx, vy, cxy = blur(x_ * x_) - mx**2, blur(y_ * y_) - my**2, blur(x_ * y_) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one_and_matches_the_formula():
    torch.manual_seed(0)
    before = torch.rand(3, 3, 48, 40)
    after = (before + 0.15 * torch.randn_like(before)).clamp(0, 1)
    assert torch.allclose(ssim(before, before), torch.ones(3), atol=1e-6)
    got = ssim(before, after)
    for i in range(3):
        assert got[i].item() == pytest.approx(ssim_by_hand(before[i].numpy(), after[i].numpy()), abs=1e-5)
    assert (got < 0.9).all() and (ssim(before, torch.rand_like(before)) < 0.1).all()


@pytest.fixture(scope="module")
def dino():
    return load_dino("tiny")


def test_dino_similarity_is_the_cosine_of_the_models_own_pooled_embeddings(dino):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(dino.source)
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    after = np.clip(before.astype(int) + rng.integers(-40, 41, before.shape), 0, 255).astype(np.uint8)
    scorer = DinoScorer(dino)
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    got = scorer.similarity(to_tensor(before), to_tensor(after))
    with torch.no_grad():
        e0 = dino.model(**processor(images=list(before), return_tensors="pt")).pooler_output
        e1 = dino.model(**processor(images=list(after), return_tensors="pt")).pooler_output
    manual = torch.nn.functional.cosine_similarity(e0, e1)
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)
    assert torch.allclose(scorer.similarity(to_tensor(before), to_tensor(before)), torch.ones(4), atol=1e-5)
    # at another size the resize is torch's (bicubic, antialiased), the processor's PIL's: close, not equal
    big_b = np.repeat(np.repeat(before, 2, axis=1), 2, axis=2)[:, :96, :96]
    big_a = np.repeat(np.repeat(after, 2, axis=1), 2, axis=2)[:, :96, :96]
    with torch.no_grad():
        m0 = dino.model(**processor(images=list(big_b), return_tensors="pt")).pooler_output
        m1 = dino.model(**processor(images=list(big_a), return_tensors="pt")).pooler_output
    resized = scorer.similarity(to_tensor(big_b), to_tensor(big_a))
    torch.testing.assert_close(resized, torch.nn.functional.cosine_similarity(m0, m1), atol=2e-2, rtol=0)


def test_each_image_rung_scores_only_what_passed_the_rungs_below():
    cfg = load_config("demo", ["render.keep.dino_threshold=0.95"])
    torch.manual_seed(1)
    before = torch.rand(6, 3, 64, 64)
    after = before.clone()
    after[2:] = (after[2:] + 0.3 * torch.randn_like(after[2:])).clamp(0, 1)  # 0, 1 identical: DINO 1, SSIM 1
    rows = pd.DataFrame(
        {"clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.1, "clip_sim_image": 0.9}, index=range(6)
    )
    clip_passed = np.array([True, True, True, True, False, True])
    cols = score_image_rungs(rows, before, after, cfg, torch.device("cpu"), clip_passed)
    dino, s = cols["dino_similarity"], cols["ssim"]
    assert np.isnan(dino[4]) and np.isfinite(dino[[0, 1, 2, 3, 5]]).all()  # CLIP failed: never scored
    assert (
        dino[0] == pytest.approx(1.0, abs=1e-5)
        and cols["dino_model"][0] == "tiny"
        and cols["dino_model"][4] is None
    )
    scored = np.isfinite(s)
    assert (scored == (clip_passed & (np.nan_to_num(dino) >= 0.95))).all()  # SSIM only where DINOv2 passed
    assert s[0] == pytest.approx(1.0, abs=1e-6)
    off = load_config("demo", ["judges.dino.enabled=false", "judges.ssim.enabled=false"])
    none = score_image_rungs(rows, before, after, off, torch.device("cpu"), clip_passed)
    assert np.isnan(none["dino_similarity"]).all() and np.isnan(none["ssim"]).all()
