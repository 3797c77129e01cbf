"""A tiny random-init SDXL model folder in the hub's layout, for SDXL training tests and smoke runs offline.

    python -m tasks.train.tiny_sdxl          # builds it once under $EDITFORGE_CACHE, prints the folder
    editforge train --preset demo --set models.diffusion=sdxl --set models.diffusion_path=<that folder>

The shapes are those of the SDXL-shaped model render's conditioning tests use (two CLIP text encoders of
widths 16 and 24, the second with a 16-wide projection; a UNet with `text_time` added embeddings); the VAE is
the tiny preset's (downsampling 4), the scheduler SDXL base's (Euler, scaled-linear betas 0.00085–0.012).
Like the real `stabilityai/stable-diffusion-xl-base-1.0` repository, each tokenizer folder holds
`vocab.json` and `merges.txt` (the real CLIP BPE vocabulary) beside `tokenizer.json`, so the copy of it that
training writes next to the trained UNet is readable by older transformers too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tasks.common.tiny import (
    _atomic_dir,
    build_clip_tokenizer,
    cache_root,
    clip_vocab_and_merges,
    ensure_tiny,
)

TINY_SDXL_VERSION = "1"
TEXT_WIDTHS = (16, 24)
PROJECTION_DIM = 16
TIME_EMBED_DIM = 8


def _tokenizer(dest: Path) -> None:
    build_clip_tokenizer(dest)
    vocab, merges = clip_vocab_and_merges()
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                     encoding="utf-8")


def _build(root: Path) -> None:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=PROJECTION_DIM,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    torch.manual_seed(0)
    encoder, encoder_2 = CLIPTextModel(text_config(TEXT_WIDTHS[0])), CLIPTextModelWithProjection(text_config(TEXT_WIDTHS[1]))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(TEXT_WIDTHS), attention_head_dim=(4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    encoder_2.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    shutil.copytree(ensure_tiny("diffusion") / "vae", root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    _tokenizer(root / "tokenizer")
    _tokenizer(root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def ensure_tiny_sdxl() -> Path:
    """The tiny SDXL folder (built once, atomically, under `$EDITFORGE_CACHE`)."""
    return _atomic_dir(cache_root() / f"tiny-sdxl-v{TINY_SDXL_VERSION}", _build)


if __name__ == "__main__":
    print(ensure_tiny_sdxl())
