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

Beyond the reference: SDXL conditioning (:mod:`tasks.render.conditioning`), and early rejection
(:mod:`tasks.render.early`): after a given number of steps the x0 predictions are scored and the
samples that cannot pass leave the batch, which is compacted for the remaining steps.

Few-step distilled models (SDXL-Turbo, LCM-LoRA merged: ``RenderSettings.guidance=False``) run
without classifier-free guidance: the UNet batch is the conditional half alone, 2N
(``samples x [before, after]``), ``eps`` is the conditional prediction, the recorded CFG scale is 1
(p is drawn from the seed as before), and the shared attention is applied to that half.

UNet calls are counted per sample: one sample x one denoising step = one call of a four-image UNet
batch (the reference's unit: 100 samples x 100 steps = 10,000 calls per triplet), whatever the
number of samples sharing the physical call (without guidance a sample-step is a two-image batch,
half the compute). :attr:`PairBatch.unet_steps` holds them per sample.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from tasks.common.models import DiffusionComponents
from tasks.common.selection import METRICS
from tasks.render.attention import AttentionControl, make_processor, token_alignment
from tasks.render.conditioning import Conditioning, build_conditioning, encode_prompts  # noqa: F401 (re-export)
from tasks.render.early import EarlyRejection, predict_x0, select_scheduler_rows
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
    ``"none"`` (two independent generations from the same noise). ``decode_batch``: images per VAE
    decode call (memory only). ``guidance``: classifier-free guidance (UNet batch 4N); False for
    few-step distilled models (batch 2N, no unconditional half, cfg 1).
    """

    steps: int = 100
    height: int = 512
    width: int = 512
    cfg_range: tuple[float, float] = (7.5, 15.0)
    p_range: tuple[float, float] = (0.1, 0.9)
    attention: str = "ip2p"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    decode_batch: int = 8
    guidance: bool = True


@dataclass
class PairBatch:
    """Rendered pairs, in request order: ``before``/``after`` are (N, 3, H, W) float32 in [0, 1] on CPU.

    ``unet_steps[i]``: denoising steps sample i ran (UNet calls, see the module doc);
    ``early_rejected[i]``: dropped by early rejection (its ``before``/``after`` rows are NaN);
    ``early_metrics``: the early CLIP metrics of every sample scored early, NaN elsewhere.
    """

    params: list[SampleParams]
    before: torch.Tensor
    after: torch.Tensor
    unet_steps: list[int] = field(default_factory=list)
    early_rejected: list[bool] = field(default_factory=list)
    early_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def unet_calls(self) -> int:
        return sum(self.unet_steps)


def build_control(components: DiffusionComponents, requests: Sequence[PairRequest],
                  params: Sequence[SampleParams], settings: RenderSettings) -> AttentionControl:
    """The per-sample sharing schedule (and token alignments for the p2p modes)."""
    n = len(requests)
    halves = 2 if settings.guidance else 1
    if not settings.attention.startswith("p2p-"):
        return AttentionControl.for_samples([p.p2p_p for p in params], cfg_halves=halves)
    how = settings.attention.removeprefix("p2p-")
    aligned = [token_alignment(components.tokenizer, r.input_caption, r.output_caption, how) for r in requests]
    return AttentionControl.for_samples(
        [settings.self_replace_steps] * n,
        [settings.cross_replace_steps] * n,
        cross_index=torch.stack([a[0] for a in aligned]),
        cross_alpha=torch.stack([a[1] for a in aligned]),
        schedule="p2p",
        cfg_halves=halves,
    )


_PERSISTENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def attention_installed(unet, mode: str, control: AttentionControl,
                        persistent: bool = False) -> Iterator[AttentionControl]:
    """Install ``mode``'s processor for the duration (then restore the previous ones); yield its control.

    ``persistent``: install once per (UNet, mode) and keep it installed; later calls load their
    schedule into the installed control (the yielded object). A compiled UNet (``torch.compile``) then
    sees the same processor objects on every call instead of new ones that would invalidate its guards.
    """
    if persistent:
        installed = _PERSISTENT.get(unet)
        current = next(iter(unet.attn_processors.values()), None)
        still_ours = installed is not None and installed[0] == mode and (
            mode == "none" or getattr(current, "control", None) is installed[1])
        if not still_ours:
            unet.set_attn_processor(make_processor(mode, control))
            installed = _PERSISTENT[unet] = (mode, control)
        installed[1].load(control)
        yield installed[1]
        return
    previous = unet.attn_processors
    unet.set_attn_processor(make_processor(mode, control))
    try:
        yield control
    finally:
        unet.set_attn_processor(previous)


def _initial_latents(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """One (1, C, h, w) draw per generator, concatenated (as diffusers' ``prepare_latents``)."""
    return torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])


def decode_latents(vae, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1] (float32, on the latents' device), ``batch`` at a time."""
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        scaled = scaled + shift
    scaled = scaled.to(vae.dtype)
    out = [vae.decode(scaled[i: i + batch], return_dict=False)[0] for i in range(0, len(scaled), max(1, batch))]
    images = torch.cat(out) if out else scaled.new_empty(0, 3, 0, 0)
    return (images / 2 + 0.5).clamp(0, 1).float()


@dataclass
class _Batch:
    """The rows still in the denoising loop: ``alive[j]`` is the request index of batch sample j."""

    alive: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator]
    cfg: torch.Tensor
    conditioning: Conditioning
    control: AttentionControl

    def select(self, keep: torch.Tensor, scheduler) -> None:
        """Drop the samples not in the bool (n,) ``keep``: latents, noise streams, CFG, text, sharing."""
        rows = keep.repeat_interleave(2)
        index = rows.nonzero().flatten()
        select_scheduler_rows(scheduler, index.to(self.latents.device), len(rows))
        self.latents = self.latents[rows.to(self.latents.device)]
        self.generators = [g for g, k in zip(self.generators, rows.tolist()) if k]
        self.cfg = self.cfg[rows.to(self.cfg.device)]
        self.conditioning = self.conditioning.select(keep)
        self.control.select(keep)
        self.alive = self.alive[keep]


def _judge(early: EarlyRejection, vae, x0: torch.Tensor, alive: torch.Tensor, decode_batch: int,
           early_metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decode the x0 predictions, let ``early.judge`` score them; record its metrics; return keep (n,)."""
    preview = decode_latents(vae, x0, decode_batch)
    keep, metrics = early.judge(alive.tolist(), preview[0::2], preview[1::2])
    for name in METRICS:
        early_metrics[name][alive] = metrics[name].detach().float().cpu()
    return torch.as_tensor(keep, dtype=torch.bool).cpu()


def render_pairs(
    components: DiffusionComponents,
    requests: Sequence[PairRequest],
    settings: RenderSettings,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    step_callback: StepCallback | None = None,
    early: EarlyRejection | None = None,
    persistent_attention: bool = False,
) -> PairBatch:
    """Render one before/after pair per request in a single denoising loop (UNet batch 4N; 2N without guidance).

    ``step_callback(step_index, timestep, latents)`` is called after every scheduler step with the
    latents of the samples still in the batch, in pair order. ``early``: score after
    ``early.after_steps`` steps and drop the samples its judge rejects. The components must already
    be on ``device``. A scheduler whose ``step`` takes no ``generator`` is called without one:
    deterministic ones (Heun, ...) are unaffected; one drawing its own noise (e.g. DPMSolverSDE's
    Brownian tree) would not give the two images of a pair the same noise.
    """
    device = torch.device(device)
    factor = components.vae_scale_factor
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if settings.height % factor or settings.width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}")
    if early is not None and not 1 <= early.after_steps < settings.steps:
        raise ValueError(f"early rejection after {early.after_steps} of {settings.steps} steps: need 1 <= it < steps")
    params = [sample_params(r.seed, settings.cfg_range, settings.p_range) for r in requests]
    if not settings.guidance:
        if getattr(components.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("this UNet takes a guidance-scale embedding (an LCM-distilled UNet); render.guidance=none "
                             "renders distilled models that need no guidance input (SDXL-Turbo, LCM-LoRA merged)")
        params = [dataclasses.replace(p, cfg_scale=1.0) for p in params]  # p drawn from the seed as before
    n = len(requests)
    nan = torch.full((n,), float("nan"))
    early_metrics = {k: nan.clone() for k in METRICS} if early is not None else {}
    if n == 0:
        empty = torch.empty(0, 3, settings.height, settings.width)
        return PairBatch(params, empty, empty.clone(), [], [], early_metrics)
    control = build_control(components, requests, params, settings)
    unet, vae = components.unet, components.vae
    unet_steps = torch.zeros(n, dtype=torch.long)

    with torch.inference_mode():
        scheduler = copy.deepcopy(components.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps
        conditioning = build_conditioning(components, [(r.input_caption, r.output_caption) for r in requests],
                                          settings.height, settings.width, device, dtype, settings.guidance)
        generators = batch_generators([r.seed for r in requests], device)
        shape = (1, unet.config.in_channels, settings.height // factor, settings.width // factor)
        latents = _initial_latents(generators, shape, device, dtype) * scheduler.init_noise_sigma
        cfg = torch.tensor([p.cfg_scale for p in params], device=device, dtype=dtype).repeat_interleave(2)
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters

        with attention_installed(unet, settings.attention, control, persistent_attention) as control:
            batch = _Batch(torch.arange(n), latents, generators, cfg.view(-1, 1, 1, 1), conditioning, control)
            for i, t in enumerate(timesteps):
                control.begin_step(i, len(timesteps), device)
                rows = torch.cat([batch.latents, batch.latents]) if settings.guidance else batch.latents
                model_input = scheduler.scale_model_input(rows, t)
                eps = unet(model_input, t, **batch.conditioning.unet_kwargs(), return_dict=False)[0]
                if settings.guidance:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + batch.cfg * (eps_cond - eps_uncond)
                step_kwargs = {"generator": batch.generators} if takes_generator else {}
                out = scheduler.step(eps, t, batch.latents, **step_kwargs, return_dict=True)
                unet_steps[batch.alive] += 1
                scoring = early is not None and i + 1 == early.after_steps
                x0 = predict_x0(scheduler, out, eps, batch.latents, t) if scoring else None
                batch.latents = out.prev_sample
                if scoring:
                    keep = _judge(early, vae, x0, batch.alive, settings.decode_batch, early_metrics)
                    if not bool(keep.all()):
                        batch.select(keep, scheduler)
                if step_callback is not None:
                    step_callback(i, t, batch.latents)
                if len(batch.alive) == 0:
                    break

        before = torch.full((n, 3, settings.height, settings.width), float("nan"))
        after = before.clone()
        if len(batch.alive):
            images = decode_latents(vae, batch.latents, settings.decode_batch).cpu()
            before[batch.alive], after[batch.alive] = images[0::2], images[1::2]
    rejected = torch.ones(n, dtype=torch.bool)
    rejected[batch.alive] = False
    return PairBatch(params=params, before=before, after=after, unet_steps=unet_steps.tolist(),
                     early_rejected=rejected.tolist() if early is not None else [False] * n,
                     early_metrics=early_metrics)
