"""Attention processors that make the two images of a pair share attention (Prompt-to-Prompt).

As the reference's ``attention.py``: in every self-attention layer the after image attends with the before
image's attention map over its own values, in both CFG halves. Many samples share one UNet batch, laid out
``[uncond, cond] x samples x [before, after]`` (:func:`batch_index`), with p-branching's solo rows after the
pairs; an :class:`AttentionControl` says which samples share at the current step. Processors:
:class:`SharedSelfAttnProcessor` (``ip2p``, SDPA), :class:`ExplicitSharedSelfAttnProcessor` (the reference's
explicit maps, for tests) and :class:`PromptToPromptProcessor` (classic P2P replace/refine).

The layout and each processor in full: docs/render.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

MODES = ("none", "ip2p", "ip2p-explicit", "p2p-replace", "p2p-refine")


def batch_index(cfg: int, sample: int, pair: int, n_samples: int, cfg_halves: int = 2) -> int:
    """Position in the UNet batch of (cfg half: 0 uncond / 1 cond, sample, pair: 0 before / 1 after).

    ``cfg_halves=1`` (no classifier-free guidance): the batch holds the conditional half only (cfg = 1).
    """
    first = 2 - cfg_halves  # the cfg index of the first half in the batch
    if cfg_halves not in (1, 2) or not first <= cfg <= 1 or pair not in (0, 1) or not 0 <= sample < n_samples:
        raise IndexError(
            f"bad layout position cfg={cfg} sample={sample} pair={pair} n_samples={n_samples} "
            f"cfg_halves={cfg_halves}"
        )
    return (cfg - first) * 2 * n_samples + 2 * sample + pair


def split_layout(tensor: torch.Tensor, n_samples: int, cfg_halves: int = 2) -> torch.Tensor:
    """View a UNet-batch-first tensor as ``(cfg_halves, n_samples, 2 pair, ...)`` (the last half: conditional)."""
    if tensor.shape[0] != 2 * cfg_halves * n_samples:
        raise ValueError(
            f"batch of {tensor.shape[0]} does not hold {cfg_halves} x {n_samples} samples x 2 images"
        )
    return tensor.unflatten(0, (cfg_halves, n_samples, 2))


def _after_rows(active: torch.Tensor, cfg_halves: int = 2, n_solo: int = 0) -> torch.Tensor:
    """Bool (cfg_halves * (2N + n_solo),) mask of the after rows, every CFG half, of the pairs marked in
    ``active`` (solo rows never share)."""
    mask = torch.zeros(cfg_halves, active.shape[0], 2, dtype=torch.bool, device=active.device)
    mask[:, :, 1] = active
    if not n_solo:
        return mask.flatten()
    solo = torch.zeros(cfg_halves, n_solo, dtype=torch.bool, device=active.device)
    return torch.cat([mask.flatten(1), solo], dim=1).flatten()


def _before_everywhere(
    tensor: torch.Tensor, n_samples: int, cfg_halves: int = 2, n_solo: int = 0
) -> torch.Tensor:
    """The tensor with every pair row replaced by its pair's before row (same shape, a copy; solo rows kept)."""
    if not n_solo:
        split = split_layout(tensor, n_samples, cfg_halves)
        return split[:, :, :1].expand_as(split).reshape(tensor.shape)
    halves = tensor.unflatten(0, (cfg_halves, 2 * n_samples + n_solo))
    pairs = halves[:, : 2 * n_samples].unflatten(1, (n_samples, 2))
    pairs = pairs[:, :, :1].expand_as(pairs).flatten(1, 2)
    return torch.cat([pairs, halves[:, 2 * n_samples :]], dim=1).reshape(tensor.shape)


@dataclass
class AttentionControl:
    """Mutable state shared by all processors of a UNet: the layout and the per-step flags.

    ``self_fraction[i]``: the sharing threshold of sample i (``p_i`` in mode ip2p);
    ``cross_fraction`` the cross-attention one (p2p modes); ``cross_index[i, j]`` is the
    before-prompt token that after-prompt token j takes its attention from, weighted by
    ``cross_alpha[i, j]`` (1 replace, 0 keep its own).

    When a sample shares attention at step ``i`` of ``n`` (:meth:`begin_step`) depends on ``schedule``:

    - ``"ip2p"`` (the reference): the k-diffusion loop of instruct-pix2pix runs
      ``for i in range(len(sigmas) - 1)`` and sets ``prompt_to_prompt = prompt2prompt_threshold >
      i / (len(sigmas) - 2)``, i.e. ``p > i / (n - 1)`` with ``n`` denoising steps (``n = 1``: the
      reference divides by zero; here the single step shares iff ``p > 0``). Compared with
      ``i < p * n`` this shares one step more or less near the boundary: p = 0.5, n = 10 shares
      steps 0-4 (4/9 < 0.5 < 5/9), p = 0.25, n = 8 shares steps 0-1 (1/7 < 0.25 < 2/7).
    - ``"p2p"`` (Hertz et al.'s Prompt-to-Prompt code): self-attention while
      ``i < int(self_fraction * n)`` (``num_self_replace``), cross-attention while
      ``i < int(cross_fraction * (n + 1))`` (``get_time_words_attention_alpha`` builds ``n + 1`` rows).

    ``active`` / ``cross_active`` are device masks over samples; ``any_active`` / ``any_cross_active``
    are the same facts as Python bools, so processors never synchronise with the device to test them.
    ``cfg_halves``: 2 with classifier-free guidance (batch 4N), 1 without (batch 2N, conditional only).
    ``n_solo``: solo rows after the pairs of each CFG half (p-branching, see the module doc), never sharing.
    """

    n_samples: int
    self_fraction: torch.Tensor
    cross_fraction: torch.Tensor
    cross_index: torch.Tensor | None = None
    cross_alpha: torch.Tensor | None = None
    schedule: str = "ip2p"
    cfg_halves: int = 2
    n_solo: int = 0
    step: int = field(init=False, default=-1)
    any_active: bool = field(init=False, default=False)
    any_cross_active: bool = field(init=False, default=False)
    _active: torch.Tensor = field(init=False, repr=False)
    _cross_active: torch.Tensor = field(init=False, repr=False)
    _after_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.schedule not in ("ip2p", "p2p"):
            raise ValueError(f"unknown sharing schedule {self.schedule!r}; expected 'ip2p' or 'p2p'")
        if self.cfg_halves not in (1, 2):
            raise ValueError(
                f"cfg_halves must be 2 (classifier-free guidance) or 1 (none), got {self.cfg_halves}"
            )
        for name in ("self_fraction", "cross_fraction"):
            value = torch.as_tensor(getattr(self, name), dtype=torch.float64).reshape(-1)
            if value.shape[0] != self.n_samples:
                raise ValueError(f"{name} has {value.shape[0]} entries for {self.n_samples} samples")
            setattr(self, name, value)
        self.active = torch.zeros(self.n_samples, dtype=torch.bool)
        self.cross_active = torch.zeros(self.n_samples, dtype=torch.bool)

    @classmethod
    def for_samples(
        cls,
        self_fractions: Sequence[float],
        cross_fractions: Sequence[float] | None = None,
        cross_index: torch.Tensor | None = None,
        cross_alpha: torch.Tensor | None = None,
        schedule: str = "ip2p",
        cfg_halves: int = 2,
    ) -> AttentionControl:
        n = len(self_fractions)
        # float64: p is a Python float compared with i / (n - 1); float32 would move the boundary
        cross = [0.0] * n if cross_fractions is None else list(cross_fractions)
        return cls(
            n,
            torch.tensor(list(self_fractions), dtype=torch.float64),
            torch.tensor(cross, dtype=torch.float64),
            cross_index,
            cross_alpha,
            schedule,
            cfg_halves,
        )

    @property
    def active(self) -> torch.Tensor:
        """Bool (N,): which samples share self-attention at the current step."""
        return self._active

    @active.setter
    def active(self, value: torch.Tensor) -> None:
        self._active = torch.as_tensor(value, dtype=torch.bool)
        self.any_active = bool(self._active.any())
        self._after_rows = _after_rows(self._active, self.cfg_halves, self.n_solo)

    @property
    def cross_active(self) -> torch.Tensor:
        """Bool (N,): which samples take the before image's cross-attention at the current step."""
        return self._cross_active

    @cross_active.setter
    def cross_active(self, value: torch.Tensor) -> None:
        self._cross_active = torch.as_tensor(value, dtype=torch.bool)
        self.any_cross_active = bool(self._cross_active.any())

    def after_rows(self, device: torch.device) -> torch.Tensor:
        """Bool (batch,) mask of the after rows (every CFG half) of the sharing samples, on ``device``."""
        if self._after_rows.device != device:
            self._after_rows = self._after_rows.to(device)
        return self._after_rows

    def stop_steps(self, num_steps: int) -> list[int]:
        """Per sample, the first step of ``num_steps`` at which it no longer shares self-attention
        (``num_steps`` when it shares every step); sharing is on for every step before it."""
        stops = [num_steps] * self.n_samples
        for step in range(num_steps - 1, -1, -1):
            active, _ = self.sharing_at(step, num_steps)
            for i, on in enumerate(active.tolist()):
                if not on:
                    stops[i] = step
        return stops

    def sharing_at(self, step: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(self, cross) bool masks over samples for step ``step`` of ``num_steps`` (see the class doc)."""
        if num_steps < 1 or not 0 <= step:
            raise ValueError(f"bad step {step} of {num_steps}")
        if self.schedule == "ip2p":
            position = step / (num_steps - 1) if num_steps > 1 else 0.0
            return self.self_fraction > position, self.cross_fraction > position
        self_steps = (self.self_fraction * num_steps).floor()
        cross_steps = (self.cross_fraction * (num_steps + 1)).floor()
        return step < self_steps, step < cross_steps

    def begin_step(self, step: int, num_steps: int, device: torch.device | str = "cpu") -> None:
        """Set ``active`` / ``cross_active`` for denoising step ``step`` (0-based) of ``num_steps``."""
        self.step = step
        active, cross = self.sharing_at(step, num_steps)
        self.active, self.cross_active = active, cross  # flags computed on the CPU: no device sync
        self._to(torch.device(device))

    def _to(self, device: torch.device) -> None:
        self._active, self._cross_active = self._active.to(device), self._cross_active.to(device)
        self._after_rows = self._after_rows.to(device)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the samples marked in the bool (N,) ``keep`` (in place: processors hold this object)."""
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if keep.shape != (self.n_samples,):
            raise ValueError(f"keep mask of shape {tuple(keep.shape)} for {self.n_samples} samples")
        self.n_samples = int(keep.sum())
        self.self_fraction = self.self_fraction[keep]
        self.cross_fraction = self.cross_fraction[keep]
        if self.cross_index is not None:
            self.cross_index = self.cross_index[keep.to(self.cross_index.device)]
        if self.cross_alpha is not None:
            self.cross_alpha = self.cross_alpha[keep.to(self.cross_alpha.device)]
        device = self._active.device
        self.active, self.cross_active = self._active.cpu()[keep], self._cross_active.cpu()[keep]
        self._to(device)

    def take(self, source: AttentionControl, samples: torch.Tensor, n_solo: int = 0) -> None:
        """Lay the batch out anew (in place: processors hold this object): pair j is ``source``'s sample
        ``samples[j]`` (an index into ``source``, which is left as it is), then ``n_solo`` solo rows.

        p-branching keeps the per-request schedule in ``source`` and re-lays this control whenever a
        branch forks or leaves; the sharing flags are set again by the next :meth:`begin_step`.
        """
        samples = torch.as_tensor(samples, dtype=torch.long).cpu()
        if n_solo and source.schedule != "ip2p":
            raise ValueError("solo rows (p-branching) need the ip2p sharing schedule")
        self.n_samples, self.n_solo, self.schedule = int(samples.shape[0]), int(n_solo), source.schedule
        self.cfg_halves = source.cfg_halves
        self.self_fraction = source.self_fraction[samples]
        self.cross_fraction = source.cross_fraction[samples]
        self.cross_index = (
            None if source.cross_index is None else source.cross_index[samples.to(source.cross_index.device)]
        )
        self.cross_alpha = (
            None if source.cross_alpha is None else source.cross_alpha[samples.to(source.cross_alpha.device)]
        )
        device = self._active.device
        self.active = torch.zeros(self.n_samples, dtype=torch.bool)
        self.cross_active = torch.zeros(self.n_samples, dtype=torch.bool)
        self._to(device)

    def load(self, other: AttentionControl) -> None:
        """Take over ``other``'s schedule and state (processors installed once keep this object)."""
        self.__dict__.update(other.__dict__)

    @property
    def batch_size(self) -> int:
        """UNet batch rows for the current samples: 4N with classifier-free guidance, 2N without (plus the
        solo rows, in each half)."""
        return self.cfg_halves * (2 * self.n_samples + self.n_solo)

    def check_batch(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            halves = "[uncond, cond]" if self.cfg_halves == 2 else "[cond]"
            solo = f" + {self.cfg_halves} x {self.n_solo} solo rows" if self.n_solo else ""
            raise ValueError(
                f"attention batch of {batch_size}, expected {2 * self.cfg_halves} x {self.n_samples} "
                f"({halves} x samples x [before, after]){solo}"
            )


class SharedSelfAttnProcessor:
    """ip2p: the after image's self-attention uses the before image's queries and keys (SDPA)."""

    def __init__(self, control: AttentionControl) -> None:
        self.control = control

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Same structure as diffusers' AttnProcessor2_0; only the attention core (`attend`) differs.
        is_self = encoder_hidden_states is None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if is_self else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if is_self:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask, is_self)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def sharing(self, is_self: bool, batch_size: int) -> bool:
        """Whether self-attention sharing applies to this call (and the batch has the layout)."""
        if not is_self or not self.control.any_active:
            return False
        self.control.check_batch(batch_size)
        return True

    def attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        is_self: bool,
    ) -> torch.Tensor:
        """(B, heads, S, d) tensors in, (B, heads, S, d) out."""
        if self.sharing(is_self, query.shape[0]):
            n, halves, solo = self.control.n_samples, self.control.cfg_halves, self.control.n_solo
            rows = self.control.after_rows(query.device).view(-1, 1, 1, 1)
            query = torch.where(rows, _before_everywhere(query, n, halves, solo), query)
            key = torch.where(rows, _before_everywhere(key, n, halves, solo), key)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )


def _explicit_probs(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention probabilities (B, heads, S, S_k) through ``attn.get_attention_scores``."""
    b, h, s, d = query.shape
    if mask is not None:
        mask = mask.reshape(b * h, -1, mask.shape[-1])
    probs = attn.get_attention_scores(query.reshape(b * h, s, d), key.reshape(b * h, -1, d), mask)
    return probs.view(b, h, s, -1)


class ExplicitSharedSelfAttnProcessor(SharedSelfAttnProcessor):
    """Reference-style ip2p: explicit attention matrix, before rows copied to after rows (tests only)."""

    def attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        is_self: bool,
    ) -> torch.Tensor:
        probs = _explicit_probs(attn, query, key, mask)
        if self.sharing(is_self, query.shape[0]):
            rows = self.control.after_rows(query.device).view(-1, 1, 1, 1)
            probs = torch.where(
                rows,
                _before_everywhere(
                    probs, self.control.n_samples, self.control.cfg_halves, self.control.n_solo
                ),
                probs,
            )
        return probs @ value


class PromptToPromptProcessor(SharedSelfAttnProcessor):
    """Classic Prompt-to-Prompt: shared self-attention plus cross-attention replace / refine."""

    def attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        is_self: bool,
    ) -> torch.Tensor:
        control = self.control
        out = super().attend(attn, query, key, value, mask, is_self)
        if is_self or not control.any_cross_active:
            return out
        control.check_batch(query.shape[0])
        if control.n_solo:
            raise ValueError("p2p cross-attention editing takes pairs only (no p-branching solo rows)")
        if control.cross_index is None or control.cross_alpha is None:
            raise ValueError("p2p cross-attention editing needs cross_index and cross_alpha in the control")
        n, halves = control.n_samples, control.cfg_halves
        # Only the conditional after rows change; every other row keeps the SDPA result bit for bit.
        q, k, v = (split_layout(t, n, halves)[-1] for t in (query, key, value))  # (N, 2, H, S, d)
        m = None if mask is None else split_layout(mask, n, halves)[-1, :, 0]
        base = _explicit_probs(attn, q[:, 0], k[:, 0], m)  # before image's probabilities (N, H, S, L)
        own = _explicit_probs(attn, q[:, 1], k[:, 1], m)
        if control.cross_index.shape[-1] != base.shape[-1]:
            raise ValueError(
                f"token alignment has {control.cross_index.shape[-1]} tokens, keys have {base.shape[-1]}"
            )
        index = control.cross_index.to(base.device).view(n, 1, 1, -1).expand_as(base)
        alpha = control.cross_alpha.to(base.device, base.dtype).view(n, 1, 1, -1)
        edited = (base.gather(-1, index) * alpha + own * (1 - alpha)) @ v[:, 1]
        active = control.cross_active.to(out.device).view(n, 1, 1, 1)
        out = split_layout(out, n, halves).clone()
        out[-1, :, 1] = torch.where(active, edited.to(out.dtype), out[-1, :, 1])
        return out.flatten(0, 2)


def token_alignment(tokenizer: Any, before: str, after: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha) over the tokenizer's ``model_max_length`` positions for the after prompt.

    ``replace``: position j takes position j (alpha 1). ``refine``: the two prompts' tokens are
    aligned (longest common blocks, difflib); a token of the after prompt found in the before
    prompt takes that token's attention (alpha 1), a new token keeps its own (alpha 0); padding
    positions follow the before prompt's padding, as in the original ``get_refinement_mapper``.
    """
    length = int(tokenizer.model_max_length)
    index = torch.arange(length)
    alpha = torch.ones(length)
    if mode == "replace":
        return index, alpha
    if mode != "refine":
        raise ValueError(f"unknown alignment mode {mode!r}; expected 'replace' or 'refine'")
    ids_b = tokenizer(before, truncation=True, max_length=length).input_ids
    ids_a = tokenizer(after, truncation=True, max_length=length).input_ids
    alpha[: len(ids_a)] = 0.0
    matcher = SequenceMatcher(None, ids_b, ids_a, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            index[block.b + k] = block.a + k
            alpha[block.b + k] = 1.0
    for j in range(len(ids_a), length):
        index[j] = min(len(ids_b) + j - len(ids_a), length - 1)
    return index, alpha


def make_processor(mode: str, control: AttentionControl | None) -> Any:
    """The processor instance (shared by all layers) for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    if mode == "none":
        return AttnProcessor2_0()
    if control is None:
        raise ValueError(f"attention mode {mode!r} needs an AttentionControl")
    if mode == "ip2p":
        return SharedSelfAttnProcessor(control)
    if mode == "ip2p-explicit":
        return ExplicitSharedSelfAttnProcessor(control)
    return PromptToPromptProcessor(control)


def install_attention(unet: Any, mode: str, control: AttentionControl | None = None) -> None:
    """Install the processor for ``mode`` in every attention layer of ``unet``."""
    unet.set_attn_processor(make_processor(mode, control))


def remove_attention(unet: Any) -> None:
    """Restore diffusers' default ``AttnProcessor2_0`` everywhere."""
    unet.set_attn_processor(AttnProcessor2_0())
