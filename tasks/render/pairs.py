"""Render before/after image pairs with shared attention: many samples in one denoising loop.

Reference behaviour (instruct-pix2pix ``dataset_creation/generate_img_dataset.py``), per sample:
initial noise from the sample's seed, identical for both images; ``p`` and the CFG scale drawn from
the same seed; Euler-ancestral sampling (k-diffusion) of the batch
``[uncond-before, uncond-after, cond-before, cond-after]`` with ``eps = u + cfg * (c - u)``, the
unconditional prompt being "", the before image conditioned on the input caption and the after image
on the output caption; the ancestral noise of each step shared by both images; for the first ``p`` of
the steps the after image's self-attention uses the before image's attention maps; decode and map
to [0, 1].

:func:`render_pairs` does this for N samples at once with diffusers components: UNet batch 4N in
the layout of :mod:`tasks.render.attention` (``cfg * 2N + 2 * sample + pair``), latents in pair
order ``[before_0, after_0, before_1, ...]``, one generator per latent (the two of a pair seeded
alike, so every noise draw is the same for both), per-sample CFG scales and per-sample sharing
flags. Every sample depends only on its own request, so the result does not depend on how requests
are batched (up to floating-point reassociation in the UNet, ~1e-6 on CPU float32).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from tasks.common.models import DiffusionComponents
from tasks.render.attention import AttentionControl, install_attention, token_alignment
from tasks.render.sampling import SampleParams, batch_generators, sample_params

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class PairRequest:
    """One sample to render: a triplet's captions and the sample's seed (``key`` names the sample)."""

    key: str
    input_caption: str
    output_caption: str
    seed: int


@dataclass
class RenderSettings:
    """Sampling settings; the defaults are the paper's (512², 100 steps, cfg ~ U(7.5, 15), p ~ U(0.1, 0.9)).

    ``attention``: ``"ip2p"`` (the reference: shared self-attention for the first p of the steps),
    ``"ip2p-explicit"`` (the same with explicit attention maps, for tests), ``"p2p-replace"`` /
    ``"p2p-refine"`` (classic Prompt-to-Prompt: cross-attention for the first ``cross_replace_steps``,
    self-attention for the first ``self_replace_steps``; the drawn p is recorded but unused), or
    ``"none"`` (two independent generations from the same noise).
    """

    steps: int = 100
    height: int = 512
    width: int = 512
    cfg_range: tuple[float, float] = (7.5, 15.0)
    p_range: tuple[float, float] = (0.1, 0.9)
    attention: str = "ip2p"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4


@dataclass
class PairBatch:
    """Rendered pairs, in request order: ``before``/``after`` are (N, 3, H, W) float32 in [0, 1] on CPU."""

    params: list[SampleParams]
    before: torch.Tensor
    after: torch.Tensor


def encode_prompts(components: DiffusionComponents, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states (len(prompts), 77, D), as diffusers' Stable Diffusion pipeline."""
    if components.is_sdxl:
        raise NotImplementedError("render_pairs supports SD 1.x/2.x-style models; SDXL needs pooled embeddings")
    tokenizer, encoder = components.tokenizer, components.text_encoder
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        return encoder(ids.to(encoder.device))[0]


def build_control(components: DiffusionComponents, requests: Sequence[PairRequest],
                  params: Sequence[SampleParams], settings: RenderSettings) -> AttentionControl:
    """The per-sample sharing schedule (and token alignments for the p2p modes)."""
    n = len(requests)
    if not settings.attention.startswith("p2p-"):
        return AttentionControl.for_samples([p.p2p_p for p in params])
    how = settings.attention.removeprefix("p2p-")
    aligned = [token_alignment(components.tokenizer, r.input_caption, r.output_caption, how) for r in requests]
    return AttentionControl.for_samples(
        [settings.self_replace_steps] * n,
        [settings.cross_replace_steps] * n,
        cross_index=torch.stack([a[0] for a in aligned]),
        cross_alpha=torch.stack([a[1] for a in aligned]),
    )


def _initial_latents(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """One (1, C, h, w) draw per generator, concatenated (as diffusers' ``prepare_latents``)."""
    return torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])


def render_pairs(
    components: DiffusionComponents,
    requests: Sequence[PairRequest],
    settings: RenderSettings,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    step_callback: StepCallback | None = None,
) -> PairBatch:
    """Render one before/after pair per request in a single denoising loop (UNet batch 4N).

    ``step_callback(step_index, timestep, latents)`` is called after every scheduler step with the
    (2N, C, h, w) latents in pair order. The components must already be on ``device``.
    A scheduler whose ``step`` takes no ``generator`` is called without one: deterministic ones
    (Heun, ...) are unaffected; one drawing its own noise (e.g. DPMSolverSDE's Brownian tree) would
    not give the two images of a pair the same noise.
    """
    device = torch.device(device)
    factor = components.vae_scale_factor
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if settings.height % factor or settings.width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}")
    params = [sample_params(r.seed, settings.cfg_range, settings.p_range) for r in requests]
    n = len(requests)
    if n == 0:
        empty = torch.empty(0, 3, settings.height, settings.width)
        return PairBatch(params, empty, empty.clone())
    control = build_control(components, requests, params, settings)
    unet, vae = components.unet, components.vae

    with torch.inference_mode():
        scheduler = copy.deepcopy(components.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps

        uncond = encode_prompts(components, [""]).to(device, dtype)
        cond = encode_prompts(components, [c for r in requests for c in (r.input_caption, r.output_caption)])
        embeddings = torch.cat([uncond.expand(2 * n, -1, -1), cond.to(device, dtype)])

        generators = batch_generators([r.seed for r in requests], device)
        shape = (1, unet.config.in_channels, settings.height // factor, settings.width // factor)
        latents = _initial_latents(generators, shape, device, dtype) * scheduler.init_noise_sigma
        cfg = torch.tensor([p.cfg_scale for p in params], device=device, dtype=dtype).repeat_interleave(2)
        cfg = cfg.view(-1, 1, 1, 1)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}

        previous = unet.attn_processors
        install_attention(unet, settings.attention, control)
        try:
            for i, t in enumerate(timesteps):
                control.begin_step(i, len(timesteps), device)
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                eps = unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + cfg * (eps_cond - eps_uncond)
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
                if step_callback is not None:
                    step_callback(i, t, latents)
        finally:
            unet.set_attn_processor(previous)

        scaled = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            scaled = scaled + shift
        images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1).float().cpu()
    return PairBatch(params=params, before=images[0::2].contiguous(), after=images[1::2].contiguous())
