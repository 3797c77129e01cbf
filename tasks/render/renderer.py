"""The render stage's engine: models on the device, precision and compilation, batch size, CLIP scoring.

:class:`Renderer` loads the diffusion and CLIP models once per process and turns
:class:`~tasks.render.pairs.PairRequest` lists into scored pairs (:meth:`Renderer.render_scored`), scoring
the decoded tensors (no JPEG round trip). Speed switches, all faithful-off by default: ``render.dtype``,
``render.compile``, ``render.batch_samples: auto`` (halved on CUDA out-of-memory: :class:`BatchSizer`).

Each switch in full: docs/render.md ("In the code").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tasks.common.config import PipelineConfig, Selection
from tasks.common.devices import compute_dtype, torch_device
from tasks.common.models import MODELS, ClipComponents, DiffusionComponents, load_clip, load_diffusion
from tasks.common.selection import METRICS
from tasks.render.early import EarlyRejection, early_keep
from tasks.render.pairs import PairBatch, PairRequest, RenderSettings, render_pairs
from tasks.scoring.clip import ClipScorer

CPU_AUTO_BATCH = 8
log = logging.getLogger("editforge")


def is_oom(err: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class BatchSizer:
    """The number of samples per UNet batch; :meth:`shrink` halves it after an out-of-memory error."""

    def __init__(self, size: int, logger: logging.Logger | None = None):
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size
        self.halvings = 0
        self.logger = logger or log

    def shrink(self, err: BaseException) -> None:
        """Halve the batch after ``err`` (an OOM); re-raise it when the batch is already one sample."""
        if self.size == 1:
            raise err
        self.size //= 2
        self.halvings += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.logger.warning(
            "render: out of memory (%s) — batch halved to %d samples", str(err)[:120], self.size
        )


@dataclass
class ScoredBatch:
    """Rendered pairs and their final CLIP metrics (NaN for early-rejected samples)."""

    pairs: PairBatch
    metrics: dict[str, torch.Tensor]


def settings_from(cfg: PipelineConfig) -> RenderSettings:
    r = cfg.render
    return RenderSettings(
        steps=r.steps,
        height=r.height,
        width=r.width,
        cfg_range=tuple(r.cfg_range),
        p_range=tuple(r.p_range),
        attention=r.attention,
        guidance=r.guidance == "cfg",
    )


def placed_diffusion(
    cfg: PipelineConfig, device: torch.device, dtype: torch.dtype, compiled: bool, logger: logging.Logger
) -> DiffusionComponents:
    """The diffusion model on ``device`` in ``dtype`` (compiled UNet when asked), from the model cache."""
    m, r = cfg.models, cfg.render

    def load() -> DiffusionComponents:
        comps = load_diffusion(m.diffusion, m.diffusion_path, r.scheduler, m.vae_path).to(device, dtype)
        if comps.is_sdxl and dtype == torch.float16 and getattr(comps.vae.config, "force_upcast", False):
            comps.vae.to(torch.float32)  # the SDXL VAE overflows in float16 (diffusers upcasts it too)
        if compiled:
            comps.unet = torch.compile(comps.unet)
        return comps

    return MODELS.get(
        "diffusion",
        (m.diffusion, m.diffusion_path, m.vae_path, r.scheduler, str(device), str(dtype), compiled),
        load,
    )


def placed_clip(cfg: PipelineConfig, device: torch.device) -> ClipComponents:
    """The CLIP filter model (the scorer moves it to ``device``), from the model cache."""
    m = cfg.models

    return MODELS.get("clip", (m.clip, m.clip_path, str(device)), lambda: load_clip(m.clip, m.clip_path))


class Renderer:
    """The render engine over the process's cached models (see :data:`tasks.common.models.MODELS`)."""

    def __init__(self, cfg: PipelineConfig, logger: logging.Logger | None = None):
        logger = logger or log
        r = cfg.render
        self.device = torch_device(r.device, "render.device")
        self.dtype = compute_dtype(self.device, r.dtype)
        if r.dtype != str(self.dtype).removeprefix("torch."):
            logger.info("render: dtype %s applies on CUDA only; running float32 on %s", r.dtype, self.device)
        self.compiled = r.compile and self.device.type == "cuda"
        if r.compile and not self.compiled:
            logger.info("render: torch.compile applies on CUDA only; not compiling on %s", self.device)
        self.diffusion = placed_diffusion(cfg, self.device, self.dtype, self.compiled, logger)
        self.scorer = ClipScorer(placed_clip(cfg, self.device), self.device, resize=cfg.render.clip_resize)

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def score(
        self,
        before: torch.Tensor,
        after: torch.Tensor,
        input_captions: Sequence[str],
        output_captions: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """The filter's four CLIP metrics for N pairs (CPU float tensors)."""
        with self._autocast():
            metrics = self.scorer.score_pairs(before, after, input_captions, output_captions)
        return {k: v.detach().float().cpu() for k, v in metrics.items()}

    def render(
        self, requests: Sequence[PairRequest], settings: RenderSettings, early: EarlyRejection | None = None
    ) -> PairBatch:
        return render_pairs(
            self.diffusion,
            requests,
            settings,
            device=self.device,
            dtype=self.dtype,
            early=early,
            persistent_attention=self.compiled,
        )

    def render_scored(
        self,
        requests: Sequence[PairRequest],
        settings: RenderSettings,
        selection: Selection,
        early_after: int | None = None,
        early_margin: float = 0.05,
        early_metrics: Sequence[str] = METRICS,
        early_drop: bool = True,
    ) -> ScoredBatch:
        """Render and CLIP-score N samples; with ``early_after``, reject early at thresholds - margin
        (``early_drop=False``: score and record the early metrics, drop nothing)."""
        early = None
        if early_after is not None:

            def judge(indices: list[int], before: torch.Tensor, after: torch.Tensor):
                metrics = self.score(
                    before,
                    after,
                    [requests[i].input_caption for i in indices],
                    [requests[i].output_caption for i in indices],
                )
                keep = early_keep(metrics, selection, early_margin, early_metrics)
                return (keep if early_drop else torch.ones_like(keep)), metrics

            early = EarlyRejection(early_after, judge)
        pairs = self.render(requests, settings, early)
        n = len(requests)
        metrics = {k: torch.full((n,), float("nan")) for k in METRICS}
        alive = [i for i in range(n) if not pairs.early_rejected[i]]
        if alive:
            final = self.score(
                pairs.before[alive],
                pairs.after[alive],
                [requests[i].input_caption for i in alive],
                [requests[i].output_caption for i in alive],
            )
            for k in METRICS:
                metrics[k][alive] = final[k]
        return ScoredBatch(pairs, metrics)

    def auto_batch_samples(self, settings: RenderSettings, cap: int) -> int:
        """Samples per UNet batch that fit the free accelerator memory (at most ``cap``)."""
        if self.device.type != "cuda":
            return max(1, min(cap, CPU_AUTO_BATCH))
        probe = replace(settings, steps=1)
        eager = replace(self.diffusion, unet=getattr(self.diffusion.unet, "_orig_mod", self.diffusion.unet))
        peaks = []
        for n in (1, 2):  # eager UNet: probing must not trigger compilations
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            requests = [PairRequest(f"probe{i}", "a photo", "a photo", i) for i in range(n)]
            render_pairs(eager, requests, probe, device=self.device, dtype=self.dtype)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        free, _ = torch.cuda.mem_get_info(self.device)
        per_sample = max(peaks[1] - peaks[0], 1)
        fixed = max(peaks[0] - per_sample, 0)
        size = int((0.85 * free - fixed) // per_sample)
        log.info(
            "render: auto batch — %.0f MiB free, %.0f MiB per sample, %.0f MiB fixed -> %d samples (cap %d)",
            free / 2**20,
            per_sample / 2**20,
            fixed / 2**20,
            size,
            cap,
        )
        return max(1, min(cap, size))


def get_renderer(cfg: PipelineConfig, logger: logging.Logger | None = None) -> Renderer:
    """A Renderer for ``cfg`` over the cached models: a new selection, top-k or sampling setting reuses
    the loaded weights; only another model, device, dtype or compile setting loads again."""
    return Renderer(cfg, logger)
