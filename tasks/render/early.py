"""Early rejection: score the predicted clean images at an intermediate step and drop hopeless samples.

After ``after_steps`` steps the x0 prediction of every sample still in the batch is decoded and
CLIP-scored; a sample below ``render.keep``'s thresholds minus a margin leaves the batch. Survivors are
untouched (their images equal a run without early rejection, up to float reassociation); every scored
sample's early metrics are recorded so the margin can be calibrated (:mod:`tasks.render.calibrate`).
Pieces: :func:`early_step_count`, :func:`predict_x0`, :func:`select_scheduler_rows`, :func:`early_keep`.

In full: docs/render.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tasks.common.config import Selection
from tasks.common.selection import METRICS, thresholds

# judge(sample indices in the request list, before images, after images) -> (keep (n,) bool, metrics)
Judge = Callable[[list[int], torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class EarlyRejection:
    """Score after ``after_steps`` denoising steps (1 <= after_steps < steps) with ``judge``."""

    after_steps: int
    judge: Judge


def early_step_count(fraction: float | None, steps: int) -> int | None:
    """Steps to run before scoring: ``round(fraction * steps)`` clipped to ``[1, steps - 1]``.

    None (no early rejection) when ``fraction`` is None or there is no intermediate step (steps < 2).
    """
    if fraction is None or steps < 2:
        return None
    if not 0 < fraction < 1:
        raise ValueError(f"early rejection fraction must be in (0, 1), got {fraction}")
    return min(steps - 1, max(1, round(fraction * steps)))


def predict_x0(
    scheduler: Any, step_output: Any, model_output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The predicted clean latents of the step that turned ``sample`` (at ``timestep``) into the output.

    Uses the scheduler's own ``pred_original_sample`` when its step returns one (Euler, Euler
    ancestral, DDIM, LMS, Heun...), or ``denoised`` (LCM). Otherwise (DPM-Solver++, UniPC: variance-preserving latents,
    ``init_noise_sigma == 1``) computes it from ``alphas_cumprod[t]`` and the prediction type:
    epsilon ``(x - sqrt(1-a) eps) / sqrt(a)``, v ``sqrt(a) x - sqrt(1-a) v``, sample ``model_output``.
    """
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is None:
        x0 = getattr(step_output, "denoised", None)  # LCMScheduler's output (its consistency-model x0)
    if x0 is not None:
        return x0
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0 or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"cannot predict x0 for {type(scheduler).__name__}: its step returns no "
            "pred_original_sample and its latents are not variance-preserving"
        )
    alpha = scheduler.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
    x, out = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - alpha).sqrt() * out) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * out
    if kind == "sample":
        return out
    raise ValueError(f"unknown prediction_type {kind!r}")


def _is_rows(value: Any, n_rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == n_rows


def select_scheduler_rows(scheduler: Any, rows: torch.Tensor, n_rows: int) -> None:
    """Keep latent rows ``rows`` (an index) in a scheduler's per-sample state, in place.

    Multistep solvers keep earlier model outputs (DPM-Solver++ ``model_outputs``, UniPC
    ``model_outputs``/``last_sample``, Heun ``sample``/``prev_derivative``, LMS ``derivatives``): every
    attribute, or list entry, that is a latent-shaped (``n_rows``, C, h, w) tensor is indexed. Sigmas and
    timesteps are 1-D and shared by all rows; Euler (ancestral) and DDIM keep no per-sample state.
    """
    for name, value in list(vars(scheduler).items()):
        if _is_rows(value, n_rows):
            setattr(scheduler, name, value[rows.to(value.device)])
        elif isinstance(value, list) and any(_is_rows(v, n_rows) for v in value):
            setattr(scheduler, name, [v[rows.to(v.device)] if _is_rows(v, n_rows) else v for v in value])


def early_keep(
    metrics: Mapping[str, torch.Tensor], cfg: Selection, margin: float, used: Sequence[str] = METRICS
) -> torch.Tensor:
    """Bool (n,): keep a sample unless one of the ``used`` early metrics is below threshold - margin."""
    limits = thresholds(cfg)
    unknown = set(used) - set(limits)
    if unknown:
        raise ValueError(f"unknown early-rejection metrics {sorted(unknown)}; expected some of {METRICS}")
    n = len(next(iter(metrics.values())))
    keep = torch.ones(n, dtype=torch.bool)
    for name in used:
        keep &= metrics[name].detach().float().cpu() >= limits[name] - margin
    return keep
