"""The image rungs of the judge ladder, run by render on the decoded tensors right after CLIP scoring.

- DINOv2 image similarity (UltraEdit's gate): cos of the pooled output (the layer-normed CLS token) of
  ``transformers.Dinov2Model`` for the before and the after image, each preprocessed as the model's image
  processor declares (short side resized bicubic with antialiasing, centre crop, ImageNet mean/std);
- SSIM(before, after): torchmetrics' structural similarity (Gaussian window, sigma 1.5 -> 11x11, data
  range 1), per pair, averaged over the channels and every pixel (the borders reflection-padded, as
  torchmetrics does; scikit-image leaves the border windows out, which differs by ~1e-3).

Each rung scores only the samples that passed the rungs below it (:func:`score_image_rungs`); the others
keep NaN, as the selection (:mod:`tasks.common.selection`) expects. Scores depend only on a sample's own
images (batching does not change which samples are scored together: a cohort's), so a resumed render
scores as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tasks.common.config import PipelineConfig
from tasks.common.models import MODELS, DinoComponents, load_dino
from tasks.common.selection import DINO, IMAGE_RUNGS, SSIM, passes

SSIM_LIBRARY = "torchmetrics.functional.structural_similarity_index_measure"


class DinoScorer:
    """DINOv2 embeddings of images in [0, 1] (N, 3, H, W) and the before/after cosine."""

    def __init__(self, dino: DinoComponents, device: str | torch.device = "cpu", batch_size: int = 32):
        self.dino = dino
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = dino.model.to(self.device)
        self._mean = torch.tensor(dino.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(dino.std, device=self.device).view(1, 3, 1, 1)

    @property
    def name(self) -> str:
        return self.dino.preset if self.dino.preset != "tiny" else "tiny (random-init)"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Short side to ``resize`` (bicubic, antialiased), centre crop, normalised."""
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.dino.resize / min(h, w)
        nh, nw = max(self.dino.crop[0], round(h * scale)), max(self.dino.crop[1], round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(
                0, 1
            )
        ch, cw = self.dino.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = [
            self.model(pixel_values=self.preprocess(images[i : i + self.batch_size])).pooler_output
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out).float()

    def similarity(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """cos(DINOv2(before), DINOv2(after)) for N pairs (CPU float)."""
        emb = self.embed(torch.cat([before, after]))
        return F.cosine_similarity(emb[: len(before)], emb[len(before) :], dim=-1, eps=1e-8).cpu()


def ssim(
    before: torch.Tensor, after: torch.Tensor, sigma: float = 1.5, size: int | None = None
) -> torch.Tensor:
    """SSIM of N pairs of images in [0, 1] (torchmetrics, Gaussian window), one value per pair (CPU float)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = before.float().clamp(0, 1), after.float().clamp(0, 1)
    if size is not None and a.shape[-2:] != (size, size):
        a = F.interpolate(a, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
        b = F.interpolate(b, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    values = structural_similarity_index_measure(
        b, a, gaussian_kernel=True, sigma=sigma, data_range=1.0, reduction="none"
    )
    return values.reshape(len(a)).float().cpu()


def dino_scorer(cfg: PipelineConfig, device: torch.device) -> DinoScorer:
    """The DINOv2 rung's scorer over the process's model cache (one DINOv2 per process, like CLIP)."""
    m = cfg.models
    comps = MODELS.get("dino", (m.dino, m.dino_path, str(device)), lambda: load_dino(m.dino, m.dino_path))
    return DinoScorer(comps, device, cfg.judges.dino.batch_size)


def score_image_rungs(
    rows: pd.DataFrame,
    before: torch.Tensor,
    after: torch.Tensor,
    cfg: PipelineConfig,
    device: torch.device,
    passed_so_far: np.ndarray,
) -> dict[str, np.ndarray]:
    """The enabled image rungs' columns for one cohort, in ladder order: each rung scores the rows that
    passed every rung below it (``passed_so_far``: CLIP's verdict), NaN elsewhere."""
    n = len(rows)
    columns: dict[str, np.ndarray] = {DINO: np.full(n, np.nan), SSIM: np.full(n, np.nan)}
    columns["dino_model"] = np.full(n, None, dtype=object)
    alive = np.asarray(passed_so_far, dtype=bool).copy()
    enabled = cfg.judges.image_rungs()
    keep = cfg.render.keep
    for rung in IMAGE_RUNGS:
        if rung not in enabled or not alive.any():
            continue
        idx = np.flatnonzero(alive)
        if rung == "dino":
            scorer = dino_scorer(cfg, device)
            columns[DINO][idx] = scorer.similarity(before[idx], after[idx]).numpy().astype(float)
            columns["dino_model"][idx] = cfg.models.dino_path or cfg.models.dino
        else:
            s = cfg.judges.ssim
            columns[SSIM][idx] = ssim(before[idx], after[idx], s.sigma, s.size).numpy().astype(float)
        alive &= passes(
            pd.DataFrame(
                {k: v for k, v in columns.items() if k != "dino_model"}
                | {
                    m: rows[m].to_numpy(dtype=float)
                    for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
                }
            ),
            keep,
            _upto(enabled, rung),
        ).to_numpy()
    return columns


def _upto(enabled: Sequence[str], rung: str) -> tuple[str, ...]:
    """CLIP and the enabled image rungs up to ``rung``."""
    return ("clip", *[r for r in IMAGE_RUNGS[: IMAGE_RUNGS.index(rung) + 1] if r in enabled])
