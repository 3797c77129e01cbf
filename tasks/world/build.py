"""Train the world's small models, once, deterministically, on a CPU; write them in the libraries' formats.

    python -m tasks.world.build                       # all four into tasks/world/weights/ (~15 CPU-minutes)
    python -m tasks.world.build --out /tmp/w --scale 0.02   # a seconds-long build (tests)

What is trained, in order, on scenes and edit triplets of world seed :data:`tasks.world.data.TRAIN_SEED`:

1. **CLIP** (``clip/``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, the layout the
   ``tiny`` CLIP uses and ``open_clip.create_model("local-dir:…")`` reads): a ViT (64², patch 8) and a
   text transformer, contrastive (InfoNCE, learned temperature) on the before and after images of edit
   triplets with their captions, so every batch holds pairs that differ in one attribute (hard
   negatives), plus an image-image term that tells a pair from the same two scenes with their shapes
   moved (so image-image similarity sees layout); half of each batch blurred (the renders it will score
   are soft-edged). The filter scores pairs with it. Tokenizer: CLIP's BPE cut down to the world's words
   (:func:`tasks.world.clip_text.build_world_tokenizer`).
2. **VAE** (``diffusion/vae``): diffusers ``AutoencoderKL``, 64² RGB to 16²x4 latents, L1 + MSE (shape
   pixels weighted 8x the background's) with a small KL term; its ``scaling_factor`` is set to 1 / std
   of the training latents, as SD's.
3. **UNet** (``diffusion/unet``): diffusers ``UNet2DConditionModel`` with self- and cross-attention at
   16² and 8², 8 heads, self-attention started as feature similarity (:func:`world_unet`; Prompt-to-Prompt
   sharing applies to its self-attention layers, whose maps must carry the layout), v-prediction on SD 1.x's noise
   schedule (scaled-linear betas 0.00085-0.012, 1000 steps), min-SNR-5 loss weights, 10% of the
   captions dropped to "" (classifier-free guidance), EMA weights. Its text encoder
   (``diffusion/text_encoder``) is the CLIP's text tower as a transformers ``CLIPTextModel``, frozen —
   as SD 1.5 conditions on OpenAI CLIP's (:mod:`tasks.world.clip_text`); tokenizer: the CLIP's.
   Scheduler: Euler ancestral with those betas. Folder: ``StableDiffusionPipeline`` layout.
4. **LM** (``lm/``): a GPT-2-sized causal LM (2 layers, width 128; rotary positions, transformers'
   ``LlamaForCausalLM``) with its own byte-level BPE, pre-trained on world triplets in the paper's
   fine-tune format (loss on the completion; each batch run in four parts of similar length, the vocabulary
   head on the completions only: :func:`lm_loss`) plus the project's seed triplets and world captions; the
   pipeline's fine-tune stage then fine-tunes it on ``builtin:world`` seeds (:mod:`tasks.world.data`).

Token embeddings of the two CLIP-vocabulary text towers start at zero for tokens that appear in no
training caption: they are never looked up in training, so they stay zero (the files compress, and an
unknown word adds nothing rather than a random vector).

Determinism: every random draw comes from a seeded ``torch.Generator`` (or numpy's PCG64 for the world),
models are initialised after ``torch.manual_seed``, ``torch.use_deterministic_algorithms(True)`` is on
while building, and batches are drawn in a fixed order; two builds with the same thread count on the
same machine and library versions write the same bytes (a test builds twice at a small scale). The
manifest ``build.json`` records steps, losses, timings, thread count, library versions and the sha256 of
every file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.common.storage import local_dir_atomic
from tasks.world.data import TRAIN_SEED
from tasks.world.edits import sample_triplets
from tasks.world.scene import WORLD_IMAGE_SIZE, Scene, caption, image_array, sample_scene
from tasks.world.weights import MANIFEST, weights_dir

WORLD_BUILD_VERSION = "2"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_WIDTH = 64
TOKENIZER_TEXTS = 4096  # world captions whose words the tokenizer keeps (every word of the grammar occurs)


def open_clip_config(vocab_size: int) -> dict:
    """The world CLIP's ``open_clip_config.json``: its tokenizer is the folder's own (``hf_tokenizer_name``:
    open_clip reads a ``local-dir:`` model's tokenizer from that folder)."""
    return {
        "model_cfg": {
            "embed_dim": 64,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": WORLD_IMAGE_SIZE,
                "layers": 2,
                "width": 64,
                "head_width": 32,
                "patch_size": 8,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": vocab_size,
                "width": TEXT_WIDTH,
                "heads": 2,
                "layers": 2,
                "hf_tokenizer_name": ".",
            },
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


LATENT_FACTOR = 4  # the VAE downsamples 64² to 16²
LM_LAYERS = 2
# SD 1.x's noise schedule; v-prediction (SD 2's): at high noise the target is the image, so the text's
# global facts (background, colours) are learned within the CPU budget (epsilon prediction left them out)
BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
}


@dataclass(frozen=True)
class BuildPlan:
    """Sizes and steps of one build; :meth:`scaled` shrinks every step count (tests)."""

    clip_triplets: int = 2048
    clip_steps: int = 500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_image_weight: float = 1.0
    vae_images: int = 4096
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_images: int = 4096
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    unet_channels: tuple[int, int] = (32, 64)
    unet_heads: int = 8
    unet_qk_init: float = 2.0
    lm_triplets: int = 3000
    # copying the input caption into the output emerges after ~1500 steps; 3500: ~80% world edits
    # (bench/world_lm.py)
    lm_steps: int = 3500
    lm_batch: int = 32
    lm_lr: float = 3e-3
    seed: int = 0

    def scaled(self, factor: float) -> BuildPlan:
        if factor == 1:
            return self
        steps = {
            k: max(2, int(round(getattr(self, k) * factor)))
            for k in ("clip_steps", "vae_steps", "unet_steps", "lm_steps")
        }
        sizes = {
            k: max(64, int(round(getattr(self, k) * factor)))
            for k in ("clip_triplets", "vae_images", "unet_images", "lm_triplets")
        }
        return replace(self, **steps, **sizes)


@dataclass
class Timer:
    figures: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.figures[name] = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    return lambda s: (
        min(1.0, (s + 1) / max(1, warmup))
        * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    every = max(1, len(losses) // points)
    return [
        [i + every, round(float(np.mean(losses[i : i + every])), 5)] for i in range(0, len(losses), every)
    ]


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------- CLIP


def _zero_unused_tokens(embedding: torch.nn.Embedding, used: torch.Tensor) -> None:
    with torch.no_grad():
        keep = torch.zeros(embedding.weight.shape[0], dtype=torch.bool)
        keep[used] = True
        embedding.weight[~keep] = 0.0


@cache
def train_scenes(n: int) -> tuple[Scene, ...]:
    """Scenes 0..n-1 of the world's training seed (drawn once per process: the tokenizers, the VAE and
    the UNet all read the first 4096)."""
    return tuple(sample_scene(TRAIN_SEED, i) for i in range(n))


@cache
def tokenizer_texts() -> tuple[str, ...]:
    """The texts whose words the world tokenizer keeps (:func:`tasks.world.clip_text.build_world_tokenizer`)."""
    return tuple(caption(s) for s in train_scenes(TOKENIZER_TEXTS))


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def build_clip(out: Path, plan: BuildPlan, log: Callable[[str], None]) -> dict:
    """The CLIP (see the module doc). Besides the caption loss, an image-image InfoNCE term (weight
    ``plan.clip_image_weight``): each before image's positive is its after image (the same picture, one
    attribute edited) and its negatives are the batch's other images and the same two scenes with their
    shapes moved (:func:`tasks.world.scene.relayout`: same captions, another layout), both ways round; so
    image-image similarity sees where things are, as a real CLIP's does, and not only what the caption says."""
    import open_clip
    from safetensors.torch import save_file
    from torchvision.transforms.functional import gaussian_blur

    from tasks.world.clip_text import build_world_tokenizer
    from tasks.world.scene import relayout, rng_for

    folder = out / "clip"
    tokenizer = build_world_tokenizer(folder, tokenizer_texts())
    config = open_clip_config(len(tokenizer))
    triplets = sample_triplets(TRAIN_SEED, plan.clip_triplets)
    held_out = max(32, plan.clip_triplets // 16)
    images = np.stack([image_array(s) for t in triplets for s in (t.before, t.after)])
    moved = np.stack(
        [
            image_array(relayout(s, rng_for(TRAIN_SEED, i, side, 5)))
            for i, t in enumerate(triplets)
            for side, s in enumerate((t.before, t.after))
        ]
    )
    captions = [c for t in triplets for c in (t.input, t.output)]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x_all = (to_unit(images) - mean) / std
    x_moved = (to_unit(moved) - mean) / std
    tokens = tokenize(tokenizer, captions)
    n_train = 2 * (plan.clip_triplets - held_out)

    torch.manual_seed(plan.seed + 1)
    model = open_clip.CLIP(**config["model_cfg"])
    _zero_unused_tokens(model.token_embedding, tokens.unique())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=plan.clip_lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine(plan.clip_steps // 10, plan.clip_steps, 0.0))
    gen = torch.Generator().manual_seed(plan.seed + 11)
    losses = []
    model.train()

    def blurred(x: torch.Tensor) -> torch.Tensor:
        # half the images blurred (sigma 0.5-2 px): the filter scores the UNet's soft-edged renders, not drawings
        sigma = 0.5 + 1.5 * float(torch.rand((), generator=gen))
        half = len(x) // 2
        return torch.cat([x[:half], gaussian_blur(x[half:], kernel_size=[9, 9], sigma=[sigma, sigma])])

    for step in range(plan.clip_steps):
        pairs = torch.randint(0, n_train // 2, (plan.clip_batch // 2,), generator=gen)
        idx = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()  # before and after of each triplet
        tok = tokens[idx]
        fi = model.encode_image(blurred(x_all[idx]), normalize=True)
        ft = model.encode_text(tok, normalize=True)
        scale = model.logit_scale.exp()
        logits = scale * fi @ ft.T
        same = (
            (tok.unsqueeze(1) == tok.unsqueeze(0)).all(-1).float()
        )  # a caption twice in a batch: both right
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if plan.clip_image_weight:
            fm = model.encode_image(blurred(x_moved[idx]), normalize=True)
            before, after, moved_b, moved_a = fi[0::2], fi[1::2], fm[0::2], fm[1::2]
            right = torch.arange(len(before))
            image_loss = (
                F.cross_entropy(scale * before @ torch.cat([after, moved_a, moved_b]).T, right)
                + F.cross_entropy(scale * after @ torch.cat([before, moved_b, moved_a]).T, right)
            ) / 2
            loss = loss + plan.clip_image_weight * image_loss
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"clip step {step}/{plan.clip_steps}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        fi = model.encode_image(x_all[n_train:], normalize=True)
        ft = model.encode_text(tokens[n_train:], normalize=True)
        top1 = float(((fi @ ft.T).argmax(1) == torch.arange(len(fi))).float().mean())
        fm = model.encode_image(x_moved[n_train:], normalize=True)
        edit = (fi[0::2] * fi[1::2]).sum(-1)  # before . after: same layout, one attribute edited
        moved_edit = (fi[0::2] * fm[1::2]).sum(-1)  # before . the after image's shapes moved
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    return {
        "steps": plan.clip_steps,
        "batch": plan.clip_batch,
        "train_images": n_train,
        "vocab": len(tokenizer),
        "loss_first": losses[0],
        "loss_last10": float(np.mean(losses[-10:])),
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "held_out_image_to_text_top1": round(top1, 4),
        "held_out_images": len(fi),
        "held_out_image_similarity": {
            "edit_same_layout": round(float(edit.mean()), 4),
            "edit_moved": round(float(moved_edit.mean()), 4),
            "same_layout_above_moved": round(float((edit > moved_edit).float().mean()), 4),
        },
        "loss_curve": _curve(losses),
    }


# --------------------------------------------------------------------------- VAE


def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior modes of images ``x`` (unscaled), in chunks of 256 from the first: the UNet
    trains on the chunks the VAE build encoded (the same numbers, not encoded twice)."""
    with torch.no_grad():
        return torch.cat([vae.encode(x[i : i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])


def world_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=WORLD_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    with (
        torch.no_grad()
    ):  # start with a near-deterministic posterior (std e^-4): reconstruction learns at once
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -8.0
    return vae


def build_vae(out: Path, plan: BuildPlan, log: Callable[[str], None]):
    from tasks.world.scene import BACKGROUNDS

    scenes = train_scenes(plan.vae_images)
    x_all = to_unit(np.stack([image_array(s) for s in scenes])) * 2 - 1
    backgrounds = (
        torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32).view(-1, 3, 1, 1)
        / 127.5
        - 1
    )
    held_out = max(16, plan.vae_images // 32)
    n_train = len(x_all) - held_out
    vae = world_vae(plan.seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine(50, plan.vae_steps))
    gen = torch.Generator().manual_seed(plan.seed + 12)
    losses = []
    vae.train()
    for step in range(plan.vae_steps):
        idx = torch.randint(0, n_train, (plan.vae_batch,), generator=gen)
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # the shapes' pixels weigh 8x the background's: else the few pixels of a small shape lose their colour
        weight = 1 + 7 * ((x - backgrounds[idx]).abs().sum(1, keepdim=True) > 0.1).float()
        err = recon - x
        loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"vae step {step}/{plan.vae_steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        encoded = encode_latents(vae, x_all)
        # the statistic reads the chunks that start below n_train (so far always every image)
        latents = encoded[: min(len(x_all), -(-n_train // 256) * 256)]
        scale = 1.0 / float(latents.std())
        test = x_all[n_train:]
        recon = vae.decode(vae.encode(test).latent_dist.mode()).sample.clamp(-1, 1)
        test_l1 = float((recon - test).abs().mean()) / 2  # in [0, 1] units
    vae.register_to_config(scaling_factor=round(scale, 6))
    figures = {
        "steps": plan.vae_steps,
        "batch": plan.vae_batch,
        "train_images": n_train,
        "loss_first": losses[0],
        "loss_last10": float(np.mean(losses[-10:])),
        "held_out_l1_per_pixel": round(test_l1, 5),
        "scaling_factor": round(scale, 6),
        "latent_mean": round(float(latents.mean()), 4),
        "loss_curve": _curve(losses),
    }
    return vae, figures, encoded


# --------------------------------------------------------------------------- UNet (+ text encoder, tokenizer, scheduler)


def world_unet(seed: int, channels: tuple[int, int], heads: int = 8, qk_init: float = 2.0):
    """Transformer blocks (self-attention, cross-attention) at both latent sizes, 16² and 8², with ``heads``
    heads: Prompt-to-Prompt shares the self-attention maps, so they must see the layout (at 16² a token is
    4x4 pixels). Every self-attention's query and key projections start as ``qk_init`` times the identity,
    so attention starts as feature similarity (a token attends to tokens that look like it: non-local
    means), sharp from the first step; from the default initialisation the maps stayed near-uniform
    through training (entropy 0.97-0.99 of uniform at 16² after 1500 steps, against 0.65-0.81), and
    sharing a near-uniform map changes nothing."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=WORLD_IMAGE_SIZE // LATENT_FACTOR,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=heads,
        norm_num_groups=16,  # diffusers' legacy name: the number of heads
    )
    if qk_init:
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn1"):  # self-attention (attn2 is the cross-attention)
                    eye = torch.eye(module.to_q.weight.shape[0])
                    module.to_q.weight.copy_(qk_init * eye)
                    module.to_k.weight.copy_(qk_init * eye)
    return unet


def _clip_model(folder: Path):
    import open_clip
    from safetensors.torch import load_file

    config = json.loads((folder / "open_clip_config.json").read_text())
    model = open_clip.CLIP(**config["model_cfg"])
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    return model.eval(), config["model_cfg"]


def build_diffusion(
    out: Path, plan: BuildPlan, vae, log: Callable[[str], None], encoded: torch.Tensor | None = None
) -> dict:
    """The UNet, its text encoder, tokenizer and scheduler (see the module doc). ``encoded``: the
    unscaled latents of the first ``len(encoded)`` training scenes as :func:`encode_latents` gave them
    in the VAE build; used when they are the UNet's images, else the images are drawn and encoded here."""
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

    from tasks.common.tiny import save_text_encoder
    from tasks.world.clip_text import build_world_tokenizer, check_same_hidden_states, to_transformers

    folder = out / "diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_world_tokenizer(folder / "tokenizer", tokenizer_texts())
    clip, model_cfg = _clip_model(out / "clip")
    encoder = to_transformers(clip, model_cfg).requires_grad_(False)
    scenes = train_scenes(plan.unet_images)
    captions = [caption(s) for s in scenes]
    check_same_hidden_states(clip, encoder, tokenizer, captions[:8])
    if encoded is None or len(encoded) != len(scenes):
        encoded = encode_latents(vae, to_unit(np.stack([image_array(s) for s in scenes])) * 2 - 1)
    with torch.no_grad():
        latents = encoded * vae.config.scaling_factor
        unique = sorted(set(captions)) + [""]
        ids = tokenize(tokenizer, unique)
        hidden = torch.cat([encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
        where = {c: i for i, c in enumerate(unique)}
        caption_index = torch.tensor([where[c] for c in captions])
        null = where[""]

    unet = world_unet(plan.seed + 3, plan.unet_channels, plan.unet_heads, plan.unet_qk_init)
    ema = [p.detach().clone() for p in unet.parameters()]
    noise_schedule = DDPMScheduler(**BETAS)
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    opt = torch.optim.AdamW(unet.parameters(), lr=plan.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine(100, plan.unet_steps))
    gen = torch.Generator().manual_seed(plan.seed + 13)
    losses = []
    unet.train()
    n = len(latents)
    for step in range(plan.unet_steps):
        idx = torch.randint(0, n, (plan.unet_batch,), generator=gen)
        x0 = latents[idx]
        which = caption_index[idx].clone()
        which[torch.rand(plan.unet_batch, generator=gen) < 0.1] = null
        t = torch.randint(0, BETAS["num_train_timesteps"], (plan.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(noise_schedule.add_noise(x0, noise, t), t, hidden[which]).sample
        target = noise_schedule.get_velocity(x0, noise, t)
        weight = torch.clamp(snr[t], max=5.0) / (snr[t] + 1)  # min-SNR-5 for v-prediction
        loss = (weight * (pred - target).pow(2).mean((1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"unet step {step}/{plan.unet_steps}: loss {loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    save_text_encoder(encoder, folder / "text_encoder")
    EulerAncestralDiscreteScheduler(**BETAS).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
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
        + "\n"
    )
    return {
        "steps": plan.unet_steps,
        "batch": plan.unet_batch,
        "train_images": n,
        "distinct_captions": len(unique) - 1,
        "channels": list(plan.unet_channels),
        "heads": plan.unet_heads,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "loss_first": losses[0],
        "loss_last10": float(np.mean(losses[-10:])),
        "loss_curve": _curve(losses),
    }


# --------------------------------------------------------------------------- LM


def lm_corpus(plan: BuildPlan) -> list[tuple[str, str]]:
    """(prompt, completion) texts: world triplets and the project's seed triplets in the paper's fine-tune
    format (the loss on the completion only, as the fine-tune stage trains), and world captions (prompt "")."""
    from prompts.templates import finetune_completion, finetune_prompt
    from seed_annotations.schema import default_triplets_path

    texts = [
        (finetune_prompt(t.input), finetune_completion(t.edit, t.output))
        for t in sample_triplets(TRAIN_SEED, plan.lm_triplets, start=1_000_000)
    ]
    for line in default_triplets_path().read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append((finetune_prompt(row["input"]), finetune_completion(row["edit"], row["output"])))
    texts += [
        ("", caption(sample_scene(TRAIN_SEED, 2_000_000 + i))) for i in range(max(64, plan.lm_triplets // 8))
    ]
    return texts


def world_lm(vocab: int, eos: int, seed: int):
    """2 layers, width 128, rotary positions (transformers' Llama layout, GPT-2's size): with GPT-2's learned
    absolute positions the model had not learned to copy the input caption into the output in the CPU budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=LM_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=True,
        )
    )


def lm_loss(model, batch: list[tuple[list[int], list[int]]], pad: int, groups: int = 4) -> float:
    """Backpropagate the batch's mean next-token cross-entropy over the completions' tokens (the loss
    ``LlamaForCausalLM(labels=…)`` computes) and return it. The batch runs as ``groups`` parts of texts of
    similar length, each padded to its own longest text, and the vocabulary head runs on the scored
    positions only; the gradient is the whole batch's, up to floating-point reassociation."""
    order = sorted(range(len(batch)), key=lambda i: len(batch[i][0]))
    n = len(batch)
    parts = [[batch[i] for i in order[k * n // groups : (k + 1) * n // groups]] for k in range(groups)]
    parts = [part for part in parts if part]
    scored_total = sum(sum(t != -100 for t in lab[1:]) for _, lab in batch)
    total = 0.0
    for part in parts:
        width = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), width), pad)
        labels = torch.full((len(part), width), -100)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for i, (row, lab) in enumerate(part):
            ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = (
                torch.tensor(row),
                torch.tensor(lab),
                1,
            )
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        scored = target != -100
        loss = F.cross_entropy(model.lm_head(hidden[scored]).float(), target[scored], reduction="sum")
        (loss / scored_total).backward()
        total += loss.item()
    return total / scored_total


def build_lm(out: Path, plan: BuildPlan, log: Callable[[str], None]) -> dict:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = lm_corpus(plan)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [p + c for p, c in texts],
        vocab_size=1024,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    tok.model_max_length = 256
    encoded = []
    for prompt, completion in texts:
        p = tok(prompt, add_special_tokens=False).input_ids if prompt else []
        c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
        encoded.append((p + c, [-100] * len(p) + c))
    model = world_lm(len(tok), tok.eos_token_id, plan.seed + 4)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lm_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine(plan.lm_steps // 10, plan.lm_steps))
    gen = torch.Generator().manual_seed(plan.seed + 14)
    losses = []
    model.train()
    for step in range(plan.lm_steps):
        batch = [encoded[i] for i in torch.randint(0, len(encoded), (plan.lm_batch,), generator=gen).tolist()]
        loss = lm_loss(model, batch, tok.eos_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if step % 100 == 0:
            log(f"lm step {step}/{plan.lm_steps}: loss {loss:.3f}")
    model.eval()
    folder = out / "lm"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return {
        "steps": plan.lm_steps,
        "batch": plan.lm_batch,
        "corpus_texts": len(texts),
        "vocab": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": losses[0],
        "loss_last10": float(np.mean(losses[-10:])),
        "loss_curve": _curve(losses),
    }


# --------------------------------------------------------------------------- all of it


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def versions() -> dict[str, str]:
    import diffusers
    import open_clip
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def build_all(out: Path, plan: BuildPlan = BuildPlan(), log: Callable[[str], None] = print) -> dict:
    """Train and write all four models into ``out`` (replaced as a whole at the end); return the manifest."""
    timer = Timer()
    figures: dict = {}
    with local_dir_atomic(out) as tmp:
        with deterministic(), timer("total"):
            with timer("clip"):
                figures["clip"] = build_clip(tmp, plan, log)
            with timer("vae"):
                vae, figures["vae"], encoded = build_vae(tmp, plan, log)
            with timer("unet"):
                figures["unet"] = build_diffusion(tmp, plan, vae, log, encoded)
            del vae, encoded
            with timer("lm"):
                figures["lm"] = build_lm(tmp, plan, log)
        manifest = {
            "build_version": WORLD_BUILD_VERSION,
            "plan": asdict(plan),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "versions": versions(),
            "seconds": timer.figures,
            "figures": figures,
            "files": file_hashes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=weights_dir(), help="folder to (re)write (default: the shipped weights)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every step count and data size (tests: 0.02)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: as OMP_NUM_THREADS sets); these small models train in half the "
        "CPU-seconds on one thread as on two, and the bytes depend on the count",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    manifest = build_all(args.out, BuildPlan().scaled(args.scale))
    seconds = manifest["seconds"]
    print(
        f"built the world models in {args.out}: "
        + ", ".join(f"{k} {v['wall_s']:.0f} s ({v['cpu_s']:.0f} CPU-s)" for k, v in seconds.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
