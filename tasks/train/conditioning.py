"""Conditioning dropout for classifier-free guidance on two conditionings (paper sec. 3.2.1).

The paper: "we randomly set only c_I = ∅_I for 5% of examples, only c_T = ∅_T for 5% of examples, and
both c_I = ∅_I and c_T = ∅_T for 5% of examples". The reference (`ddpm_edit.py`, `uncond = 0.05`) does it
with one uniform draw `u` per sample:

    u in [0,    p)   text dropped only       (prompt_mask = u < 2p)
    u in [p,   2p)   text and image dropped  (input_mask zero where p <= u < 3p)
    u in [2p,  3p)   image dropped only
    u in [3p,   1)   both kept

so text is dropped for 2p of the samples, the image for 2p, both for p, and exactly one for 2p.
Null text ∅_T is the text encoder's embedding of "" (the same embedding the pipeline uses as the
unconditional prompt); null image ∅_I is an all-zero image latent (the pipeline's `uncond_image_latents`).
"""

from __future__ import annotations

import torch


def dropout_masks(batch_size: int, p: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks `(drop_text, drop_image)` of shape (batch_size,) from one uniform draw per sample."""
    if not 0 <= p <= 1 / 3:
        raise ValueError(f"conditioning dropout p={p} must lie in [0, 1/3] (3p of the samples lose a conditioning)")
    u = torch.rand(batch_size, generator=generator, device=device)
    drop_text = u < 2 * p
    drop_image = (u >= p) & (u < 3 * p)
    return drop_text, drop_image


def apply_dropout(text_embeds: torch.Tensor, image_latents: torch.Tensor, null_text: torch.Tensor,
                  drop_text: torch.Tensor, drop_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace dropped text embeddings by `null_text` (1, L, D) and dropped image latents by zeros."""
    text = torch.where(drop_text[:, None, None], null_text.to(text_embeds.dtype).expand_as(text_embeds), text_embeds)
    image = image_latents * (~drop_image).to(image_latents.dtype)[:, None, None, None]
    return text, image


@torch.no_grad()
def null_text_embedding(tokenizer, text_encoder) -> torch.Tensor:
    """∅_T: the text encoder's last hidden state for the empty prompt "", shape (1, 77, D)."""
    from tasks.train.data import tokenize

    ids = tokenize(tokenizer, [""]).to(text_encoder.device)
    return text_encoder(ids)[0]
