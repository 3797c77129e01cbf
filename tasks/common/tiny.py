"""Build the `tiny` model preset offline: small random-init models saved in the libraries' own formats.

Every model is created from a small config with a fixed seed, written with `save_pretrained`
(safetensors) or, for open_clip, as an `open_clip_config.json` + `open_clip_model.safetensors`
folder, and then loaded back by `tasks.common.models` through exactly the same code path that
loads real weights (`from_pretrained(path, subfolder=...)`, `open_clip.create_model('local-dir:…')`).

The CLIP tokenizer uses the real CLIP BPE vocabulary that ships inside open_clip_torch, converted
to the vocab.json/merges.txt pair that transformers' `CLIPTokenizer` reads. The tiny causal LM
uses a byte-level BPE trained (deterministically, in milliseconds) on the seed annotations, so it
keeps newlines — the paper's completion format depends on them.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path

import torch

from tasks.common.storage import local_dir_atomic

TINY_BUILD_VERSION = "5"  # bump when a tiny config changes: the cache folder name follows it

TINY_IMAGE_SIZE = 64
CLIP_VOCAB_SIZE = 49408


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder under a temporary name, then rename it into place (safe across processes)."""
    if final.exists():
        return final
    with local_dir_atomic(final, keep_existing=True) as tmp:
        build(tmp)
    return final


def clip_bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary and merges, derived from open_clip's bundled BPE file."""
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(dest: Path):
    """A transformers CLIPTokenizer over the real CLIP vocabulary, saved with `save_pretrained`, plus the
    `vocab.json` and `merges.txt` the hub's SD repositories hold beside `tokenizer.json` (so the folder,
    and a trained model's copy of it, is readable by older transformers too)."""
    import json

    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    tok.save_pretrained(dest)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return tok


def save_text_encoder(encoder, dest: Path) -> None:
    """``save_pretrained``, with the weights under the hub's key names (``text_model.*``, as SD's
    repositories hold them): transformers 5 writes a ``CLIPTextModel`` without that prefix, which
    transformers 4 would not match and would silently re-initialise; both versions read these."""
    from safetensors.torch import load_file, save_file

    encoder.save_pretrained(dest, safe_serialization=True)
    weights = dest / "model.safetensors"
    state = load_file(weights)
    if not all(k.startswith("text_model.") for k in state):
        save_file(
            {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()},
            weights,
            metadata={"format": "pt"},
        )


def _build_diffusion(root: Path) -> None:
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    save_text_encoder(text_encoder, root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    build_clip_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )


def _build_diffusion_sdxl(root: Path) -> None:
    """A tiny SDXL-shaped model in diffusers' StableDiffusionXLPipeline layout: two text encoders (the
    second with a projection: pooled text embeddings), a UNet with SDXL's added text/time embeddings and
    cross-attention over both encoders' features, the tiny VAE (downsampling 4x) and tokenizers."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )

    torch.manual_seed(0)
    text_encoder, text_encoder_2 = (
        CLIPTextModel(text_config(16)),
        CLIPTextModelWithProjection(text_config(24)),
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    vae = AutoencoderKL(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    save_text_encoder(text_encoder, root / "text_encoder")
    text_encoder_2.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(root / "scheduler")
    build_clip_tokenizer(root / "tokenizer")
    build_clip_tokenizer(root / "tokenizer_2")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
                "force_zeros_for_empty_prompt": True,
            },
            indent=2,
        )
    )


TINY_OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": TINY_IMAGE_SIZE,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def _build_open_clip(root: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = TINY_OPEN_CLIP_CONFIG["model_cfg"]
    model = open_clip.CLIP(**cfg)
    root.mkdir(parents=True, exist_ok=True)
    (root / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors"
    )


def _lm_corpus() -> list[str]:
    from prompts.templates import finetune_completion, finetune_prompt

    path = resources.files("seed_annotations").joinpath("triplets.jsonl")
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(
                finetune_prompt(row.get("input") or row.get("caption", ""))
                + finetune_completion(row["edit"], row["output"])
            )
    return texts


def _build_lm(root: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_lm_corpus(), vocab_size=1024, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    tok.model_max_length = 256
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=256,
            n_embd=96,
            n_layer=2,
            n_head=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    )
    tok.save_pretrained(root)
    model.save_pretrained(root, safe_serialization=True)


TINY_DINO_IMAGE_SIZE = 64  # the demo renders 64x64


def _build_dino(root: Path) -> None:
    """A tiny random-init DINOv2 (`Dinov2Model`, patch 8 on 64x64: 64 patches + CLS) and its image
    processor (resize the short side, centre crop, ImageNet mean/std: DINOv2's own preprocessing).

    Initialised with weights 15x larger than transformers' default (std 0.3, not 0.02): at the default a
    random DINOv2's CLS embedding barely depends on its input (every pair's cosine 0.997-1.0 on the demo's
    renders), at 0.3 a rendered pair scores 0.70-0.99 (median 0.92) and two unrelated renders 0.37-0.89
    (median 0.75), so the demo's threshold has something to separate."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(
            image_size=TINY_DINO_IMAGE_SIZE,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            initializer_range=0.3,
        )
    )
    model.save_pretrained(root, safe_serialization=True)
    BitImageProcessor(
        size={"shortest_edge": TINY_DINO_IMAGE_SIZE},
        crop_size={"height": TINY_DINO_IMAGE_SIZE, "width": TINY_DINO_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root)


def cache_root() -> Path:
    return Path(os.environ.get("EDITFORGE_CACHE", Path.home() / ".cache" / "editforge"))


def ensure_tiny(kind: str) -> Path:
    """Return the folder of the tiny `kind` model ('diffusion', 'diffusion-sdxl', 'clip', 'lm' or 'dino'), building it once."""
    builders = {
        "diffusion": _build_diffusion,
        "diffusion-sdxl": _build_diffusion_sdxl,
        "clip": _build_open_clip,
        "lm": _build_lm,
        "dino": _build_dino,
    }
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {sorted(builders)}")
    return _atomic_dir(cache_root() / f"tiny-v{TINY_BUILD_VERSION}" / kind, builders[kind])
