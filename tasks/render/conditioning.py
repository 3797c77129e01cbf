"""Text conditioning of the UNet batch for Stable Diffusion 1.x/2.x and SDXL.

Rows follow the batch layout of :mod:`tasks.render.attention`: the unconditional half, then each sample's
input caption (before) and output caption (after). SD 1.x/2.x: one CLIP text encoder, unconditional prompt
"" (the reference); SDXL: as diffusers' ``encode_prompt`` (both encoders, pooled ``text_embeds``,
``time_ids``, zeros as the unconditional embeddings). Without guidance, the conditional half alone.

In full: docs/render.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks.common.models import DiffusionComponents


def _token_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(components: DiffusionComponents, prompts: list[str]) -> torch.Tensor:
    """SD 1.x/2.x text-encoder hidden states (len(prompts), 77, D), as diffusers' SD pipeline."""
    if components.is_sdxl:
        raise ValueError("encode_prompts is the SD 1.x/2.x encoder; SDXL goes through encode_prompts_sdxl")
    encoder = components.text_encoder
    with torch.inference_mode():
        return encoder(_token_ids(components.tokenizer, prompts).to(encoder.device))[0]


def encode_prompts_sdxl(
    components: DiffusionComponents, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL (hidden states (n, 77, D1 + D2), pooled (n, P)) exactly as ``StableDiffusionXLPipeline``."""
    hidden, pooled = [], None
    pairs = (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    )
    with torch.inference_mode():
        for tokenizer, encoder in pairs:
            out = encoder(_token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projection model's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError(
            "SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as text_encoder_2"
        )
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(components: DiffusionComponents, height: int, width: int) -> torch.Tensor:
    """(1, 6) ``add_time_ids`` for an uncropped ``height x width`` render; checks the UNet's embedding size."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    unet_config = components.unet.config
    projection = components.text_encoder_2.config.projection_dim
    expected = getattr(unet_config, "projection_class_embeddings_input_dim", None)
    got = unet_config.addition_time_embed_dim * ids.shape[1] + projection
    if expected is not None and expected != got:
        raise ValueError(
            f"SDXL UNet expects added embeddings of {expected}, time ids and pooled text give {got}"
        )
    return ids


@dataclass
class Conditioning:
    """What the UNet needs besides latents and timestep, for a batch of N samples (4N rows)."""

    embeddings: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    cfg_halves: int = 2  # 2: [uncond, cond] (4N rows); 1: cond only (2N rows)

    @property
    def n_samples(self) -> int:
        return self.embeddings.shape[0] // (2 * self.cfg_halves)

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.embeddings}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs

    def select(self, keep: torch.Tensor) -> Conditioning:
        """Keep the samples marked in the bool (N,) ``keep`` (all rows of each)."""
        rows = keep.to(self.embeddings.device).view(1, -1, 1).expand(self.cfg_halves, -1, 2).reshape(-1)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return Conditioning(
            pick(self.embeddings), pick(self.text_embeds), pick(self.time_ids), self.cfg_halves
        )

    def take(self, index: torch.Tensor) -> Conditioning:
        """Gather latent rows: row j of every CFG half becomes old row ``index[j]`` (repeats allowed; the
        p-branching layout of :mod:`tasks.render.attention`, where a half is not ``samples x 2`` rows)."""
        per_half = self.embeddings.shape[0] // self.cfg_halves
        index = torch.as_tensor(index, dtype=torch.long)
        rows = torch.cat([index + h * per_half for h in range(self.cfg_halves)])

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return Conditioning(
            pick(self.embeddings), pick(self.text_embeds), pick(self.time_ids), self.cfg_halves
        )


def build_conditioning(
    components: DiffusionComponents,
    pairs: Sequence[tuple[str, str]],
    height: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype,
    guidance: bool = True,
) -> Conditioning:
    """Conditioning for N (input caption, output caption) pairs in the UNet batch layout
    (``guidance=False``: the conditional half only)."""
    n = len(pairs)
    captions = [c for pair in pairs for c in pair]
    if not components.is_sdxl:
        cond = encode_prompts(components, captions).to(device, dtype)
        if not guidance:
            return Conditioning(cond, cfg_halves=1)
        uncond = encode_prompts(components, [""]).to(device, dtype)
        return Conditioning(torch.cat([uncond.expand(2 * n, -1, -1), cond]))
    cond, pooled = encode_prompts_sdxl(components, captions)
    cond, pooled = cond.to(device, dtype), pooled.to(device, dtype)
    time_ids = sdxl_time_ids(components, height, width).to(device, dtype)
    if not guidance:
        return Conditioning(cond, pooled, time_ids.expand(2 * n, -1).contiguous(), cfg_halves=1)
    time_ids = time_ids.expand(4 * n, -1)
    return Conditioning(
        embeddings=torch.cat([torch.zeros_like(cond), cond]),
        text_embeds=torch.cat([torch.zeros_like(pooled), pooled]),
        time_ids=time_ids.contiguous(),
    )
