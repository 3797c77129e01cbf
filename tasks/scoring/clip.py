"""CLIP scoring on decoded image tensors (no JPEG round trip), batched, with open_clip.

Images are embedded in batches of the cohort rendered together; captions one at a time (cached), so
that a caption's embedding is the same whichever cohort first needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tasks.common.models import ClipComponents
from tasks.scoring.metrics import clip_metrics

# reference: the whole image bicubic-resized to the CLIP input size, no antialiasing, no crop — the
#   reference's ClipSimilarity.encode_image, which the paper's thresholds were set with;
# antialias: short side resized with antialiasing, centre crop (closer to CLIP's own PIL preprocessing).
RESIZE_MODES = ("reference", "antialias")
TEXT_CACHE_SIZE = 4096  # caption embeddings kept per process (one partition's captions, a few MB)


class ClipScorer:
    """Embeds images in [0, 1] (N, 3, H, W) and captions, and computes the filter's metrics."""

    def __init__(
        self,
        clip: ClipComponents,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        resize: str = "reference",
    ):
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown CLIP resize {resize!r}; expected one of {RESIZE_MODES}")
        self.clip = clip
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize = resize
        self.model = clip.model.to(self.device)
        self._mean = torch.tensor(clip.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.std, device=self.device).view(1, 3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to CLIP's input: resized (see ``RESIZE_MODES``) and normalised."""
        size = self.clip.image_size
        x = images.to(self.device, torch.float32)
        if self.resize == "reference":
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            return (x - self._mean) / self._std
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(
                0, 1
            )
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = [
            self.model.encode_image(self.preprocess(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Caption embeddings, each computed alone: a caption's floats never depend on which others
        shared its batch, so a resumed run (new process, empty cache) scores exactly as before."""
        for text in dict.fromkeys(texts):
            if text not in self._text_cache:
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))  # the oldest
                tokens = self.clip.tokenizer([text]).to(self.device)
                self._text_cache[text] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]
        return torch.stack([self._text_cache[t] for t in texts])

    def score_pairs(
        self,
        before: torch.Tensor,
        after: torch.Tensor,
        input_captions: Sequence[str],
        output_captions: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """The four filter metrics for N (before, after) pairs and their captions."""
        images = self.embed_images(torch.cat([before, after]))
        i0, i1 = images[: len(before)], images[len(before) :]
        return clip_metrics(i0, i1, self.embed_texts(input_captions), self.embed_texts(output_captions))
