"""Conditioning dropout for classifier-free guidance on two conditionings (paper sec. 3.2.1).

As the reference (``ddpm_edit.py``, ``uncond = 0.05``), one uniform draw per sample drops the text only, the
image only or both, 5% each; null text is the text encoder's embedding of "", null image an all-zero latent.
For SDXL the text conditioning is the pair (hidden states, pooled projection), dropped together, and the
saved pipeline encodes "" as its unconditional prompt, so training and inference use the same null text.

The draw's intervals and the SDXL difference from diffusers' example: docs/training.md ("In the code").
"""

from __future__ import annotations

import torch


def dropout_masks(
    batch_size: int, p: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks `(drop_text, drop_image)` of shape (batch_size,) from one uniform draw per sample."""
    if not 0 <= p <= 1 / 3:
        raise ValueError(
            f"conditioning dropout p={p} must lie in [0, 1/3] (3p of the samples lose a conditioning)"
        )
    u = torch.rand(batch_size, generator=generator, device=device)
    drop_text = u < 2 * p
    drop_image = (u >= p) & (u < 3 * p)
    return drop_text, drop_image


def apply_dropout(
    text_embeds: torch.Tensor,
    image_latents: torch.Tensor,
    null_text: torch.Tensor,
    drop_text: torch.Tensor,
    drop_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace dropped text embeddings by `null_text` (1, L, D) and dropped image latents by zeros."""
    text = drop_rows(text_embeds, null_text, drop_text)
    image = image_latents * (~drop_image).to(image_latents.dtype)[:, None, None, None]
    return text, image


def drop_rows(values: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`values` (B, ...) with the rows marked in `drop` (B,) replaced by `null` (1, ...)."""
    mask = drop.view(-1, *([1] * (values.ndim - 1)))
    return torch.where(mask, null.to(values.dtype).expand_as(values), values)


def encode_text(
    comps, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """c_T: (hidden states, pooled or None). SD: the last hidden state of the text encoder. SDXL: the
    penultimate hidden states of both encoders concatenated and the second's pooled projection."""
    if not comps.is_sdxl:
        return comps.text_encoder(input_ids.to(comps.text_encoder.device))[0], None
    if input_ids_2 is None:
        raise ValueError("SDXL needs the instruction tokenized by both tokenizers (input_ids_2)")
    hidden, pooled = [], None
    for encoder, ids in ((comps.text_encoder, input_ids), (comps.text_encoder_2, input_ids_2)):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder's (the projection model's) text_embeds
    if pooled.ndim != 2:
        raise ValueError(
            "SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as text_encoder_2"
        )
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def null_text_embedding(tokenizer, text_encoder) -> torch.Tensor:
    """∅_T: the text encoder's last hidden state for the empty prompt "", shape (1, 77, D)."""
    from tasks.train.data import tokenize

    ids = tokenize(tokenizer, [""]).to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def null_text(comps) -> tuple[torch.Tensor, torch.Tensor | None]:
    """∅_T for the components: (hidden (1, 77, D), pooled (1, P) for SDXL, else None)."""
    from tasks.train.data import tokenize

    if not comps.is_sdxl:
        return null_text_embedding(comps.tokenizer, comps.text_encoder), None
    return encode_text(comps, tokenize(comps.tokenizer, [""]), tokenize(comps.tokenizer_2, [""]))
