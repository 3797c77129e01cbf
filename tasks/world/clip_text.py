"""The world CLIP's text tower as a transformers ``CLIPTextModel``: the diffusion model's text encoder.

Stable Diffusion 1.x conditions on the text tower of OpenAI's CLIP ViT-L/14 (transformers'
``CLIPTextModel``: token + position embeddings, pre-LayerNorm causal transformer, final LayerNorm;
the UNet reads the last hidden state), and the paper filters with that same CLIP. The world model does
the same: its text encoder is the text tower of the world's open_clip model, with the weights moved
to transformers' names (``in_proj`` split into q/k/v, ``c_fc``/``c_proj`` to ``fc1``/``fc2``,
``ln_final`` to ``final_layer_norm``) — the hidden states are the same numbers
(:func:`check_same_hidden_states`).

Both towers read one tokenizer (:func:`build_world_tokenizer`): CLIP's own BPE (its byte alphabet and
merge ranks) restricted to the merges that the world's words use, saved as a transformers
``CLIPTokenizer`` in the CLIP folder (open_clip reads it there: ``hf_tokenizer_name`` in
``open_clip_config.json``) and in the diffusion folder. A world word tokenizes as under the full CLIP
vocabulary; any other word falls back to shorter pieces down to single bytes. 700 tokens instead
of 49,408 keep the token embeddings, and so the shipped text towers, small.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, rank: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's BPE of one (byte-encoded) word: its tokens and the merges applied, in order."""
    parts = [*word[:-1], word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: rank.get(pair, len(rank)))
        if best not in rank:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts, used


def world_vocab_and_merges(texts: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary cut down to ``texts``: the 512 byte tokens, the merges the texts' words use (in
    CLIP's rank order) and their tokens, then the start and end tokens (the end token has the highest id,
    as in CLIP: open_clip's text tower pools at the argmax token id)."""
    from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode

    from tasks.common.tiny import clip_vocab_and_merges

    _, merges = clip_vocab_and_merges()
    rank = {m: i for i, m in enumerate(merges)}
    clip = SimpleTokenizer()
    encoder = bytes_to_unicode()
    words = {word for text in texts for word in clip.pat.findall(text.strip().lower())}
    used: set[tuple[str, str]] = set()
    for word in words:
        used.update(_bpe("".join(encoder[b] for b in word.encode("utf-8")), rank)[1])
    kept = sorted(used, key=rank.__getitem__)
    alphabet = list(encoder.values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in kept] + [START, END]
    return {t: i for i, t in enumerate(tokens)}, kept


def build_world_tokenizer(dest: Path, texts: Iterable[str]):
    """Save the world's ``CLIPTokenizer`` (:func:`world_vocab_and_merges`) in ``dest`` (also as
    ``vocab.json`` + ``merges.txt``, the files SD's repositories hold); return it."""
    from transformers import CLIPTokenizer

    vocab, merges = world_vocab_and_merges(texts)
    dest.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    tok.save_pretrained(dest)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return tok


def text_config(model_cfg: dict):
    from transformers import CLIPTextConfig

    t = model_cfg["text_cfg"]
    width, vocab = t["width"], t["vocab_size"]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=t["context_length"],
        projection_dim=model_cfg["embed_dim"],
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        layer_norm_eps=1e-5,
    )


def to_transformers(clip_model, model_cfg: dict):
    """A ``CLIPTextModel`` holding ``clip_model``'s (an ``open_clip.CLIP``) text tower."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(text_config(model_cfg))
    src = clip_model.state_dict()
    out: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
    }
    for i in range(model_cfg["text_cfg"]["layers"]):
        a, b = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        out |= {
            b + "self_attn.q_proj.weight": q,
            b + "self_attn.q_proj.bias": qb,
            b + "self_attn.k_proj.weight": k,
            b + "self_attn.k_proj.bias": kb,
            b + "self_attn.v_proj.weight": v,
            b + "self_attn.v_proj.bias": vb,
            b + "self_attn.out_proj.weight": src[a + "attn.out_proj.weight"],
            b + "self_attn.out_proj.bias": src[a + "attn.out_proj.bias"],
            b + "layer_norm1.weight": src[a + "ln_1.weight"],
            b + "layer_norm1.bias": src[a + "ln_1.bias"],
            b + "layer_norm2.weight": src[a + "ln_2.weight"],
            b + "layer_norm2.bias": src[a + "ln_2.bias"],
            b + "mlp.fc1.weight": src[a + "mlp.c_fc.weight"],
            b + "mlp.fc1.bias": src[a + "mlp.c_fc.bias"],
            b + "mlp.fc2.weight": src[a + "mlp.c_proj.weight"],
            b + "mlp.fc2.bias": src[a + "mlp.c_proj.bias"],
        }
    own = encoder.state_dict()
    prefixed = any(k.startswith("text_model.") for k in own)  # transformers 4 keeps the prefix, 5 does not
    state = {
        (k if prefixed else k.removeprefix("text_model.")): v.detach().clone().contiguous()
        for k, v in out.items()
    }
    # the position ids buffer (when a transformers version keeps one) stays the model's own
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(f"open_clip -> CLIPTextModel: no source for {missing}")
    encoder.load_state_dict(state, strict=False)
    return encoder.eval()


def open_clip_hidden_states(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text tower up to ``ln_final`` (before pooling): (n, context, width)."""
    x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    return clip_model.ln_final(x)


@torch.no_grad()
def check_same_hidden_states(clip_model, encoder, tokenizer, texts: list[str], atol: float = 1e-5) -> float:
    """Max |difference| of the two towers' hidden states on ``texts`` up to each text's end token (the
    positions after it are padding; causal attention keeps them out of every earlier position). Raises if
    above ``atol``."""
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    ours = encoder(ids)[0]
    theirs = open_clip_hidden_states(clip_model, ids)
    worst = 0.0
    for i, row in enumerate(ids.tolist()):
        end = row.index(tokenizer.eos_token_id) + 1
        worst = max(worst, float((ours[i, :end] - theirs[i, :end]).abs().max()))
    if worst > atol:
        raise RuntimeError(f"CLIPTextModel differs from the open_clip text tower by {worst:g} (> {atol:g})")
    return worst
