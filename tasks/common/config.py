"""One pydantic config for the whole pipeline, with named YAML presets and dotted CLI overrides.

    cfg = load_config("demo", overrides=["render.steps=10", "captions.num_captions=64"])

Unknown keys and wrong types are errors that name the key (`render.stepz: Extra inputs are not
permitted`); the run's `name` must be usable in dashboard keys. Fields made with :func:`operational`
change how fast or how robustly a stage runs, never what it writes: the stage hashes
(`tasks.registry.stage_hash`) leave them out, so a resumed run may change them. Every field has a
``description`` (what it does, units, the paper's value): `editforge config --explain` and docs/config.md
show them (:mod:`tasks.common.config_docs`).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.common.errors import PermanentError
from tasks.common.layout import check_name
from tasks.common.selection import IMAGE_RUNGS, METRICS, RANK_CHOICES, RENDER_RANK_CHOICES, VLM_COLUMNS

OPERATIONAL_KEY = "operational"
# text.seed_annotations values that name a shipped file: the synthetic world's seed triplets (tasks.world.data)
BUILTIN_SEED_ANNOTATIONS = ("builtin:world",)
# where a model runs: auto (CUDA when visible), cpu, cuda, cuda:N, mps
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"unknown device {value!r}: use auto (CUDA when visible), cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_device)]
# render.scheduler -> the diffusers class (tasks.common.models.make_scheduler)
SCHEDULER_CLASSES = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",  # latent consistency models (LCM, LCM-LoRA): few steps, render.guidance none
}
SchedulerName = Literal[tuple(SCHEDULER_CLASSES)]
# the VAE of SD 1.x / SDXL downsamples 8x: image sizes are multiples of it
SIZE_MULTIPLE = 8


def operational(default: Any, **kwargs: Any) -> Any:
    """A field that never changes a stage's output (device, concurrency, retries, checkpoint cadence)."""
    return Field(default, json_schema_extra={OPERATIONAL_KEY: True}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def output_fields(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The settings that determine the output, for hashing: every field but the operational ones
        (recursively) and those named in ``drop``."""
        dumped = self.model_dump(mode="json")
        data: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            if name in drop or (info.json_schema_extra or {}).get(OPERATIONAL_KEY):
                continue
            value = getattr(self, name)
            data[name] = value.output_fields() if isinstance(value, Section) else dumped[name]
        return data


class ModelsConfig(Section):
    """Which models the stages load: the diffusion model (render, train), CLIP, the LM, DINOv2."""

    diffusion: Literal["tiny", "sd15", "sdxl", "sd15-arch", "tiny-sdxl", "sdxl-turbo", "world"] = Field(
        "tiny",
        description="the diffusion model render draws pairs with and train starts from: tiny "
        "(random-init, built offline), sd15 (paper), sdxl, sdxl-turbo (turbo), sd15-arch / tiny-sdxl (the "
        "architectures, random weights), world (the trained tiny world model)",
    )
    diffusion_path: str | None = Field(
        None,
        description="a local diffusers folder of that model (null: the hub id, or the built-in tiny one)",
    )
    vae_path: str | None = Field(
        None,
        description="an AutoencoderKL folder (diffusers layout) to decode with instead of the "
        "diffusion model's own VAE; the reference decoded SD 1.5 with sd-vae-ft-mse; render and train read "
        "it",
    )
    clip: str = Field(
        "tiny",
        description="the CLIP model that scores pairs: tiny (random-init), vit-l-14 (paper: OpenAI "
        "ViT-L/14), an open_clip name, or world",
    )
    clip_path: str | None = Field(
        None, description="a local folder or file of that CLIP model (null: by name)"
    )
    lm: str = Field(
        "tiny",
        description="the causal LM the local text backend fine-tunes: tiny (random-init, refused "
        "where text.refuse_tiny_lm is on) or a hub id",
    )
    lm_path: str | None = Field(
        None,
        description="a local folder of a fine-tunable causal LM (e.g. /models/Qwen2.5-1.5B); set, it "
        "is used instead of models.lm",
    )
    dino: str = Field(
        "tiny",
        description="the DINOv2 judge rung's model (judges.dino): tiny (random-init), "
        "dinov2-small|base|large|giant (facebook/dinov2-*, UltraEdit's gate), or a Dinov2Model hub id",
    )
    dino_path: str | None = Field(None, description="a local folder of that Dinov2Model (null: by name)")


class CaptionsConfig(Section):
    """The captions stage: read LAION-shaped parquet, filter, dedup and sample the captions to edit."""

    source: str | list[str] = Field(
        "builtin:demo",
        description="LAION-shaped parquet to read: a path, URL (s3://...) or glob, a list "
        "of them, builtin:demo (a small shipped sample) or builtin:world (the synthetic world's captions); "
        "paper: LAION-Aesthetics V2 6.5+",
    )
    num_captions: int = Field(
        64,
        ge=1,
        description="captions to sample after filtering and dedup (paper: 454445; raising it "
        "later adds a new captions generation)",
    )
    num_partitions: int = Field(
        2,
        ge=1,
        description="partitions every per-caption stage is split into (paper: 455, about 1000 captions each)",
    )
    seed: int = Field(0, description="seed of the caption sample")
    min_aesthetic_score: float = Field(
        6.5,
        description="drop captions whose image's aesthetic score is below this (paper: 6.5, "
        "LAION-Aesthetics 6.5+); rows without a score are kept",
    )
    max_punsafe: float = Field(
        1.0, description="drop rows whose NSFW probability (punsafe) is above this (1.0: keep all)"
    )
    max_pwatermark: float = Field(
        1.0, description="drop rows whose watermark probability (pwatermark) is above this (1.0: keep all)"
    )
    min_side: int = Field(
        0,
        ge=0,
        description="drop rows whose image's shorter side is below this many pixels (0: no size filter)",
    )
    max_caption_chars: int = Field(
        500,
        ge=1,
        description="captions longer than this (in characters, once normalised) are rejected "
        "and counted as caption_too_long",
    )


class OpenAIClientConfig(Section):
    """What every client of an OpenAI-compatible API shares (the text backend, the VLM judge). The API key is
    never part of the config: ``api_key_env`` or ``api_key_secret`` says where it is. All but ``base_url`` is
    operational."""

    SECTION: ClassVar[str] = "text.openai"  # the dotted name error messages use (set by each subclass)
    LABEL: ClassVar[str] = "text"  # how log lines and errors name the stage
    OWNER: ClassVar[str] = "text backend 'openai'"  # who needs the key, in the missing-key message

    base_url: str | None = Field(
        None, description="the API's base URL, e.g. http://vllm:8000/v1 for a served model (null: OpenAI's)"
    )
    api_key_env: str = operational(
        "OPENAI_API_KEY", description="the environment variable that holds the API key"
    )
    api_key_secret: str | None = operational(
        None,
        description="a Prefect Secret block that holds the API key (used instead of api_key_env when set)",
    )
    concurrency: int = operational(64, ge=1, description="requests in flight at once")
    max_retries: int = operational(
        8,
        ge=0,
        description="retries of a failed request (rate limit, 5xx, timeout) before the partition fails",
    )
    backoff_initial_s: float = operational(
        1.0,
        ge=0,
        description="first retry's wait in seconds (exponential backoff with jitter; a server's "
        "Retry-After replaces it)",
    )
    backoff_max_s: float = operational(60.0, ge=0, description="longest wait between retries, in seconds")
    request_timeout_s: float = operational(120.0, gt=0, description="one request's deadline, in seconds")
    poll_interval_s: float = operational(
        30.0, ge=0, description="seconds between polls of a fine-tune or Batch API job"
    )
    poll_timeout_s: float = operational(
        86400.0,
        gt=0,
        description="give up on a fine-tune or batch job after this many seconds (default: one day)",
    )
    checkpoint_every: int = operational(
        32,
        ge=1,
        description="append answers to the partition's checkpoint every this many rows (a "
        "resumed partition asks only for the rest)",
    )
    checkpoint_interval_s: float = operational(
        5.0, ge=0, description="... or at least every this many seconds"
    )


class OpenAITextConfig(OpenAIClientConfig):
    """The `openai` text backend: the OpenAI API or any OpenAI-compatible server (vLLM, TGI, a proxy)."""

    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="the API endpoint the triplets are generated with"
    )
    base_model: str = Field(
        "gpt-4o-mini-2024-07-18",
        description="the model fine-tuned on the seed triplets (the paper "
        "fine-tuned GPT-3 davinci, shut down)",
    )
    model: str | None = Field(
        None,
        description="use this model id as is, no fine-tune job: a served open model or an earlier fine-tune",
    )
    finetune_epochs: int | None = Field(
        None, ge=1, description="fine-tune epochs (null: the API's auto choice)"
    )
    finetune_suffix: str = Field("editforge", description="suffix of the fine-tuned model's name")
    mode: Literal["online", "batch"] = Field(
        "online",
        description="online requests, or the Batch API (the same requests, about half the price, "
        "finished within a day)",
    )
    moderation: bool = Field(
        True,
        description="check captions and generated text with the moderation endpoint; a flagged row "
        "is rejected",
    )
    moderation_model: str = Field("omni-moderation-latest", description="the moderation model")
    moderation_batch: int = operational(32, ge=1, description="texts per moderation request")


class TextConfig(Section):
    """The finetune and text stages: fine-tune an LM on the seed triplets, then write one (edit, output)
    triplet per caption. Sampling defaults are the paper's; ``target_triplets`` tops the captions up
    (:mod:`flows.target`) until that many triplets are accepted."""

    backend: Literal["local", "openai"] = Field(
        "local",
        description="local: transformers on this machine (+ peft LoRA with finetune_method lora); "
        "openai: the OpenAI API or a compatible server (text.openai)",
    )
    seed_annotations: str | None = Field(
        None,
        description="JSONL of (input, edit, output) seed triplets; default: the project's own; "
        "builtin:world: the synthetic world's (tasks/world/data/seed_triplets.jsonl)",
    )
    seed_max_line_bytes: int = operational(
        16384,
        ge=64,
        description="a seed file line longer than this many bytes is refused with its line "
        "number (never trimmed)",
    )
    finetune_method: Literal["full", "lora"] = Field(
        "full", description="local backend: fine-tune every weight, or LoRA adapters (peft)"
    )
    finetune_steps: int = Field(300, ge=0, description="local backend: fine-tune optimizer steps")
    finetune_batch_size: int = Field(16, ge=1, description="local backend: seed triplets per fine-tune step")
    finetune_checkpoint_every: int = operational(
        100, ge=1, description="local fine-tune: save its state every N steps"
    )
    learning_rate: float = Field(1e-3, gt=0, description="local backend: the fine-tune's learning rate")
    lora_r: int = Field(16, ge=1, description="LoRA rank (finetune_method lora)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_targets: tuple[str, ...] = Field(
        (), description="module names LoRA adapts (empty: peft's default for the architecture)"
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the seed triplets held out to validate the fine-tune"
    )
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the triplets (paper: 0.7)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's top_p (paper: 1.0)")
    frequency_penalty: float = Field(0.1, description="frequency penalty (paper: 0.1)")
    max_new_tokens: int = Field(
        256, ge=1, description="at most this many generated tokens per triplet (paper: 256)"
    )
    stop: str = Field("\nEND", description='stop sequence ending a completion (paper: "\\nEND")')
    max_edit_words: int = Field(
        40, ge=1, description="an edit instruction longer than this many words is rejected"
    )
    batch_size: int = Field(16, ge=1, description="local backend: captions per generation batch")
    max_attempts: int = Field(
        1,
        ge=1,
        le=16,
        description="tries per caption while its completion is rejected (unparseable, "
        "empty, output equal to the input, too long, flagged), each with the next attempt's seed (the "
        "reference: 4)",
    )
    seed: int = Field(0, description="seed of the fine-tune and of sampling")
    target_triplets: int | None = operational(
        None,
        ge=1,
        description="sample more captions (new captions generations) until this many triplets "
        "are accepted; the paper: 454445",
    )
    max_top_ups: int = operational(
        8, ge=0, description="at most this many extra captions generations for target_triplets"
    )
    refuse_tiny_lm: bool = operational(
        False,
        description="refuse the built-in random tiny LM unless models.lm or models.lm_path is set "
        "(paper, fast)",
    )
    device: Device = operational(
        "auto", description="local backend: where the LM fine-tunes and generates (auto: CUDA when visible)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="local backend: the LM's dtype on CUDA (float32 on CPU)"
    )
    openai: OpenAITextConfig = Field(OpenAITextConfig(), description="the openai backend's settings")

    @field_validator("seed_annotations")
    @classmethod
    def _seed_file_exists(cls, value: str | None) -> str | None:
        if value in BUILTIN_SEED_ANNOTATIONS:
            return value
        if value and "://" not in value and not Path(value).is_file():
            raise ValueError(
                f"no such file: {value} (a JSONL file of input/edit/output triplets, or one of "
                f"{', '.join(BUILTIN_SEED_ANNOTATIONS)})"
            )
        return value

    def seed_annotations_path(self) -> str:
        from seed_annotations.schema import default_triplets_path

        if (
            self.seed_annotations == "builtin:world"
        ):  # package data of tasks.world (its code is above this layer)
            return str(resources.files("tasks.world").joinpath("data", "seed_triplets.jsonl"))
        return self.seed_annotations or str(default_triplets_path())


def tiny_lm_refusal(cfg: PipelineConfig) -> str | None:
    """Why this config must not run the text stages, or None: ``text.refuse_tiny_lm`` is on (the
    `paper` and `fast` presets), the backend is local and neither ``models.lm`` nor
    ``models.lm_path`` was given, so the fine-tune would train the built-in random-init `tiny` LM and
    "succeed" with nonsense triplets."""
    m, t = cfg.models, cfg.text
    if (
        not t.refuse_tiny_lm
        or t.backend != "local"
        or m.lm_path
        or m.lm != "tiny"
        or "lm" in m.model_fields_set
    ):
        return None
    return (
        "models.lm is the built-in random-init tiny LM (text.refuse_tiny_lm is on in this preset; the paper "
        "fine-tuned GPT-3 Davinci): set models.lm_path to a fine-tunable causal LM folder (a GPT-3-like model, "
        "e.g. --set models.lm_path=/models/Qwen2.5-1.5B --set text.finetune_method=lora), or use the openai "
        "backend (--set text.backend=openai with text.openai.base_model, or text.openai.base_url and "
        "text.openai.model for a served model); --set models.lm=tiny runs the tiny LM on purpose"
    )


def check_text_lm(cfg: PipelineConfig, origin: str = "config") -> None:
    """Raise :class:`ConfigError` when :func:`tiny_lm_refusal` refuses ``cfg`` (before any work)."""
    if problem := tiny_lm_refusal(cfg):
        raise ConfigError(f"{origin}: {problem}")


RankBy = Literal[RANK_CHOICES]


class Selection(Section):
    """The judge ladder's thresholds and the top-k (``render.keep``): CLIP first (the paper's filter), then
    the image rungs (DINOv2, SSIM), then the VLM judge; a rung applies when ``judges.<rung>.enabled`` is on
    and sees only what passed the rungs below it. ``filter.*`` overrides these to re-select without
    re-rendering."""

    clip_image_threshold: float = Field(
        0.75, ge=-1, le=1, description="CLIP cosine of the before and after images, at least (paper: 0.75)"
    )
    clip_caption_threshold: float = Field(
        0.2, ge=-1, le=1, description="CLIP cosine of each image and its caption, at least (paper: 0.2)"
    )
    clip_direction_threshold: float = Field(
        0.2,
        ge=-1,
        le=1,
        description="CLIP directional similarity (the image change against the caption "
        "change), at least (paper: 0.2)",
    )
    top_k: int = Field(
        4, ge=1, description="passing samples kept per triplet, the best by rank_by (paper: 4)"
    )
    dino_threshold: float = Field(
        0.4, ge=-1, le=1, description="DINOv2 before/after cosine, at least (UltraEdit: 0.4)"
    )
    ssim_min: float = Field(0.2, ge=-1, le=1, description="SSIM(before, after) at least this")
    ssim_max: float = Field(
        0.95, ge=-1, le=1, description="SSIM(before, after) at most this (above: no edit)"
    )
    vlm_threshold: float = Field(
        6.0, ge=0, le=10, description="the VLM judge's overall score (0-10) at least this"
    )
    rank_by: RankBy = Field(
        "clip_sim_dir",
        description="the top-k order (descending): clip_sim_dir (the paper), a judge score "
        "(dino_similarity, ssim, vlm_score, vlm_instruction, ...)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Selection:
        if self.ssim_min > self.ssim_max:
            raise ValueError(f"ssim_min {self.ssim_min} is above ssim_max {self.ssim_max}")
        return self


class AdaptiveConfig(Section):
    """Adaptive sampling and giving up (`tasks/render/scheduling.py`): a triplet's samples are drawn in rounds
    and it stops early. Off in `paper` (every sample rendered), on in `fast` and `demo`."""

    enabled: bool = Field(
        False,
        description="draw samples in rounds of round_size and stop a triplet once target_passed of "
        "them passed (the kept pairs are then the first passing ones, not the best of samples_per_triplet)",
    )
    round_size: int = Field(
        8,
        ge=1,
        description="samples per round (used when enabled or give_up_after is set; a multiple of p_branches)",
    )
    target_passed: int | None = Field(
        None, ge=1, description="stop a triplet once this many samples passed (null: render.keep.top_k)"
    )
    give_up_after: int | None = Field(
        None,
        ge=1,
        description="stop a triplet after this many samples without a pass, enabled or not "
        "(fast: 32; null: never)",
    )


class EarlyRejectConfig(Section):
    """Early rejection (`tasks/render/early.py`): part-way through the steps, decode and CLIP-score the x0
    prediction and stop the samples that will not pass. Calibrate the margin with `editforge
    calibrate-early`."""

    at: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="the share of the steps after which samples are scored (fast: 0.4; "
        "null: no early rejection)",
    )
    margin: float = Field(
        0.05,
        description="drop a sample whose early score is more than this below render.keep's threshold "
        "(fast: 0.05, not calibrated on real models)",
    )
    dry_run: bool = Field(
        False,
        description="score and record the early metrics but drop nothing (to calibrate the margin "
        "with editforge calibrate-early)",
    )
    metrics: tuple[Literal[METRICS], ...] = Field(
        METRICS, description="the CLIP metrics compared early (all four by default)"
    )


# The render savers' keys before they were nested: old name -> (section, field). Refused in configs with a
# message naming the new key; stage hashes are computed on these flat names, so the folders of runs made
# before the move are found under the same hashes.
FLAT_RENDER_SAVERS: dict[str, tuple[str, str]] = {
    "adaptive": ("adaptive", "enabled"),
    "round_size": ("adaptive", "round_size"),
    "target_passed": ("adaptive", "target_passed"),
    "give_up_after": ("adaptive", "give_up_after"),
    "early_reject_at": ("early_reject", "at"),
    "early_reject_margin": ("early_reject", "margin"),
    "early_reject_dry_run": ("early_reject", "dry_run"),
    "early_reject_metrics": ("early_reject", "metrics"),
}


class RenderConfig(Section):
    """The render stage: Prompt-to-Prompt before/after pairs per triplet, CLIP-scored. The defaults are the
    reference's algorithm; every compute saver (``adaptive``, ``early_reject``, ``p_branches``) is a switch,
    off. Batching settings change speed, not the images (up to float rounding)."""

    samples_per_triplet: int = Field(
        100, ge=1, description="samples (seeds x p_branches) drawn per triplet at most (paper: 100)"
    )
    batch_samples: int | Literal["auto"] = operational(
        4,
        description="samples per UNet call (UNet batch = 4 x this, 2 x with guidance none), or auto (as "
        "many as free GPU memory allows, at most batch_samples_max; 8 on CPU); halved on CUDA "
        "out-of-memory",
    )
    batch_samples_max: int = operational(64, ge=1, description="batch_samples auto: at most this many")
    steps: int = Field(100, ge=1, description="denoising steps per image (paper: 100)")
    height: int = Field(
        512,
        ge=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        description="image height in pixels (paper: 512; a multiple of 8)",
    )
    width: int = Field(
        512,
        ge=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        description="image width in pixels (paper: 512; a multiple of 8)",
    )
    cfg_range: tuple[float, float] = Field(
        (7.5, 15.0),
        description="classifier-free guidance scale, drawn uniformly per seed from [low, "
        "high] (paper: 7.5-15; unused with guidance none)",
    )
    guidance: Literal["cfg", "none"] = Field(
        "cfg",
        description="cfg: classifier-free guidance (UNet batch 4 per sample); none: few-step "
        "distilled models (SDXL-Turbo, LCM; 2 per sample, cfg recorded as 1)",
    )
    p_range: tuple[float, float] = Field(
        (0.1, 0.9),
        description="p, the share of the steps the before and after images share attention, "
        "drawn uniformly per sample from [low, high] (paper: 0.1-0.9)",
    )
    attention: Literal["ip2p", "p2p-replace", "p2p-refine", "none"] = Field(
        "ip2p",
        description="how the pair shares attention: ip2p (the reference's shared self-attention "
        "while p), Prompt-to-Prompt replace / refine of cross-attention, or none",
    )
    scheduler: SchedulerName = Field(
        "euler_ancestral",
        description="the sampler (paper: euler_ancestral; fast: dpmpp_2m; lcm for LCM models)",
    )
    device: Device = operational(
        "auto", description="where render runs: auto (CUDA when visible), cpu, cuda, cuda:N or mps"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="the diffusion model's dtype on CUDA (float32 elsewhere; the reference ran "
        "float16 autocast)",
    )
    compile: bool = operational(
        False, description="torch.compile the UNet on CUDA (same images up to float rounding)"
    )
    base_seed: int = Field(
        0,
        description="mixed into every sample's seed (sha256 of base_seed, caption id and index): change "
        "it to draw other samples",
    )
    adaptive: AdaptiveConfig = Field(
        AdaptiveConfig(), description="adaptive sampling and giving up (a saver, off)"
    )
    early_reject: EarlyRejectConfig = Field(EarlyRejectConfig(), description="early rejection (a saver, off)")
    keep: Selection = Field(
        Selection(),
        description="the render-time selection: which samples passed (and so adaptive "
        "stopping, giving up, early rejection) and which are kept",
    )
    save_images: Literal["kept", "passed", "all"] = Field(
        "kept",
        description="whose images are written: the kept pairs' (the reference), every passing "
        "sample's (the filter stage can then take a larger top-k) or every fully rendered sample's (it can "
        "loosen thresholds too)",
    )
    clip_resize: Literal["reference", "antialias"] = Field(
        "reference",
        description="CLIP input resize: the reference's (bicubic, no antialias, no crop) or "
        "antialiased + centre crop",
    )
    p_branches: int = Field(
        1,
        ge=1,
        le=64,
        description="p values per seed, branched off one before image and one after trunk, "
        "each its own sample (1: one sample per seed, the reference; needs attention ip2p; "
        "samples_per_triplet and the adaptive counts must be multiples of it)",
    )
    keep_per_seed: int | None = Field(
        1,
        ge=1,
        description="at most this many kept pairs per seed (p-branching), the best by directional "
        "similarity; null: no limit",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_savers(cls, data: Any) -> Any:
        """A saver under its old flat key (render.round_size, ...) is refused with its new key's name."""
        for key, value in data.items() if isinstance(data, dict) else ():
            section = key == "adaptive" and isinstance(value, dict | AdaptiveConfig)
            if (message := _moved(key)) and not section:
                raise ValueError(message)
        return data

    def output_fields(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """As :meth:`Section.output_fields`, the savers under their flat names (the hash before nesting)."""
        data = super().output_fields(drop)
        nested = {section: data.pop(section) for section in ("adaptive", "early_reject") if section in data}
        data |= {
            old: nested[section][field]
            for old, (section, field) in FLAT_RENDER_SAVERS.items()
            if section in nested
        }
        return data

    @model_validator(mode="after")
    def _ranges(self) -> RenderConfig:
        if self.batch_samples != "auto" and self.batch_samples < 1:
            raise ValueError(f"batch_samples must be >= 1 or 'auto', got {self.batch_samples}")
        for name in ("cfg_range", "p_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")
        if not 0 <= self.p_range[0] <= self.p_range[1] <= 1:
            raise ValueError(
                f"p_range {list(self.p_range)}: p is the share of steps with shared attention, within [0, 1]"
            )
        if self.cfg_range[0] < 1:
            raise ValueError(f"cfg_range {list(self.cfg_range)}: classifier-free guidance scales start at 1")
        if self.keep.rank_by not in RENDER_RANK_CHOICES:
            raise ValueError(
                f"keep.rank_by {self.keep.rank_by!r}: render cannot rank by the VLM judge (it runs after "
                f"render); rank render by one of {list(RENDER_RANK_CHOICES)} and set filter.rank_by="
                f"{self.keep.rank_by} (with render.save_images=passed, so that the filter has candidates "
                "beyond render's top-k)"
            )
        k = self.p_branches
        if k > 1:
            if self.attention != "ip2p":
                raise ValueError(f"p_branches {k} needs attention ip2p: {self.attention!r} does not use p")
            a = self.adaptive
            rounds = a.enabled or a.give_up_after is not None
            counts = {
                "samples_per_triplet": self.samples_per_triplet,
                "adaptive.round_size": a.round_size if rounds else None,
                "adaptive.give_up_after": a.give_up_after,
            }
            for name, value in counts.items():
                if value is not None and value % k:
                    raise ValueError(
                        f"{name} {value} is not a multiple of p_branches {k}: it counts samples, "
                        f"and a seed's {k} branches are rendered together (e.g. {name}="
                        f"{max(k, value - value % k)})"
                    )
        return self


class FilterConfig(Section):
    """The filter stage: re-select the kept pairs from the scores render and the judge stored, nothing
    rendered or judged again. A field left null is ``render.keep``'s; a pair whose images render did not store
    (``render.save_images``) is counted as ``image_not_stored``, one a higher rung never scored as
    ``dino_not_scored`` / ``ssim_not_scored`` / ``vlm_not_judged``, never passed."""

    clip_image_threshold: float | None = Field(
        None, ge=-1, le=1, description="re-select: CLIP image-image cosine at least (null: render.keep's)"
    )
    clip_caption_threshold: float | None = Field(
        None, ge=-1, le=1, description="re-select: CLIP image-caption cosine at least (null: render.keep's)"
    )
    clip_direction_threshold: float | None = Field(
        None, ge=-1, le=1, description="re-select: CLIP directional similarity at least (null: render.keep's)"
    )
    top_k: int | None = Field(
        None, ge=1, description="re-select: pairs kept per triplet (null: render.keep's)"
    )
    dino_threshold: float | None = Field(
        None, ge=-1, le=1, description="re-select: DINOv2 cosine at least (null: render.keep's)"
    )
    ssim_min: float | None = Field(
        None, ge=-1, le=1, description="re-select: SSIM at least (null: render.keep's)"
    )
    ssim_max: float | None = Field(
        None, ge=-1, le=1, description="re-select: SSIM at most (null: render.keep's)"
    )
    vlm_threshold: float | None = Field(
        None, ge=0, le=10, description="the VLM judge's score (0-10) at least (null: render.keep's)"
    )
    rank_by: RankBy | None = Field(None, description="re-select: the top-k order (null: render.keep's)")
    note: str = Field(
        "",
        description="free text about this re-selection, written to the filter manifest, the dataset "
        "card and the report; part of the filter hash",
    )

    def resolve(self, base: Selection) -> Selection:
        """The effective selection: ``base`` (``render.keep``) overridden by the fields set here."""
        overrides = {k: v for k, v in self.model_dump(exclude={"note"}).items() if v is not None}
        return Selection.model_validate({**base.model_dump(), **overrides})


class DinoJudgeConfig(Section):
    """The DINOv2 rung (UltraEdit's gate), run by render on the decoded images right after CLIP scoring: cos
    of the before/after pooled (CLS) embeddings of ``models.dino``; threshold
    ``render.keep.dino_threshold``."""

    enabled: bool = Field(False, description="run the DINOv2 rung in render (off in every preset)")
    batch_size: int = operational(32, ge=1, description="images per DINOv2 forward pass")


class SsimJudgeConfig(Section):
    """The SSIM rung (torchmetrics' structural similarity, Gaussian window), run by render after DINOv2 on
    the decoded images in [0, 1]; bounds ``render.keep.ssim_min`` / ``ssim_max``."""

    enabled: bool = Field(False, description="run the SSIM rung in render (off in every preset)")
    sigma: float = Field(
        1.5, gt=0, description="Gaussian window's standard deviation (Wang et al.: 1.5, 11x11)"
    )
    size: int | None = Field(
        None, ge=16, description="compute on images resized to this square size (None: as rendered)"
    )


class TokenPrice(Section):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens (images included)")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens")


# List prices (USD per 1M tokens, standard tier) when this was written; check the provider's page and
# override with --set judges.vlm.prices.<model>.input_per_mtok=... A served open model costs what its GPUs do.
DEFAULT_PRICES = {
    "gpt-4o-mini": TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4o": TokenPrice(input_per_mtok=2.50, output_per_mtok=10.00),
    "gpt-4.1-mini": TokenPrice(input_per_mtok=0.40, output_per_mtok=1.60),
    "gpt-4.1": TokenPrice(input_per_mtok=2.00, output_per_mtok=8.00),
}


class VLMJudgeConfig(OpenAIClientConfig):
    """The vision-language judge rung, its own stage (``judge``, between render and filter): any
    OpenAI-compatible chat API that accepts images grades each candidate pair with the rubric in
    ``prompts/judge_*.txt`` (instruction followed, content preserved, quality; 0-10 each, VIEScore-like).
    Threshold: ``render.keep.vlm_threshold`` / ``filter.vlm_threshold``. Requests, retries and checkpoints are
    the text backend's (:mod:`tasks.common.openai_client`)."""

    SECTION: ClassVar[str] = "judges.vlm"
    LABEL: ClassVar[str] = "judge"
    OWNER: ClassVar[str] = "the VLM judge (judges.vlm)"

    enabled: bool = Field(
        False, description="run the judge stage between render and filter (off in every preset)"
    )
    model: str = Field(
        "gpt-4o-mini", description="the judge model's id at base_url (any chat model that accepts images)"
    )
    rubric: Literal["viescore"] = Field("viescore", description="the grading rubric (prompts/judge_*.txt)")
    candidates: Literal["passed", "stored"] = Field(
        "passed",
        description="which pairs are judged: those whose images render stored and that passed "
        "every rung below (passed), or every stored pair (stored)",
    )
    detail: Literal["low", "high", "auto"] = Field(
        "low", description="OpenAI's image detail (low: 85 tokens an image)"
    )
    image_format: Literal["jpeg", "png"] = Field("jpeg", description="format of the images sent")
    image_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the images sent")
    image_size: int | None = Field(
        512, ge=16, description="longest side of the images sent (None: as rendered)"
    )
    temperature: float = Field(0.0, ge=0, description="the judge's sampling temperature")
    max_tokens: int = Field(400, ge=16, description="at most this many tokens per verdict")
    seed: int = Field(0, description="the seed sent with each request (where the API honours it)")
    response_format: Literal["json_object", "json_schema", "none"] = Field(
        "json_object",
        description="ask for JSON (json_schema: the rubric's schema, strict); none: plain text, parsed",
    )
    mode: Literal["online", "batch"] = operational(
        "online", description="online requests, or the Batch API (same requests, recorded per row, cheaper)"
    )
    batch_max_requests: int = operational(1000, ge=1, description="requests per batch job")
    gpus: int = operational(0, ge=0, le=1, description="1: the judge is served on the worker's own GPU")
    prices: dict[str, TokenPrice] = operational(
        DEFAULT_PRICES,
        description="USD per million tokens by model id or its prefix, for the cost "
        "recorded per judged sample and kept pair (list prices when written: check the provider's page)",
    )
    batch_discount: float = operational(0.5, ge=0, le=1, description="the Batch API's price factor")


class JudgesConfig(Section):
    """The judge ladder after CLIP, each rung a switch: DINOv2 and SSIM run inside render (images in
    memory), the VLM judge is its own stage; thresholds live in ``render.keep`` / ``filter.*``."""

    dino: DinoJudgeConfig = Field(DinoJudgeConfig(), description="the DINOv2 rung (UltraEdit's gate)")
    ssim: SsimJudgeConfig = Field(SsimJudgeConfig(), description="the SSIM rung")
    vlm: VLMJudgeConfig = Field(
        VLMJudgeConfig(), description="the vision-language judge rung (its own stage)"
    )

    def image_rungs(self) -> tuple[str, ...]:
        """The rungs render runs after CLIP, in ladder order."""
        return tuple(r for r in IMAGE_RUNGS if getattr(self, r).enabled)

    def rungs(self) -> tuple[str, ...]:
        """Every rung that applies, in ladder order (CLIP always)."""
        return ("clip", *self.image_rungs(), *(("vlm",) if self.vlm.enabled else ()))


class PackConfig(Section):
    """The pack stage: the kept pairs into WebDataset shards (train / val) and an index."""

    shard_max_samples: int = Field(1000, ge=1, description="pairs per WebDataset shard at most")
    image_format: Literal["jpg", "png", "webp"] = Field(
        "jpg", description="format of the images in the shards"
    )
    quality: int = Field(100, ge=1, le=100, description="JPEG/WebP quality (the reference saves JPEG at 100)")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of the triplets packed as validation shards"
    )
    hf_export: bool = Field(False, description="also write Hugging Face parquet with the released columns")


class TrainConfig(Section):
    """The training flow (`flows/train.py`, `tasks/train/`): InstructPix2Pix on the packed shards. Defaults
    are the paper's and its reference code's (arXiv 2211.09800); diffusers' `train_instruct_pix2pix` extras
    are switches, off. ``total_batch_size`` fixes the samples and their order on any number of GPUs
    (docs/training.md); its hash covers this section, the diffusion model, the VAE and the shards."""

    steps: int = Field(10_000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="samples per process per micro-batch")
    total_batch_size: int = Field(
        1024,
        ge=1,
        description="samples per optimizer step over every process (the paper: 1024 = 32 x 4 "
        "accumulation x 8 GPUs): batch_size x accumulation x processes x nodes",
    )
    gradient_accumulation_steps: int | None = operational(
        None,
        ge=1,
        description="micro-batches per process per optimizer step; null: derived, "
        "total_batch_size / (batch_size x processes x nodes); a number is checked against that",
    )
    processes: int | Literal["auto"] = operational(
        "auto",
        description="training processes per node, one per GPU, launched by the flow (torchrun); "
        "auto: every visible GPU (1 on the CPU)",
    )
    nodes: int = operational(
        1,
        ge=1,
        description="machines training together; node 0 runs the flow, the others run `editforge "
        "train --node-rank K` (docs/training.md)",
    )
    rdzv_endpoint: str | None = operational(
        None,
        description="host:port of node 0 where the nodes meet (torchrun's static rendezvous) when "
        "nodes > 1; default: $EDITFORGE_RDZV_ENDPOINT",
    )
    resume_other_processes: bool = operational(
        False,
        description="resume a checkpoint written by another number of processes (same samples and "
        "noise; the weights then differ from an uninterrupted run by float rounding)",
    )
    log_samples: bool = operational(
        False,
        description="write the sample keys of every micro-batch, per process, to the work folder "
        "(samples-rank-NNNNN.jsonl)",
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (paper: 1e-4)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule (paper: constant, no warm-up; diffusers' names)"
    )
    lr_warmup_steps: int = Field(0, ge=0, description="warm-up steps (needs a scheduler other than constant)")
    adam_beta1: float = Field(0.9, description="AdamW beta1 (PyTorch's default, as the reference)")
    adam_beta2: float = Field(0.999, description="AdamW beta2 (PyTorch's default, as the reference)")
    adam_weight_decay: float = Field(
        1e-2, ge=0, description="AdamW weight decay (PyTorch's default, as the reference)"
    )
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon (PyTorch's default, as the reference)")
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="clip the gradient norm to this (diffusers' example: 1.0); null: no "
        "clipping, as the reference",
    )
    sampling: Literal["per_triplet", "per_pair"] = Field(
        "per_triplet",
        description="per_triplet: one kept pair per triplet per epoch, drawn with the seed "
        "(the reference); per_pair: every kept pair once per epoch (diffusers' example)",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="no: float32 (the reference); fp16 / bf16 mixed precision (diffusers' example)"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass: less GPU memory, slower "
        "(diffusers' --gradient_checkpointing)",
    )
    use_8bit_adam: bool = Field(
        False,
        description="bitsandbytes' 8-bit AdamW (diffusers' --use_8bit_adam): optimizer state in 8 "
        "bits, about 3/4 of its memory saved",
    )
    allow_tf32: bool = Field(
        False, description="TF32 matmuls on Ampere and newer GPUs (diffusers' --allow_tf32)"
    )
    use_ema: bool = Field(
        True, description="keep an exponential moving average of the weights and save it (paper)"
    )
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per step")
    resolution: int = Field(
        256,
        ge=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        description="square crop size (a multiple of the VAE downsampling)",
    )
    max_resize_ratio: float = Field(
        288 / 256, ge=1, description="resize to a random size in [res, res*ratio]"
    )
    flip_prob: float = Field(
        0.5, ge=0, le=1, description="probability of a horizontal flip of a pair (paper: 0.5)"
    )
    conditioning_dropout: float = Field(0.05, ge=0, le=1 / 3, description="5%: text only, both, image only")
    shuffle_buffer: int = Field(1000, ge=1, description="samples in the WebDataset shuffle buffer")
    num_workers: int = operational(
        4, ge=0, description="DataLoader workers per process (the data order does not depend on it)"
    )
    seed: int = Field(0, description="seed of the data order, crops, dropout and noise")
    device: Device = operational(
        "auto", description="single-process runs: where to train (auto: CUDA when visible)"
    )
    checkpoint_every: int = operational(
        500, ge=1, description="save a resumable checkpoint every this many steps"
    )
    checkpoints_total_limit: int = operational(2, ge=1, description="keep at most this many checkpoints")
    log_every: int = operational(50, ge=1, description="log the loss every this many steps")
    sample_steps: int = Field(50, ge=1, description="denoising steps of the sample edit on a val example")
    guidance_scale: float = Field(7.5, description="the sample edit's text guidance (paper: 7.5)")
    image_guidance_scale: float = Field(1.5, description="the sample edit's image guidance (paper: 1.5)")

    # Settings of the sample edit only (not `sampling`, the data draw): changing them re-samples from the
    # final checkpoint, no re-training.
    SAMPLING: ClassVar[tuple[str, ...]] = ("sample_steps", "guidance_scale", "image_guidance_scale")

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.lr_warmup_steps > 0 and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps > 0 needs lr_scheduler constant_with_warmup, linear or cosine")
        if self.processes != "auto":
            if self.processes < 1:
                raise ValueError(f"processes must be >= 1 or auto, got {self.processes}")
            self.accumulation(self.processes * self.nodes)
        return self

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step on `world_size` processes in all; a total batch they do not
        divide, or a `gradient_accumulation_steps` that disagrees, is a ValueError naming the settings."""
        per_micro = self.batch_size * world_size
        procs = f"{world_size} process{'es' if world_size > 1 else ''}"
        if self.total_batch_size % per_micro:
            raise ValueError(
                f"total_batch_size {self.total_batch_size} is not a multiple of batch_size x processes = "
                f"{self.batch_size} x {procs} = {per_micro}: change train.total_batch_size or "
                "train.batch_size (or the process count)"
            )
        accum = self.total_batch_size // per_micro
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps != accum:
            raise ValueError(
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} disagrees with "
                f"total_batch_size {self.total_batch_size} = {self.batch_size} x {accum} x {procs}: "
                "leave train.gradient_accumulation_steps unset (it is derived) or change "
                "train.total_batch_size"
            )
        return accum

    def batch_line(self, world_size: int) -> str:
        """'total batch 1024 = 32 × 4 × 8 processes': the batch as it will train on `world_size` processes."""
        procs = f"{world_size} process{'es' if world_size > 1 else ''}"
        nodes = f" ({self.nodes} nodes × {world_size // self.nodes})" if self.nodes > 1 else ""
        return f"total batch {self.total_batch_size} = {self.batch_size} × {self.accumulation(world_size)} × {procs}{nodes}"


class RunConfig(Section):
    """How `editforge run` runs the chain: in this process, or fanned out to the stages' deployments
    (`flows/fanout.py`, docs/cluster.md). Never part of a stage hash."""

    mode: Literal["in-process", "fan-out"] = operational(
        "in-process",
        description="in-process: every stage in this flow run (the demo, one box); fan-out: "
        "each stage's partitions in blocks, each block a child flow run of the stage's deployment on its "
        "work pool",
    )
    block_size: int = operational(8, ge=1, description="fan-out: partitions per child flow run")
    max_block_attempts: int = operational(
        3, ge=1, description="fan-out: a failed block is submitted again, up to this many tries in all"
    )
    deployments: str = operational(
        "{preset}-{stage}",
        description="fan-out: the deployment name of each stage ({preset} and {stage} filled in)",
    )
    poll_s: float = operational(
        5.0, gt=0, description="fan-out: seconds between polls of the children's states"
    )
    worker_wait_warn_s: float = operational(
        120.0,
        gt=0,
        description="fan-out: report children waiting this long on a work pool with no free worker",
    )
    worker_wait_fail_s: float = operational(
        1800.0, gt=0, description="fan-out: fail the run when children wait this long on such a pool"
    )
    max_parallel_partitions: int | None = operational(
        None,
        ge=1,
        description="partitions of a stage run at once in one process (in-process runs and "
        "each fan-out block); None: the available CPUs over the CPUs a partition takes (the stage's "
        "resources); stages that hold a GPU or an API quota run one at a time whatever this says",
    )
    alert_min_pass_rate: float | None = operational(
        0.01,
        ge=0,
        le=1,
        description="a render partition whose pass rate (passed / samples drawn) is "
        "below this emits editforge.partition.low-pass-rate (infra/automations/ notifies on it); null: "
        "never",
    )


class ReviewConfig(Section):
    """People's review of a run's pairs (`editforge review`) and the filter calibrated on their labels
    (`editforge calibrate-filter`, docs/review.md): a stratified sample, each label weighted by its stratum,
    so the estimates are those of every pair read. Never part of a stage hash."""

    kept_pairs: int = operational(100, ge=0, description="kept pairs sampled for review")
    passed_pairs: int = operational(25, ge=0, description="passing pairs top-k left out, sampled for review")
    near_pairs: int = operational(
        50, ge=0, description="rejected pairs sampled per rejection reason, within band below its threshold"
    )
    far_pairs: int = operational(25, ge=0, description="other rejected pairs sampled for review")
    band: float = operational(
        0.1,
        gt=0,
        description="how far below a threshold a rejected pair is near it (score units: cosine "
        "/ SSIM; the VLM's 0-10 score: ten times this)",
    )
    max_partitions: int = operational(
        8,
        ge=1,
        description="render partitions read for review and calibration, spread over the run (the "
        "whole run: one sample of them)",
    )
    target_precision: float = operational(
        0.9,
        gt=0,
        lt=1,
        description="calibrate-filter: the precision (share of passing pairs people call "
        "good edits) the suggested thresholds reach",
    )
    confidence: float = operational(
        0.95,
        gt=0,
        lt=1,
        description="calibrate-filter: the Wilson intervals' level; a suggestion must "
        "reach the target at the interval's lower end",
    )
    min_passing: int = operational(
        10, ge=1, description="calibrate-filter: labelled pairs a suggestion must pass at least"
    )


class CostConfig(Section):
    """Prices for ``editforge estimate`` (:mod:`flows.estimate`), in US dollars: list prices as of May 2026,
    not checked live; set your own with ``--set cost.gpu_hour_usd=...``. Never part of a stage hash."""

    gpu_hour_usd: float = operational(
        3.0,
        ge=0,
        description="one GPU-hour (render, local LM): one H100 SXM 80GB on demand at a "
        "specialty cloud ($2.49-3.99 in early 2026; hyperscalers $3.50-5, spot and reservations 30-50% "
        "less)",
    )
    cpu_hour_usd: float = operational(
        0.045,
        ge=0,
        description="one CPU-core hour (captions, filter, pack): one vCPU on demand (AWS "
        "c7i.large, 2 vCPUs at $0.0893/h in us-east-1)",
    )
    text_price_model: str = operational(
        "gpt-4o-mini-2024-07-18",
        description="the model the text_* prices are for (the default text.openai.base_model)",
    )
    text_input_per_mtok_usd: float = operational(
        0.30,
        ge=0,
        description="per million prompt tokens of the fine-tuned model (OpenAI's fine-tuning price list)",
    )
    text_output_per_mtok_usd: float = operational(1.20, ge=0, description="per million completion tokens")
    text_training_per_mtok_usd: float = operational(
        3.00,
        ge=0,
        description="per million fine-tune training tokens (the fine-tune file's tokens times the epochs)",
    )
    batch_discount: float = operational(
        0.5, ge=0, le=1, description="Batch API price as a share of online (text.openai.mode batch)"
    )
    finetune_epochs_assumed: int = operational(
        3,
        ge=1,
        description="epochs when text.openai.finetune_epochs is unset (OpenAI's auto picks from "
        "the dataset size)",
    )


class PipelineConfig(Section):
    name: str = Field(
        "demo", description="the run's name: lowercase letters, digits and dashes (dashboard keys)"
    )
    output_root: str = Field(
        "runs/demo",
        description="the run's folder or object-store URL (s3://bucket/prefix); checked at "
        "load: not empty, not a file (writable, the bucket there: flows.options)",
    )
    verify: Literal["size", "sha256"] = Field(
        "size",
        description="before skipping a finished partition, check its outputs' sizes, or also their sha256",
    )
    models: ModelsConfig = Field(ModelsConfig(), description="which models the stages load")
    captions: CaptionsConfig = Field(
        CaptionsConfig(), description="the captions stage: what is read and sampled"
    )
    text: TextConfig = Field(
        TextConfig(), description="the finetune and text stages: the LM and its triplets"
    )
    render: RenderConfig = Field(
        RenderConfig(), description="the render stage: pairs, CLIP scores, the savers"
    )
    filter: FilterConfig = Field(
        FilterConfig(), description="the filter stage: re-selection over render.keep"
    )
    judges: JudgesConfig = Field(JudgesConfig(), description="the judge ladder's switches after CLIP")
    pack: PackConfig = Field(PackConfig(), description="the pack stage: WebDataset shards")
    train: TrainConfig = Field(TrainConfig(), description="the training flow (editforge train)")
    run: RunConfig = Field(RunConfig(), description="how editforge run runs the chain (never hashed)")
    cost: CostConfig = operational(CostConfig(), description="prices for editforge estimate (never hashed)")
    review: ReviewConfig = operational(
        ReviewConfig(), description="editforge review / calibrate-filter (never hashed)"
    )

    def selection(self) -> Selection:
        """The filter stage's effective selection (``filter`` over ``render.keep``)."""
        return self.filter.resolve(self.render.keep)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("output_root")
    @classmethod
    def _output_root(cls, value: str) -> str:
        from tasks.common.storage import output_root_problem

        if problem := output_root_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _ladder(self) -> PipelineConfig:
        """The ladder's settings agree: the filter's selection is valid, and what ranks has a score."""
        try:
            selection = self.selection()
        except ValidationError as err:
            raise ValueError(f"filter: {err.errors()[0]['msg']}") from None
        rungs = self.judges.rungs()
        for where, rank in (
            ("render.keep.rank_by", self.render.keep.rank_by),
            ("filter.rank_by", selection.rank_by),
        ):
            needs = (
                "vlm"
                if rank in VLM_COLUMNS
                else "dino"
                if rank == "dino_similarity"
                else "ssim"
                if rank == "ssim"
                else None
            )
            if needs and needs not in rungs:
                raise ValueError(f"{where}={rank}: that score exists only with judges.{needs}.enabled=true")
        return self

    @model_validator(mode="before")
    @classmethod
    def _own_folder(cls, data: Any) -> Any:
        """A config that names no `output_root` writes under `runs/<name>`, never into another run's folder."""
        if isinstance(data, dict) and "output_root" not in data:
            data = {**data, "output_root": f"runs/{data.get('name', 'demo')}"}
        return data


class ConfigError(PermanentError, ValueError):
    """A config file or override is invalid; the message names the key."""


def preset_names() -> list[str]:
    folder = resources.files("tasks.common").joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


# A preset file or `--set` value is YAML from a person: bounded in size, in nodes once its aliases are
# expanded (an alias bomb: nine aliases of nine aliases... is a few hundred bytes and billions of nodes) and
# in depth; a recursive alias is refused.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
MAX_REPORTED_ERRORS = 20


class _YAMLTooBig(Exception):
    pass


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], path: set[int], depth: int = 0) -> int:
    """The nodes ``node`` stands for once every alias is expanded (each shared node counted each time it
    is used), computed once per distinct node; stops as soon as a bound is passed."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in path:
        raise _YAMLTooBig("a recursive alias (an anchor used inside itself)")
    if depth > MAX_YAML_DEPTH:
        raise _YAMLTooBig(f"nested deeper than {MAX_YAML_DEPTH} levels")
    path.add(id(node))
    children = (
        [v for pair in node.value for v in pair]
        if isinstance(node, yaml.MappingNode)
        else node.value
        if isinstance(node, yaml.SequenceNode)
        else []
    )
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, path, depth + 1)
        if total > MAX_YAML_NODES:
            raise _YAMLTooBig(f"more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded")
    path.discard(id(node))
    memo[id(node)] = total
    return total


def load_yaml(text: str, origin: str) -> Any:
    """``yaml.safe_load`` of a person's YAML, bounded (see above); any problem is a :class:`ConfigError`
    naming ``origin`` (the file, or the override)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{origin}: {len(text):,} characters, more than a config takes ({MAX_YAML_BYTES:,})"
        )
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses non-printable characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set())
        return loader.construct_document(node)
    except _YAMLTooBig as err:
        raise ConfigError(
            f"{origin}: YAML refused: {err}; write the values out instead of using anchors and aliases"
        ) from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML refused: nested too deeply") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: invalid YAML: {_one_line(str(err))}") from None
    except (ValueError, TypeError, LookupError, ArithmeticError) as err:  # a constructor meeting a bad scalar
        raise ConfigError(
            f"{origin}: invalid YAML value ({type(err).__name__}: {_one_line(str(err))})"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _preset_text(preset: str) -> tuple[str, str]:
    if "\0" in preset:
        raise ConfigError(f"preset {preset!r}: contains a NUL character")
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        try:
            if not path.exists():
                raise ConfigError(
                    f"{path}: no such file (a preset is one of {preset_names()} or a YAML file)"
                )
            if not path.is_file():
                raise ConfigError(f"{path}: not a file (a preset is one of {preset_names()} or a YAML file)")
            if (size := path.stat().st_size) > MAX_YAML_BYTES:
                raise ConfigError(f"{path}: {size:,} bytes, more than a config takes ({MAX_YAML_BYTES:,})")
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    res = resources.files("tasks.common").joinpath("presets", f"{preset}.yaml")
    if not preset or "/" in preset or "\\" in preset or not res.is_file():
        raise ConfigError(
            f"unknown preset {preset!r}: expected one of {preset_names()} or a path to a YAML file "
            "(.yaml or .yml)"
        )
    return res.read_text(encoding="utf-8"), f"preset {preset}"


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, the value read as YAML; an empty value is the empty string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. render.steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: no key before '=': expected KEY=VALUE, e.g. render.steps=20")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(
            f"override {text!r}: {key!r} has an empty part between dots: expected a dotted key such "
            "as render.keep.top_k"
        )
    return key, load_yaml(raw, f"override {key!r}") if raw.strip() else ""


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def _moved(old: str) -> str | None:
    """'render.<old> is now render.<section>.<field>' for a render saver's flat key, else None."""
    if old not in FLAT_RENDER_SAVERS:
        return None
    section, field = FLAT_RENDER_SAVERS[old]
    return (
        f"render.{old} is now render.{section}.{field} (the render savers are nested under "
        "render.adaptive and render.early_reject: docs/config.md)"
    )


def _refuse_flat_savers(data: dict, origin: str) -> None:
    render = data.get("render")
    if not isinstance(render, dict):
        return
    for key, value in render.items():
        if (message := _moved(key)) and not (key == "adaptive" and isinstance(value, dict)):
            raise ConfigError(f"{origin}: {message}")


def _refuse_flat_override(key: str, value: Any) -> None:
    if key == "render":
        _refuse_flat_savers({"render": value}, f"override {key!r}")
    elif key.startswith("render.") and key.count(".") == 1:
        _refuse_flat_savers({"render": {key.removeprefix("render."): value}}, f"override {key!r}")


def load_config(preset: str = "demo", overrides: list[str] | None = None) -> PipelineConfig:
    text, origin = _preset_text(preset)
    data = load_yaml(text, origin) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}: expected a mapping of sections (name, output_root, render, ...), "
            f"got {type(data).__name__}"
        )
    if not origin.startswith("preset ") and "name" not in data:  # a YAML file: named after it
        data["name"] = re.sub("[^a-z0-9-]+", "-", Path(preset).stem.lower()).strip("-") or "run"
    _refuse_flat_savers(data, origin)
    for item in overrides or []:
        key, value = parse_override(item)
        _refuse_flat_override(key, value)
        _set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        lines = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            + ("" if isinstance(e.get("input"), dict) else f" (got {_shown(e.get('input'))})")
            for e in errors[:MAX_REPORTED_ERRORS]
        ]
        if len(errors) > MAX_REPORTED_ERRORS:
            lines.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more")
        raise ConfigError(f"{origin}: invalid config:\n  " + "\n  ".join(lines)) from None
