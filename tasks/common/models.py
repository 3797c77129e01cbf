"""One registry for every model the pipeline loads: diffusion, CLIP (filtering), DINOv2 and the caption LM.

Presets (``tiny``, ``sd15``, ``sdxl``, ``sdxl-turbo``, ``tiny-sdxl``, ``world``, ``sd15-arch``; CLIP, LM and
DINOv2 names) load through the libraries' own ``from_pretrained`` / open_clip paths; ``models.<kind>_path``
points a preset at a local folder, and weights missing offline are an error naming that setting.
:data:`MODELS` holds what a process has loaded, keyed by model identity, never by a stage hash.

Every preset in full: docs/running.md ("In the code").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch

from tasks.common.config import SCHEDULER_CLASSES
from tasks.common.errors import InputError, PermanentError
from tasks.common.tiny import ensure_tiny

DIFFUSION_HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
}
# presets in SDXL's layout: a second text encoder with a projection (tokenizer_2, text_encoder_2)
SDXL_PRESETS = ("sdxl", "sdxl-turbo", "tiny-sdxl")


class ModelNotAvailableError(PermanentError, RuntimeError):
    """Weights for a preset could not be found locally (and the network is off)."""


@dataclass
class DiffusionComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    preset: str = ""
    source: str = ""

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DiffusionComponents:
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                same_dtype = dtype is None or next(module.parameters()).dtype == dtype
                module.to(device=device) if same_dtype else module.to(device=device, dtype=dtype)
        return self


@dataclass
class ClipComponents:
    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preset: str = ""
    source: str = ""


def _not_available(
    preset: str, setting: str, source: str, err: Exception, path: str | None = None
) -> ModelNotAvailableError:
    """One message that tells a missing folder, an unreadable one and weights never downloaded apart."""
    why = f"{type(err).__name__}: {str(err)[:300]}"
    if path and not Path(path).exists():
        return ModelNotAvailableError(
            f"model preset {preset!r}: {setting}={path} does not exist; point it at the "
            "folder (or file) holding the weights"
        )
    if path or Path(source).exists():
        return ModelNotAvailableError(
            f"model preset {preset!r}: the weights at {path or source} could not be loaded ({why}); the folder is "
            f"incomplete or a file is corrupt: copy it again, or fix {setting}"
        )
    return ModelNotAvailableError(
        f"model preset {preset!r}: weights {source!r} are not available offline ({why}). "
        f"Download them on a connected machine and set `{setting}` to the local folder "
        f"(e.g. --set {setting}=/models/...), or use the 'tiny' preset."
    )


def _world_dir(kind: str, setting: str) -> Path:
    """The shipped world model folder of ``kind``: package data of ``tasks.world`` (``weights/<kind>``, written
    by :mod:`tasks.world.build`, whose code is above this layer); an error naming the fixes if absent."""
    folder = Path(str(resources.files("tasks.world").joinpath("weights", kind)))
    if not folder.is_dir():
        raise ModelNotAvailableError(
            f"model preset 'world': {folder} is missing; it ships with the repository (git checkout "
            f"tasks/world/weights), or rebuild it with `python -m tasks.world.build` (about 15 CPU-minutes), "
            f"or point {setting} at a build's {kind}/ folder"
        )
    return folder


def _sd15_arch_components():
    """Full-size SD 1.5 UNet/VAE/text-encoder with random weights (no download)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tasks.common.tiny import build_clip_tokenizer, cache_root

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            vocab_size=49408,
        )
    )
    tok_dir = cache_root() / "sd15-arch-tokenizer"
    if not tok_dir.exists():
        build_clip_tokenizer(tok_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return DiffusionComponents(
        unet, vae, text_encoder, tokenizer, scheduler, preset="sd15-arch", source="random-init"
    )


def _vae_source(path: str) -> tuple[str, dict[str, Any]]:
    """(source, from_pretrained kwargs) of a VAE: an AutoencoderKL folder, a pipeline folder (its vae/), or a hub id."""
    root = Path(path)
    if root.is_dir() and not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        return path, {"subfolder": "vae"}
    return path, ({} if root.exists() else {"local_files_only": True})


def load_vae_from(path: str, latent_channels: int | None = None):
    """An ``AutoencoderKL`` from ``models.vae_path`` (safetensors), checked against the UNet's latent channels."""
    from diffusers import AutoencoderKL

    source, kw = _vae_source(path)
    try:
        vae = AutoencoderKL.from_pretrained(source, use_safetensors=True, **kw)
    except Exception as err:  # OSError, ValueError, a corrupt safetensors file, ...
        raise _not_available("vae", "models.vae_path", source, err, path) from err
    if latent_channels is not None and vae.config.latent_channels != latent_channels:
        raise ModelNotAvailableError(
            f"models.vae_path={path}: this VAE has {vae.config.latent_channels} latent channels, the diffusion "
            f"model's UNet works on {latent_channels}; point models.vae_path at a VAE of that model family "
            "(or unset it to use the model's own)"
        )
    return vae.eval().requires_grad_(False)


def load_vae(cfg: Any, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """The VAE ``models.vae_path`` names (``cfg``: the pipeline config or its ``models`` section), on
    ``device`` in ``dtype``; None when unset (the diffusion model's own VAE is used)."""
    models = getattr(cfg, "models", cfg)
    if not models.vae_path:
        return None
    vae = load_vae_from(models.vae_path)
    if device is not None or dtype is not None:
        vae.to(device=device, dtype=dtype)
    return vae


def load_diffusion(
    preset: str, path: str | None = None, scheduler: str = "euler_ancestral", vae_path: str | None = None
) -> DiffusionComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the sampling scheduler for `preset`.

    ``vae_path`` (``models.vae_path``): decode with that ``AutoencoderKL`` instead of the model's own
    (the reference decoded SD 1.5 with ``sd-vae-ft-mse``; SDXL in float16 wants ``sdxl-vae-fp16-fix``).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if preset == "sd15-arch":
        comps = _sd15_arch_components()
        comps.scheduler = make_scheduler(scheduler)  # SD 1.5's betas; honour the requested sampler
    else:
        if preset in ("tiny", "tiny-sdxl"):
            source = str(path or ensure_tiny("diffusion" if preset == "tiny" else "diffusion-sdxl"))
        elif preset == "world":
            source = path or str(_world_dir("diffusion", "models.diffusion_path"))
        elif preset in DIFFUSION_HUB_IDS:
            source = path or DIFFUSION_HUB_IDS[preset]
        else:
            raise ValueError(
                f"unknown diffusion preset {preset!r}; expected one of tiny, tiny-sdxl, world, sd15, sdxl, "
                "sdxl-turbo, sd15-arch"
            )
        local = Path(source).exists()
        kw: dict[str, Any] = {"local_files_only": True} if not local else {}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True, **kw)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True, **kw)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            te_cls = CLIPTextModel
            text_encoder = te_cls.from_pretrained(
                source, subfolder="text_encoder", use_safetensors=True, **kw
            )
            text_encoder_2 = tokenizer_2 = None
            if preset in SDXL_PRESETS:
                tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
                text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", use_safetensors=True, **kw
                )
        except Exception as err:  # OSError, ValueError, a corrupt safetensors file (SafetensorError), ...
            raise _not_available(preset, "models.diffusion_path", source, err, path) from err
        comps = DiffusionComponents(
            unet,
            vae,
            text_encoder,
            tokenizer,
            None,
            text_encoder_2,
            tokenizer_2,
            preset=preset,
            source=source,
        )
        comps.scheduler = make_scheduler(scheduler, source, local_files_only=not local)
    if vae_path:
        comps.vae = load_vae_from(vae_path, comps.unet.config.out_channels)
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    return comps


def make_scheduler(name: str, source: str | None = None, local_files_only: bool = True):
    """A diffusers scheduler by short name, configured from the model's scheduler config when given."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise InputError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULER_CLASSES)}")
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    if source is None:
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return cls.from_pretrained(source, subfolder="scheduler", local_files_only=local_files_only)


class ClipConfigMismatchError(ModelNotAvailableError):
    """A CLIP checkpoint folder's own config contradicts the preset it is loaded for."""


@dataclass(frozen=True)
class ClipPreset:
    """An open_clip architecture, the pretrained tag of its weights, and the activation they were trained with.

    OpenAI's CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``); open_clip 3.x builds
    its plain configs (``ViT-L-14``) with ``nn.GELU``. The activation has no parameters, so a
    checkpoint file cannot tell which one it needs: the preset says it.
    """

    arch: str
    tag: str
    quick_gelu: bool


# `vit-l-14` is OpenAI's ViT-L/14 (the paper's filter): open_clip's `ViT-L-14-quickgelu` config, tag `openai`
CLIP_PRESETS = {"vit-l-14": ClipPreset("ViT-L-14-quickgelu", "openai", quick_gelu=True)}


@dataclass(frozen=True)
class ClipBuild:
    """How :func:`load_clip` calls ``open_clip.create_model``: name, pretrained (tag or file), QuickGELU."""

    name: str
    pretrained: str | None
    quick_gelu: bool | None  # None: the folder's own open_clip_config.json decides


def _tag_quick_gelu(arch: str, tag: str) -> bool | None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    return bool(cfg.get("quick_gelu", False)) if cfg else None


def clip_build(preset: str, path: str | None = None) -> ClipBuild:
    """Resolve a CLIP preset (+ ``models.clip_path``) to an open_clip name, weights and activation.

    - a named preset (``vit-l-14``): its architecture and activation, weights from its tag or ``path``
      (a safetensors checkpoint file, or an ``open_clip_config.json`` folder whose ``quick_gelu`` must
      agree with the preset: see :func:`check_clip_folder`);
    - ``tiny``: the project's folder (its config says QuickGELU);
    - any other open_clip name: with a pretrained tag as ``path``, the activation that tag was trained
      with (open_clip's pretrained table, e.g. ``ViT-B-32`` + ``openai`` -> QuickGELU); with a file, the
      name's own config (pick a ``-quickgelu`` name for QuickGELU weights).
    """
    if preset == "tiny":
        return ClipBuild(f"local-dir:{path or ensure_tiny('clip')}", None, None)
    if preset == "world":
        return ClipBuild(f"local-dir:{path or _world_dir('clip', 'models.clip_path')}", None, None)
    if preset in CLIP_PRESETS:
        spec = CLIP_PRESETS[preset]
        if path and Path(path).is_dir():
            return ClipBuild(f"local-dir:{path}", None, None)
        return ClipBuild(spec.arch, path or spec.tag, spec.quick_gelu)
    if path and Path(path).is_dir():
        return ClipBuild(f"local-dir:{path}", None, None)
    if path and not Path(path).exists():  # a pretrained tag of that architecture (or a missing file)
        return ClipBuild(preset, path, _tag_quick_gelu(preset, path))
    return ClipBuild(preset, path, None)


def check_clip_folder(preset: str, folder: str) -> None:
    """A checkpoint folder loaded for a named preset must declare the preset's activation.

    The one disagreement that is detectable: the weights themselves carry no activation, but an
    ``open_clip_config.json`` does (``model_cfg.quick_gelu``, false when absent).
    """
    spec = CLIP_PRESETS.get(preset)
    config = Path(folder) / "open_clip_config.json"
    if spec is None or not config.is_file():
        return
    import json

    try:
        declared = bool(
            json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {}).get("quick_gelu", False)
        )
    except (OSError, ValueError):
        return  # open_clip reports an unreadable config itself
    if declared != spec.quick_gelu:
        act = "QuickGELU" if spec.quick_gelu else "GELU"
        raise ClipConfigMismatchError(
            f"models.clip_path={folder}: its open_clip_config.json says quick_gelu={str(declared).lower()}, but "
            f'models.clip={preset} is {spec.arch}/{spec.tag}, trained with {act}; set "quick_gelu": '
            f"{str(spec.quick_gelu).lower()} in model_cfg if these are those weights, or set models.clip to the "
            "open_clip name of the weights in the folder"
        )


def _clip_checkpoint_error(
    preset: str, build: ClipBuild, path: str, err: Exception
) -> ModelNotAvailableError | None:
    """A checkpoint whose tensors do not fit the preset's architecture (open_clip's strict load)."""
    text = str(err)
    # torch's strict load_state_dict, or open_clip's positional-embedding resize asserting on another width
    if (
        "size mismatch" in text
        or "Missing key" in text
        or "Unexpected key" in text
        or isinstance(err, AssertionError)
    ):
        return ClipConfigMismatchError(
            f"models.clip_path={path}: the checkpoint does not fit models.clip={preset} ({build.name}): "
            f"{text.splitlines()[0][:200]} ...; point models.clip_path at {build.name} weights, or set models.clip "
            "to the open_clip name of this checkpoint"
        )
    return None


def load_clip(preset: str, path: str | None = None) -> ClipComponents:
    """Load an open_clip model for filtering. `path` may be a local-dir folder or a safetensors checkpoint file.

    Built with the activation its weights were trained with (:func:`clip_build`): ``vit-l-14`` is
    OpenAI's ViT-L/14 with QuickGELU, from the hub tag or from a checkpoint file.
    """
    import open_clip

    if path and Path(path).is_file() and not path.endswith(".safetensors"):
        raise ModelNotAvailableError(
            f"models.clip_path={path}: CLIP checkpoints are loaded from safetensors only; convert it "
            "(safetensors.torch.save_file(state_dict, 'model.safetensors')) and point models.clip_path at that file"
        )
    build = clip_build(preset, path)
    if build.name.startswith("local-dir:"):
        check_clip_folder(preset, build.name.removeprefix("local-dir:"))
    try:
        model = open_clip.create_model(
            build.name, pretrained=build.pretrained, force_quick_gelu=bool(build.quick_gelu)
        )
        if build.quick_gelu is False and model_uses_quick_gelu(model):
            raise ClipConfigMismatchError(
                f"models.clip={preset}: open_clip's {build.name} config builds QuickGELU, but its weights "
                f"{build.pretrained!r} were trained with GELU; use the name without -quickgelu"
            )
        tokenizer = open_clip.get_tokenizer(build.name)
    except ClipConfigMismatchError:
        raise
    except Exception as err:  # open_clip raises many kinds (RuntimeError, OSError, HF errors) when offline
        mismatch = _clip_checkpoint_error(preset, build, path, err) if path else None
        if mismatch is not None:
            raise mismatch from err
        raise _not_available(
            preset, "models.clip_path", path or f"{build.name}:{build.pretrained}", err, path
        ) from err
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ClipComponents(
        model, tokenizer, int(size), tuple(mean), tuple(std), preset=preset, source=build.name
    )


def model_uses_quick_gelu(model) -> bool:
    """Whether an open_clip model's transformer MLPs use open_clip's QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def load_lm(preset: str, path: str | None = None):
    """Load a causal LM and its tokenizer (tiny preset, hub id or local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if preset == "world":
        source = path or str(_world_dir("lm", "models.lm_path"))
    else:
        source = str(path or ensure_tiny("lm")) if preset == "tiny" else (path or preset)
    local = Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not local)
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, local_files_only=not local)
    except Exception as err:  # OSError, ValueError, a corrupt safetensors file, ...
        raise _not_available(preset, "models.lm_path", source, err, path) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DINO_HUB_IDS = {f"dinov2-{size}": f"facebook/dinov2-{size}" for size in ("small", "base", "large", "giant")}


@dataclass
class DinoComponents:
    """A DINOv2 ``Dinov2Model`` and the preprocessing its image processor declares (short side resized to
    ``resize``, centre crop ``crop``, normalised with ``mean`` / ``std``)."""

    model: Any
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preset: str = ""
    source: str = ""


def load_dino(preset: str, path: str | None = None) -> DinoComponents:
    """Load a DINOv2 model (``models.dino`` / ``models.dino_path``) with its image processor's settings."""
    from transformers import AutoImageProcessor, Dinov2Model

    source = (
        str(path or ensure_tiny("dino")) if preset == "tiny" else (path or DINO_HUB_IDS.get(preset, preset))
    )
    local = Path(source).exists()
    try:
        model = Dinov2Model.from_pretrained(source, use_safetensors=True, local_files_only=not local)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=not local)
    except Exception as err:  # OSError, ValueError, a corrupt safetensors file, ...
        raise _not_available(preset, "models.dino_path", source, err, path) from err
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    resize = int(size.get("shortest_edge") or size.get("height") or model.config.image_size)
    crop_hw = (int(crop.get("height", resize)), int(crop.get("width", resize)))
    model.eval().requires_grad_(False)
    return DinoComponents(
        model,
        resize,
        crop_hw,
        tuple(processor.image_mean),
        tuple(processor.image_std),
        preset=preset,
        source=source,
    )


T = TypeVar("T")


class ModelCache:
    """Loaded models by kind (``diffusion``, ``clip``, ``lm``): one per kind, keyed by its identity."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Hashable, Any]] = {}
        self.loads: Counter[str] = Counter()

    def get(self, kind: str, identity: Hashable, load: Callable[[], T]) -> T:
        """The ``kind`` model with this ``identity``, loaded by ``load()`` unless it is the one held."""
        held = self._held.get(kind)
        if held is None or held[0] != identity:
            self._held.pop(kind, None)  # let the old weights go before the new ones arrive (GPU memory)
            self._held[kind] = (identity, load())
            self.loads[kind] += 1
        return self._held[kind][1]

    def clear(self) -> None:
        self._held.clear()


MODELS = ModelCache()
