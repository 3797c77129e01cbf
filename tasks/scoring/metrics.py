"""CLIP similarity metrics of the paper's filter, on embeddings (pure functions, batched).

With image embeddings I0, I1 (before/after) and text embeddings T0, T1 (input/output captions):
- clip_sim_0     = cos(I0, T0)           image vs its caption (threshold 0.2)
- clip_sim_1     = cos(I1, T1)
- clip_sim_image = cos(I0, I1)           image-image (threshold 0.75)
- clip_sim_dir   = cos(I1 - I0, T1 - T0) directional similarity (threshold 0.2, top-k by it)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) tensors."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def directional_similarity(
    image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor, text_1: torch.Tensor
) -> torch.Tensor:
    """cos(I1 - I0, T1 - T0): does the change between the images follow the change between the captions?"""
    return cosine(image_1.float() - image_0.float(), text_1.float() - text_0.float())


def clip_metrics(
    image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor, text_1: torch.Tensor
) -> dict[str, torch.Tensor]:
    """All four metrics for N pairs at once; inputs are (N, D) embeddings (normalised or not)."""
    return {
        "clip_sim_0": cosine(image_0, text_0),
        "clip_sim_1": cosine(image_1, text_1),
        "clip_sim_image": cosine(image_0, image_1),
        "clip_sim_dir": directional_similarity(image_0, image_1, text_0, text_1),
    }
