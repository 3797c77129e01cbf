"""Render before/after image pairs with shared attention: many samples in one denoising loop.

:func:`render_pairs` does the reference's per-sample loop (``generate_img_dataset.py``: one seed's noise for
both images, Euler-ancestral, CFG, the after image sharing the before image's self-attention for the first
``p`` of the steps) for N samples at once with diffusers components; every sample depends only on its own
request, so batching does not change the result (up to float reassociation). Also here: rendering without
classifier-free guidance, early rejection (:mod:`tasks.render.early`), p-branching (a seed's K branches as
one tree) and the UNet-call accounting (``unet_steps``, ``unet_images``).

The batch layout, the branching tree and its accounting in full: docs/render.md ("In the code").
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
    """One sample to render: a triplet's captions and the sample's seed (``key`` names the sample).

    ``branch`` of ``branches``: p-branching (see the module doc): p is the seed's ``branch``-th of
    ``branches`` stratified draws; requests with the same seed, captions and ``branches`` > 1 are
    rendered as one tree (``RenderSettings.branching``).
    """

    key: str
    input_caption: str
    output_caption: str
    seed: int
    branch: int = 0
    branches: int = 1


@dataclass
class RenderSettings:
    """Sampling settings; the defaults are the paper's (512², 100 steps, cfg ~ U(7.5, 15), p ~ U(0.1, 0.9)).

    ``attention``: ``"ip2p"`` (the reference: shared self-attention for the first p of the steps),
    ``"ip2p-explicit"`` (the same with explicit attention maps, for tests), ``"p2p-replace"`` /
    ``"p2p-refine"`` (classic Prompt-to-Prompt: cross-attention for the first ``cross_replace_steps``,
    self-attention for the first ``self_replace_steps``; the drawn p is recorded but unused), or
    ``"none"`` (two independent generations from the same noise). ``decode_batch``: images per VAE
    decode call (memory only). ``guidance``: classifier-free guidance (UNet batch 4N); False for
    few-step distilled models (batch 2N, no unconditional half, cfg 1). ``branching``: render the p
    branches of a seed as one tree (the module doc); False renders each as an independent sample (the
    same images up to float rounding, more UNet calls: for tests and the benchmark).
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
    branching: bool = True


@dataclass
class PairBatch:
    """Rendered pairs, in request order: ``before``/``after`` are (N, 3, H, W) float32 in [0, 1] on CPU.

    ``unet_steps[i]``: denoising steps sample i ran (UNet calls, see the module doc);
    ``unet_images[i]``: images it put through the UNet (4 per step, 2 without guidance; 2 and 1 for a
    forked p branch's own steps);
    ``early_rejected[i]``: dropped by early rejection (its ``before``/``after`` rows are NaN);
    ``early_metrics``: the early CLIP metrics of every sample scored early, NaN elsewhere.
    """

    params: list[SampleParams]
    before: torch.Tensor
    after: torch.Tensor
    unet_steps: list[int] = field(default_factory=list)
    early_rejected: list[bool] = field(default_factory=list)
    early_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    unet_images: list[int] = field(default_factory=list)

    @property
    def unet_calls(self) -> int:
        return sum(self.unet_steps)


def build_control(
    components: DiffusionComponents,
    requests: Sequence[PairRequest],
    params: Sequence[SampleParams],
    settings: RenderSettings,
) -> AttentionControl:
    """The per-sample sharing schedule (and token alignments for the p2p modes)."""
    n = len(requests)
    halves = 2 if settings.guidance else 1
    if not settings.attention.startswith("p2p-"):
        return AttentionControl.for_samples([p.p2p_p for p in params], cfg_halves=halves)
    how = settings.attention.removeprefix("p2p-")
    aligned = [
        token_alignment(components.tokenizer, r.input_caption, r.output_caption, how) for r in requests
    ]
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
def attention_installed(
    unet, mode: str, control: AttentionControl, persistent: bool = False
) -> Iterator[AttentionControl]:
    """Install ``mode``'s processor for the duration (then restore the previous ones); yield its control.

    ``persistent``: install once per (UNet, mode) and keep it installed; later calls load their
    schedule into the installed control (the yielded object). A compiled UNet (``torch.compile``) then
    sees the same processor objects on every call instead of new ones that would invalidate its guards.
    """
    if persistent:
        installed = _PERSISTENT.get(unet)
        current = next(iter(unet.attn_processors.values()), None)
        still_ours = (
            installed is not None
            and installed[0] == mode
            and (mode == "none" or getattr(current, "control", None) is installed[1])
        )
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


def _initial_latents(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One (1, C, h, w) draw per generator, concatenated (as diffusers' ``prepare_latents``)."""
    return torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])


def decode_latents(vae, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1] (float32, on the latents' device), ``batch`` at a time."""
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        scaled = scaled + shift
    scaled = scaled.to(vae.dtype)
    out = [
        vae.decode(scaled[i : i + batch], return_dict=False)[0] for i in range(0, len(scaled), max(1, batch))
    ]
    images = torch.cat(out) if out else scaled.new_empty(0, 3, 0, 0)
    return (images / 2 + 0.5).clamp(0, 1).float()


@dataclass(eq=False)
class _Lane:
    """One after-image trajectory: the branches of a seed with the same stop step (``members[0]`` is billed)."""

    members: list[int]
    stop: int


@dataclass
class _Group:
    """One seed's requests (all its p branches, or one plain sample): one before image and the after lanes.

    ``head``: the lane whose row is the pair's after row (the trunk until it stops sharing); ``pending``:
    lanes still riding the trunk (not forked yet); ``solo``: forked lanes, alive, each in its own row.
    """

    before: int
    head: _Lane | None
    pending: list[_Lane]
    solo: list[_Lane] = field(default_factory=list)


def _groups(requests: Sequence[PairRequest], stops: list[int], settings: RenderSettings) -> list[_Group]:
    """Requests grouped by seed (branches > 1 only, when ``settings.branching``), in first-request order."""
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if r.branches > 1 and settings.attention not in ("ip2p", "ip2p-explicit"):
            raise ValueError(
                f"p branches need attention ip2p (the drawn p decides the sharing); {settings.attention!r} "
                "does not use p"
            )
        key = (
            (r.seed, r.input_caption, r.output_caption, r.branches)
            if r.branches > 1 and settings.branching
            else i
        )
        by_key.setdefault(key, []).append(i)
    groups = []
    for members in by_key.values():
        lanes: dict[int, list[int]] = {}
        for i in members:
            lanes.setdefault(stops[i], []).append(i)
        ordered = [_Lane(ids, stop) for stop, ids in sorted(lanes.items())]
        groups.append(_Group(before=ordered[-1].members[0], head=ordered[-1], pending=ordered[:-1]))
    return groups


class _Tree:
    """The rows still in the denoising loop and what each one is: a before image (``("b", group)``) or an
    after lane (``("a", lane)``); pairs ``[before, head lane]`` of every live group first, then the solo
    lanes. Latents, generators, CFG scales, text conditioning, the scheduler's per-row state and the
    attention layout follow the rows whenever they change (:meth:`relayout`)."""

    def __init__(
        self,
        groups: list[_Group],
        latents: torch.Tensor,
        generators: list[torch.Generator],
        cfg: torch.Tensor,
        conditioning: Conditioning,
        control: AttentionControl,
        base: AttentionControl,
    ):
        self.groups, self.base, self.control = groups, base, control
        self.lanes = [lane for g in groups for lane in (g.head, *g.pending)]
        self.lane_id = {id(lane): k for k, lane in enumerate(self.lanes)}
        self.group_of = {id(lane): gi for gi, g in enumerate(groups) for lane in (g.head, *g.pending)}
        self.tags = self.layout()
        self.latents, self.generators, self.cfg, self.conditioning = latents, generators, cfg, conditioning
        self.forks: dict[int, int] = {}  # new lane row -> the lane row it copies, until the next relayout

    def layout(self) -> list[tuple[str, int]]:
        pairs = [
            t
            for gi, g in enumerate(self.groups)
            if g.head is not None
            for t in (("b", gi), ("a", self.lane_id[id(g.head)]))
        ]
        return pairs + [("a", self.lane_id[id(lane)]) for g in self.groups for lane in g.solo]

    @property
    def n_pairs(self) -> int:
        return sum(g.head is not None for g in self.groups)

    def heads(self) -> list[int]:
        return [g.head.members[0] for g in self.groups if g.head is not None]

    def solos(self) -> list[int]:
        return [lane.members[0] for g in self.groups for lane in g.solo]

    def fork(self, step: int) -> bool:
        """Branches whose sharing ends at ``step`` get rows of their own (copies of their trunk)."""
        forked = False
        for g in self.groups:
            while g.head is not None and g.pending and g.pending[0].stop <= step:
                lane = g.pending.pop(0)
                g.solo.append(lane)
                self.forks[self.lane_id[id(lane)]] = self.lane_id[id(g.head)]
                forked = True
        return forked

    def relayout(self, scheduler) -> None:
        """Move every row to its place in the new layout (forks copy their trunk's row and noise stream)."""
        new = self.layout()
        position = {tag: j for j, tag in enumerate(self.tags)}
        source = [
            position[("a", self.forks[k])] if kind == "a" and k in self.forks else position[(kind, k)]
            for kind, k in new
        ]
        index = torch.tensor(source, dtype=torch.long)
        copies = {j for j, (kind, k) in enumerate(new) if kind == "a" and k in self.forks}
        select_scheduler_rows(scheduler, index.to(self.latents.device), len(self.tags))
        self.latents = self.latents[index.to(self.latents.device)]
        self.generators = [
            _clone(self.generators[i]) if j in copies else self.generators[i] for j, i in enumerate(source)
        ]
        self.cfg = self.cfg[index.to(self.cfg.device)]
        self.conditioning = self.conditioning.take(index)
        self.control.take(
            self.base, torch.tensor(self.heads(), dtype=torch.long), len(new) - 2 * self.n_pairs
        )
        self.tags, self.forks = new, {}

    def bill(self, unet_steps: torch.Tensor, unet_images: torch.Tensor, halves: int) -> None:
        """One denoising step: a pair is one sample-step (4 images, 2 without guidance) of its head's
        first member, a solo row one sample-step (2 images, 1) of its lane's first member."""
        heads, solos = self.heads(), self.solos()
        unet_steps[heads] += 1
        unet_images[heads] += 2 * halves
        if solos:
            unet_steps[solos] += 1
            unet_images[solos] += halves

    def units(self) -> list[tuple[int, int, int, list[int]]]:
        """(request judged, before row, after row, requests the verdict covers) per lane in the batch."""
        position = {tag: j for j, tag in enumerate(self.tags)}
        out = []
        for gi, g in enumerate(self.groups):
            if g.head is None:
                continue
            b = position[("b", gi)]
            for lane, riders in [
                (g.head, [m for p in g.pending for m in p.members]),
                *((s, []) for s in g.solo),
            ]:
                out.append(
                    (lane.members[0], b, position[("a", self.lane_id[id(lane)])], lane.members + riders)
                )
        return out

    def drop(self, lanes_dropped: set[int]) -> bool:
        """Remove the lanes whose first member is in ``lanes_dropped`` (the trunk takes its riders along)."""
        changed = False
        for g in self.groups:
            if g.head is None:
                continue
            kept = [lane for lane in g.solo if lane.members[0] not in lanes_dropped]
            changed |= len(kept) != len(g.solo)
            g.solo = kept
            if g.head.members[0] in lanes_dropped:
                changed = True
                g.pending = []
                g.head = g.solo.pop(0) if g.solo else None  # the first live branch takes the pair's place
        return changed

    def rows_of(self, request: int) -> tuple[int, int] | None:
        """(before row, after row) of a live request, or None."""
        position = {tag: j for j, tag in enumerate(self.tags)}
        for gi, g in enumerate(self.groups):
            if g.head is None:
                continue
            for lane in (g.head, *g.pending, *g.solo):
                if request in lane.members:
                    after = g.head if any(lane is q for q in g.pending) else lane
                    return position[("b", gi)], position[("a", self.lane_id[id(after)])]
        return None


def _clone(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state (a forked branch draws the noise its trunk would have drawn)."""
    copy_ = torch.Generator(device=generator.device)
    copy_.set_state(generator.get_state())
    return copy_


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
    latents of the rows still in the batch (pairs in pair order, then p-branching's solo rows).
    ``early``: score after ``early.after_steps`` steps and drop the samples its judge rejects. The
    components must already be on ``device``. A scheduler whose ``step`` takes no ``generator`` is
    called without one: deterministic ones (Heun, ...) are unaffected; one drawing its own noise (e.g.
    DPMSolverSDE's Brownian tree) would not give the two images of a pair the same noise. Requests that
    are p branches of one seed share their before image and the after prefix (the module doc).
    """
    device = torch.device(device)
    factor = components.vae_scale_factor
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if settings.height % factor or settings.width % factor:
        raise ValueError(
            f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}"
        )
    if early is not None and not 1 <= early.after_steps < settings.steps:
        raise ValueError(
            f"early rejection after {early.after_steps} of {settings.steps} steps: need 1 <= it < steps"
        )
    params = [
        sample_params(r.seed, settings.cfg_range, settings.p_range, r.branch, r.branches) for r in requests
    ]
    if not settings.guidance:
        if getattr(components.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "this UNet takes a guidance-scale embedding (an LCM-distilled UNet); render.guidance=none "
                "renders distilled models that need no guidance input (SDXL-Turbo, LCM-LoRA merged)"
            )
        params = [dataclasses.replace(p, cfg_scale=1.0) for p in params]  # p drawn from the seed as before
    n = len(requests)
    nan = torch.full((n,), float("nan"))
    early_metrics = {k: nan.clone() for k in METRICS} if early is not None else {}
    if n == 0:
        empty = torch.empty(0, 3, settings.height, settings.width)
        return PairBatch(params, empty, empty.clone(), [], [], early_metrics, [])
    base = build_control(components, requests, params, settings)
    groups = _groups(requests, base.stop_steps(settings.steps), settings)
    firsts = [g.before for g in groups]
    control = copy.copy(base)
    if len(groups) < n:
        control.take(base, torch.tensor(firsts, dtype=torch.long), 0)
    unet, vae = components.unet, components.vae
    halves = 2 if settings.guidance else 1
    unet_steps = torch.zeros(n, dtype=torch.long)
    unet_images = torch.zeros(n, dtype=torch.long)

    with torch.inference_mode():
        scheduler = copy.deepcopy(components.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps
        firsts_r = [requests[i] for i in firsts]
        conditioning = build_conditioning(
            components,
            [(r.input_caption, r.output_caption) for r in firsts_r],
            settings.height,
            settings.width,
            device,
            dtype,
            settings.guidance,
        )
        generators = batch_generators([r.seed for r in firsts_r], device)
        shape = (1, unet.config.in_channels, settings.height // factor, settings.width // factor)
        latents = _initial_latents(generators, shape, device, dtype) * scheduler.init_noise_sigma
        cfg = torch.tensor(
            [params[i].cfg_scale for i in firsts], device=device, dtype=dtype
        ).repeat_interleave(2)
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters

        with attention_installed(unet, settings.attention, control, persistent_attention) as control:
            tree = _Tree(groups, latents, generators, cfg.view(-1, 1, 1, 1), conditioning, control, base)
            for i, t in enumerate(timesteps):
                if tree.fork(i):
                    tree.relayout(scheduler)
                control.begin_step(i, len(timesteps), device)
                rows = torch.cat([tree.latents, tree.latents]) if settings.guidance else tree.latents
                model_input = scheduler.scale_model_input(rows, t)
                eps = unet(model_input, t, **tree.conditioning.unet_kwargs(), return_dict=False)[0]
                if settings.guidance:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + tree.cfg * (eps_cond - eps_uncond)
                step_kwargs = {"generator": tree.generators} if takes_generator else {}
                out = scheduler.step(eps, t, tree.latents, **step_kwargs, return_dict=True)
                tree.bill(unet_steps, unet_images, halves)
                scoring = early is not None and i + 1 == early.after_steps
                x0 = predict_x0(scheduler, out, eps, tree.latents, t) if scoring else None
                tree.latents = out.prev_sample
                if scoring and tree.drop(
                    _judge(early, vae, x0, tree.units(), settings.decode_batch, early_metrics)
                ):
                    tree.relayout(scheduler)
                if step_callback is not None:
                    step_callback(i, t, tree.latents)
                if not tree.tags:
                    break

        before = torch.full((n, 3, settings.height, settings.width), float("nan"))
        after = before.clone()
        rejected = torch.ones(n, dtype=torch.bool)
        if tree.tags:
            images = decode_latents(vae, tree.latents, settings.decode_batch).cpu()
            for r in range(n):
                rows_r = tree.rows_of(r)
                if rows_r is not None:
                    before[r], after[r] = images[rows_r[0]], images[rows_r[1]]
                    rejected[r] = False
    return PairBatch(
        params=params,
        before=before,
        after=after,
        unet_steps=unet_steps.tolist(),
        early_rejected=rejected.tolist() if early is not None else [False] * n,
        early_metrics=early_metrics,
        unet_images=unet_images.tolist(),
    )


def _judge(
    early: EarlyRejection,
    vae,
    x0: torch.Tensor,
    units: list[tuple[int, int, int, list[int]]],
    decode_batch: int,
    early_metrics: dict[str, torch.Tensor],
) -> set[int]:
    """Decode the x0 predictions, let ``early.judge`` score each lane once; record its metrics for every
    request the lane stands for; return the first members of the lanes it rejects."""
    preview = decode_latents(vae, x0, decode_batch)
    judged = [u[0] for u in units]
    before = preview[[u[1] for u in units]]
    after = preview[[u[2] for u in units]]
    keep, metrics = early.judge(judged, before, after)
    keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
    for name in METRICS:
        values = metrics[name].detach().float().cpu()
        for j, unit in enumerate(units):
            early_metrics[name][unit[3]] = values[j]
    return {u[0] for u, k in zip(units, keep.tolist()) if not k}
