"""Per-sample randomness for rendering before/after pairs, as in the paper's reference script.

The reference (`dataset_creation/generate_img_dataset.py` of instruct-pix2pix) renders up to 100
samples per triplet. For every sample it draws a 32-bit ``seed``, calls ``torch.manual_seed(seed)``
and then:

1. draws the initial latent noise ``x = randn(1, 4, 64, 64, device="cuda") * sigmas[0]`` and repeats
   it for both images of the pair (the CUDA generator);
2. draws the Prompt-to-Prompt threshold ``p = min_p2p + rand() * (max_p2p - min_p2p)`` and then the
   guidance scale ``cfg = min_cfg + rand() * (max_cfg - min_cfg)`` (the CPU generator: these are the
   first two CPU draws after seeding, because the noise went to the GPU generator);
3. samples with Euler ancestral steps whose fresh noise ``randn_like(x[:1])`` is shared by the two
   images of the pair.

Here the two streams are explicit and independent of the device: :func:`sample_params` uses a
fresh CPU ``torch.Generator`` seeded with ``seed`` (so ``p`` and ``cfg`` equal the reference's values
for the same seed), and :func:`pair_generators` gives two generators on the sampling device, both
seeded with ``seed``, one per image; advanced in lockstep they yield the same initial noise and the
same ancestral noise for both images (diffusers draws one tensor per batch element when given a list
of generators).

Unlike the reference (which draws seeds from a global RNG seeded with a random global seed), seeds
here are derived from the triplet's ``caption_id`` (:func:`tasks.render.seeds.sample_seeds`), so sample ``i`` of a triplet
has the same seed whatever the batching, the partitioning or the run: a re-run reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleParams:
    """What one sample of a triplet was rendered with (recorded in ``samples.parquet``)."""

    seed: int
    cfg_scale: float
    p2p_p: float


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = float(value[0]), float(value[1])
    if not low <= high:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return low, high


def sample_params(
    seed: int,
    cfg_range: tuple[float, float] = (7.5, 15.0),
    p_range: tuple[float, float] = (0.1, 0.9),
    branch: int = 0,
    branches: int = 1,
) -> SampleParams:
    """Draw ``p`` (fraction of steps with shared attention) then the CFG scale from ``seed``.

    Same values as the reference's ``torch.manual_seed(seed); p = ...rand()...; cfg = ...rand()...``
    (float32 uniform draws of the CPU generator, in that order).

    p-branching (``branches`` = K > 1, ``render.p_branches``): the seed renders K samples, one per
    ``branch`` 0..K-1, all with the seed's CFG scale (the second draw, as above) and stratified p values:
    ``p_b = p_min + (b + u_b) / K * (p_max - p_min)`` where ``u_0`` is the first draw (the one that is
    the reference's p when K = 1) and ``u_1 .. u_{K-1}`` are one ``torch.rand(K - 1)`` draw after the CFG
    scale's. So branch b's p
    lies in the b-th of K equal slices of ``p_range`` (branches sorted by p), every value is a pure
    function of the seed, and K = 1 gives exactly the reference's p.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= branch < branches:
        raise ValueError(f"branch {branch} outside 0..{branches - 1}")
    cfg_min, cfg_max = _check_range("cfg_range", cfg_range)
    p_min, p_max = _check_range("p_range", p_range)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand((), generator=generator).item()
    cfg = cfg_min + torch.rand((), generator=generator).item() * (cfg_max - cfg_min)
    if branches == 1:
        return SampleParams(seed=int(seed), cfg_scale=cfg, p2p_p=p_min + u * (p_max - p_min))
    if branch:
        u = torch.rand(branches - 1, generator=generator)[branch - 1].item()
    p = p_min + (branch + u) / branches * (p_max - p_min)
    return SampleParams(seed=int(seed), cfg_scale=cfg, p2p_p=min(p, p_max))


def pair_generators(seed: int, device: str | torch.device = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """Two generators on ``device`` seeded with ``seed``: one for the before, one for the after image.

    Both start in the same state; as long as each draws the same shapes (initial noise, then one
    ancestral noise tensor per step) they stay in lockstep and give the two images identical noise.
    They are independent of the CPU generator used by :func:`sample_params`.
    """
    device = torch.device(device)
    return (
        torch.Generator(device=device).manual_seed(int(seed)),
        torch.Generator(device=device).manual_seed(int(seed)),
    )


def batch_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per latent in pair order ``[before_0, after_0, before_1, after_1, ...]``."""
    return [g for seed in seeds for g in pair_generators(seed, device)]
