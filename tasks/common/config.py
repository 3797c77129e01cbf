"""One pydantic config for the whole pipeline, with named YAML presets and dotted CLI overrides.

    cfg = load_config("demo", overrides=["render.steps=10", "captions.num_captions=64"])

Unknown keys and wrong types are errors that name the key (`render.stepz: Extra inputs are not
permitted`); the run's `name` must be usable in dashboard keys. Fields made with :func:`operational`
change how fast or how robustly a stage runs, never what it writes: the stage hashes
(`tasks.registry.stage_hash`) leave them out, so a resumed run may change them.
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
    diffusion: Literal["tiny", "sd15", "sdxl", "sd15-arch", "tiny-sdxl", "sdxl-turbo", "world"] = "tiny"
    diffusion_path: str | None = None
    # an AutoencoderKL folder (diffusers layout, safetensors) to decode with instead of the diffusion
    # model's own VAE (None): the reference used sd-vae-ft-mse with SD 1.5; render and training read it
    vae_path: str | None = None
    clip: str = "tiny"
    clip_path: str | None = None
    lm: str = "tiny"
    lm_path: str | None = None
    # the DINOv2 judge rung (judges.dino): `tiny` (random-init, built offline), `dinov2-small|base|large|giant`
    # (facebook/dinov2-*; UltraEdit's gate), any hub id of a `Dinov2Model`; `dino_path`: a local folder of it
    dino: str = "tiny"
    dino_path: str | None = None


class CaptionsConfig(Section):
    source: str | list[str] = "builtin:demo"
    num_captions: int = Field(64, ge=1)
    num_partitions: int = Field(2, ge=1)
    seed: int = 0
    min_aesthetic_score: float = 6.5
    max_punsafe: float = 1.0
    max_pwatermark: float = 1.0
    min_side: int = Field(0, ge=0)
    max_caption_chars: int = Field(500, ge=1, description="captions longer than this (in characters, once "
                                   "normalised) are rejected and counted as caption_too_long")


class OpenAIClientConfig(Section):
    """What every client of an OpenAI-compatible API shares (the text backend, the VLM judge): where it
    points, where its key is, how many requests are in flight, retries, deadlines, polling, checkpoints.

    The API key is never part of the config: `api_key_env` names the environment variable that holds
    it, or `api_key_secret` names a Prefect Secret block. Everything here but `base_url` is operational.
    """

    SECTION: ClassVar[str] = "text.openai"  # the dotted name error messages use (set by each subclass)
    LABEL: ClassVar[str] = "text"  # how log lines and errors name the stage
    OWNER: ClassVar[str] = "text backend 'openai'"  # who needs the key, in the missing-key message

    base_url: str | None = None
    api_key_env: str = operational("OPENAI_API_KEY")
    api_key_secret: str | None = operational(None)
    concurrency: int = operational(64, ge=1)
    max_retries: int = operational(8, ge=0)
    backoff_initial_s: float = operational(1.0, ge=0)
    backoff_max_s: float = operational(60.0, ge=0)
    request_timeout_s: float = operational(120.0, gt=0)
    poll_interval_s: float = operational(30.0, ge=0)
    poll_timeout_s: float = operational(86400.0, gt=0)
    checkpoint_every: int = operational(32, ge=1)
    checkpoint_interval_s: float = operational(5.0, ge=0)


class OpenAITextConfig(OpenAIClientConfig):
    """The `openai` text backend: the OpenAI API or any OpenAI-compatible server (vLLM, TGI, a proxy).

    The API key is never part of the config: `api_key_env` names the environment variable that holds
    it, or `api_key_secret` names a Prefect Secret block.
    """

    endpoint: Literal["chat", "completions"] = "chat"
    base_model: str = "gpt-4o-mini-2024-07-18"
    model: str | None = None  # use this model id as is (no fine-tune job): a served open model or an earlier fine-tune
    finetune_epochs: int | None = Field(None, ge=1)
    finetune_suffix: str = "editforge"
    mode: Literal["online", "batch"] = "online"
    moderation: bool = True
    moderation_model: str = "omni-moderation-latest"
    moderation_batch: int = operational(32, ge=1)


class TextConfig(Section):
    """The text stage: fine-tune an LM on the seed triplets, then write one triplet per caption.

    Sampling defaults are the paper's (temperature 0.7, top_p 1.0, frequency penalty 0.1, at most 256
    tokens, stop at "\\nEND"). `backend: local` runs transformers (+ peft LoRA when
    `finetune_method: lora`); `backend: openai` runs `text.openai`.

    `max_attempts`: a caption whose completion is rejected (unparseable, empty, output equal to the
    input, edit too long or quoting the caption, truncated, content-filtered, generated text flagged by
    moderation) is asked again with the next attempt's seed, up to this many tries in all; the reference
    script tries 4 times (`paper`), 1 keeps one try per caption.

    `target_triplets`: the paper counts accepted triplets (454,445), not captions sampled. With a target,
    the generate flow, once the text stage is done, tops the captions ledger up with a new generation —
    as many captions as the measured acceptance rate says are missing, plus 10% — and runs captions and
    text on its partitions, until the target is met, the sources run out or ``max_top_ups`` rounds
    were made (:mod:`flows.target`). Resumable: the ledger and the finished partitions are the state.

    `refuse_tiny_lm`: the `paper` and `fast` presets set it, so a run that would fine-tune the built-in
    random `tiny` LM (the local backend with neither `models.lm` nor `models.lm_path` given) is refused
    before any work (:func:`tiny_lm_refusal`); `--set models.lm=tiny` runs it on purpose.
    """

    backend: Literal["local", "openai"] = "local"
    seed_annotations: str | None = Field(
        None, description="JSONL of (input, edit, output) seed triplets; default: the project's own; "
                          "builtin:world: the synthetic world's (tasks/world/data/seed_triplets.jsonl)")
    # an error-only bound (a seed file with a longer line is refused, never trimmed): not hashed
    seed_max_line_bytes: int = operational(
        16384, ge=64, description="a seed file line longer than this many bytes is refused with its line number")
    finetune_method: Literal["full", "lora"] = "full"
    finetune_steps: int = Field(300, ge=0)
    finetune_batch_size: int = Field(16, ge=1)
    finetune_checkpoint_every: int = operational(100, ge=1, description="local fine-tune: save its state every N steps")
    learning_rate: float = Field(1e-3, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: tuple[str, ...] = ()  # empty: peft's default target modules for the architecture
    val_fraction: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    frequency_penalty: float = 0.1
    max_new_tokens: int = Field(256, ge=1)
    stop: str = "\nEND"
    max_edit_words: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)
    max_attempts: int = Field(1, ge=1, le=16, description="tries per caption while its completion is rejected "
                                                           "(the reference: 4)")
    seed: int = 0
    # decides how many captions generations there are, not what a partition holds: not hashed
    target_triplets: int | None = operational(None, ge=1, description="sample more captions (new captions "
                                              "generations) until this many triplets are accepted; the paper: 454445")
    max_top_ups: int = operational(8, ge=0, description="at most this many extra captions generations for target_triplets")
    refuse_tiny_lm: bool = operational(False, description="refuse the built-in random tiny LM unless models.lm or "
                                                          "models.lm_path is set (paper, fast)")
    device: Device = operational("auto",
                                 description="local backend: where the LM fine-tunes and generates (auto: CUDA when visible)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="local backend: the LM's dtype on CUDA (float32 on CPU)")
    openai: OpenAITextConfig = OpenAITextConfig()

    @field_validator("seed_annotations")
    @classmethod
    def _seed_file_exists(cls, value: str | None) -> str | None:
        if value in BUILTIN_SEED_ANNOTATIONS:
            return value
        if value and "://" not in value and not Path(value).is_file():
            raise ValueError(f"no such file: {value} (a JSONL file of input/edit/output triplets, or one of "
                             f"{', '.join(BUILTIN_SEED_ANNOTATIONS)})")
        return value

    def seed_annotations_path(self) -> str:
        from seed_annotations.schema import default_triplets_path

        if self.seed_annotations == "builtin:world":
            from tasks.world.data import seeds_path

            return str(seeds_path())
        return self.seed_annotations or str(default_triplets_path())


def tiny_lm_refusal(cfg: PipelineConfig) -> str | None:
    """Why this config must not run the text stages, or None: ``text.refuse_tiny_lm`` is on (the
    `paper` and `fast` presets), the backend is local and neither ``models.lm`` nor
    ``models.lm_path`` was given, so the fine-tune would train the built-in random-init `tiny` LM and
    "succeed" with nonsense triplets."""
    m, t = cfg.models, cfg.text
    if not t.refuse_tiny_lm or t.backend != "local" or m.lm_path or m.lm != "tiny" or "lm" in m.model_fields_set:
        return None
    return ("models.lm is the built-in random-init tiny LM (text.refuse_tiny_lm is on in this preset; the paper "
            "fine-tuned GPT-3 Davinci): set models.lm_path to a fine-tunable causal LM folder (a GPT-3-like model, "
            "e.g. --set models.lm_path=/models/Qwen2.5-1.5B --set text.finetune_method=lora), or use the openai "
            "backend (--set text.backend=openai with text.openai.base_model, or text.openai.base_url and "
            "text.openai.model for a served model); --set models.lm=tiny runs the tiny LM on purpose")


def check_text_lm(cfg: PipelineConfig, origin: str = "config") -> None:
    """Raise :class:`ConfigError` when :func:`tiny_lm_refusal` refuses ``cfg`` (before any work)."""
    if problem := tiny_lm_refusal(cfg):
        raise ConfigError(f"{origin}: {problem}")


RankBy = Literal[RANK_CHOICES]


class Selection(Section):
    """The judge ladder's thresholds and the top-k: CLIP first (the paper's filter), then the image rungs
    (DINOv2, SSIM), then the vision-language judge; each rung sees only what passed the rungs below it
    and applies when its switch (``judges.<rung>.enabled``) is on.

    - CLIP: image-image >= ``clip_image_threshold``, each image vs its caption >= ``clip_caption_threshold``,
      directional similarity >= ``clip_direction_threshold``;
    - DINOv2: cos of the before/after pooled (CLS) embeddings >= ``dino_threshold`` (UltraEdit's 0.4);
    - SSIM: ``ssim_min`` <= SSIM(before, after) <= ``ssim_max`` (too low: the edit rebuilt the image; too
      high: nothing was edited);
    - VLM: the rubric's VIEScore-style overall score (0-10) >= ``vlm_threshold``;
    - per triplet the ``top_k`` passing samples by ``rank_by`` (descending; the paper: ``clip_sim_dir``).

    As ``render.keep`` this is what render applies (CLIP, DINOv2, SSIM; the VLM fields are the base the
    filter stage inherits and are not part of render's hash); ``filter.*`` overrides it to re-select.
    """

    clip_image_threshold: float = Field(0.75, ge=-1, le=1)
    clip_caption_threshold: float = Field(0.2, ge=-1, le=1)
    clip_direction_threshold: float = Field(0.2, ge=-1, le=1)
    top_k: int = Field(4, ge=1)
    dino_threshold: float = Field(0.4, ge=-1, le=1, description="DINOv2 before/after cosine, at least (UltraEdit: 0.4)")
    ssim_min: float = Field(0.2, ge=-1, le=1, description="SSIM(before, after) at least this")
    ssim_max: float = Field(0.95, ge=-1, le=1, description="SSIM(before, after) at most this (above: no edit)")
    vlm_threshold: float = Field(6.0, ge=0, le=10, description="the VLM judge's overall score (0-10) at least this")
    rank_by: RankBy = Field("clip_sim_dir", description="the top-k order (descending): clip_sim_dir (the paper), "
                            "a judge score (dino_similarity, ssim, vlm_score, vlm_instruction, ...)")

    @model_validator(mode="after")
    def _bounds(self) -> Selection:
        if self.ssim_min > self.ssim_max:
            raise ValueError(f"ssim_min {self.ssim_min} is above ssim_max {self.ssim_max}")
        return self


class RenderConfig(Section):
    """The render stage. Defaults are the reference's algorithm; every compute saver is a switch, off.

    Sampling: `samples_per_triplet` seeds per triplet (100 in the reference), `steps` of `scheduler`,
    cfg ~ U(`cfg_range`), p ~ U(`p_range`). Batching (output-preserving up to float rounding):
    `batch_samples` samples per UNet batch (4 x that images), or `auto` (free GPU memory, at most
    `batch_samples_max`; 8 on CPU); halved on CUDA out-of-memory. Savers (see `tasks/render/scheduling.py`
    and `tasks/render/early.py`): `adaptive` draws samples in rounds of `round_size` and stops a triplet
    once `target_passed` (default: `keep.top_k`) passed; `give_up_after` stops a triplet after that
    many samples without a pass; `early_reject_at` (a fraction of the steps) scores the x0 prediction
    and drops samples whose `early_reject_metrics` are below `keep`'s thresholds minus
    `early_reject_margin` (`early_reject_dry_run`: score and record, drop nothing — to calibrate the
    margin with `editforge calibrate-early`). `dtype` float16/bfloat16 and `compile` act on CUDA only.

    `guidance`: `cfg` (the reference: classifier-free guidance, UNet batch 4 x samples, cfg ~ U(`cfg_range`))
    or `none` for few-step distilled models (SDXL-Turbo, LCM-LoRA merged; see the `turbo` preset): the
    conditional half only, UNet batch 2 x samples, `cfg_range` unused (cfg recorded as 1); the pair still
    shares attention for the first p of the steps.

    `keep` is the render-time selection (the paper's thresholds and top 4): it decides which samples
    passed (and so adaptive stopping, giving up and early rejection) and which are kept. Which images
    are written: `save_images: kept` (the reference: only the kept pairs'), `passed` (every passing
    sample's, so the filter stage can re-select a larger top-k) or `all` (every fully rendered sample's,
    so it can also loosen the thresholds).

    p-branching (`p_branches` = K > 1; `tasks/render/pairs.py`): each seed renders K samples, one per
    stratified p (branch b's p in the b-th of K equal slices of `p_range`, drawn from the seed), with
    the seed's cfg, one before image and the after trajectory shared until each branch's sharing stops.
    Every branch is a sample (a row, its own `sample_key` `{caption_id}_{seed}-{b}`): `samples_per_triplet`,
    `round_size` and `give_up_after` count branches and must be multiples of K (a round holds whole
    seeds); early rejection drops branches one by one. `keep_per_seed` (default 1; null: no limit): at most
    that many kept pairs per seed, the best by directional similarity among its passing branches — so the
    top-k stays diverse; adaptive sampling's `target_passed` counts passes under the same cap. Needs
    `attention: ip2p` (the other modes do not use p). K = 1 is the reference (one sample per seed).
    """

    samples_per_triplet: int = Field(100, ge=1)
    batch_samples: int | Literal["auto"] = operational(
        4, description="samples per UNet call (UNet batch = 4 x this, 2 x with guidance none), or 'auto'")
    batch_samples_max: int = operational(64, ge=1)
    steps: int = Field(100, ge=1)
    height: int = Field(512, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
    width: int = Field(512, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
    cfg_range: tuple[float, float] = (7.5, 15.0)
    guidance: Literal["cfg", "none"] = Field(
        "cfg", description="cfg: classifier-free guidance (UNet batch 4 per sample); none: distilled models (2 per sample)")
    p_range: tuple[float, float] = (0.1, 0.9)
    attention: Literal["ip2p", "p2p-replace", "p2p-refine", "none"] = "ip2p"
    scheduler: SchedulerName = "euler_ancestral"
    device: Device = operational("auto")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = operational(False, description="torch.compile the UNet on CUDA (same images up to float rounding)")
    base_seed: int = 0
    adaptive: bool = False
    round_size: int = Field(8, ge=1)
    target_passed: int | None = Field(None, ge=1)
    give_up_after: int | None = Field(None, ge=1)
    early_reject_at: float | None = Field(None, gt=0, lt=1)
    early_reject_margin: float = 0.05
    early_reject_dry_run: bool = False
    keep: Selection = Selection()
    save_images: Literal["kept", "passed", "all"] = "kept"
    clip_resize: Literal["reference", "antialias"] = Field(
        "reference", description="CLIP input resize: the reference's (bicubic, no antialias, no crop) or antialiased + centre crop")
    early_reject_metrics: tuple[Literal[METRICS], ...] = METRICS
    p_branches: int = Field(1, ge=1, le=64, description="p values per seed, branched off one before image and one "
                            "after trunk (1: one sample per seed, the reference)")
    keep_per_seed: int | None = Field(1, ge=1, description="at most this many kept pairs per seed (p-branching); "
                                      "null: no limit")

    @model_validator(mode="after")
    def _ranges(self) -> RenderConfig:
        if self.batch_samples != "auto" and self.batch_samples < 1:
            raise ValueError(f"batch_samples must be >= 1 or 'auto', got {self.batch_samples}")
        for name in ("cfg_range", "p_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")
        if not 0 <= self.p_range[0] <= self.p_range[1] <= 1:
            raise ValueError(f"p_range {list(self.p_range)}: p is the share of steps with shared attention, within [0, 1]")
        if self.cfg_range[0] < 1:
            raise ValueError(f"cfg_range {list(self.cfg_range)}: classifier-free guidance scales start at 1")
        if self.keep.rank_by not in RENDER_RANK_CHOICES:
            raise ValueError(f"keep.rank_by {self.keep.rank_by!r}: render cannot rank by the VLM judge (it runs after "
                             f"render); rank render by one of {list(RENDER_RANK_CHOICES)} and set filter.rank_by="
                             f"{self.keep.rank_by} (with render.save_images=passed, so that the filter has candidates "
                             "beyond render's top-k)")
        k = self.p_branches
        if k > 1:
            if self.attention != "ip2p":
                raise ValueError(f"p_branches {k} needs attention ip2p: {self.attention!r} does not use p")
            rounds = self.adaptive or self.give_up_after is not None
            counts = {"samples_per_triplet": self.samples_per_triplet,
                      "round_size": self.round_size if rounds else None, "give_up_after": self.give_up_after}
            for name, value in counts.items():
                if value is not None and value % k:
                    raise ValueError(f"{name} {value} is not a multiple of p_branches {k}: it counts samples, "
                                     f"and a seed's {k} branches are rendered together (e.g. {name}="
                                     f"{max(k, value - value % k)})")
        return self


class FilterConfig(Section):
    """The filter stage: re-select the kept pairs from ``samples.parquet``, no re-rendering.

    Every field left unset (null) is ``render.keep``'s, so by default the filter stage keeps exactly what
    render kept. Set a stricter threshold or a smaller ``top_k`` here to re-select; a pair the new
    selection wants whose images render did not store (see ``render.save_images``) is counted as
    ``image_not_stored``, never silently replaced. The judge rungs' thresholds (``dino_threshold``,
    ``ssim_min``/``ssim_max``, ``vlm_threshold``) and the top-k order (``rank_by``) re-select the same way,
    from the scores render and the judge stage stored: nothing is rendered or judged again. A sample a
    loosened lower rung lets through that a higher rung never scored is counted (``dino_not_scored``,
    ``ssim_not_scored``, ``vlm_not_judged``), never passed.
    """

    clip_image_threshold: float | None = Field(None, ge=-1, le=1)
    clip_caption_threshold: float | None = Field(None, ge=-1, le=1)
    clip_direction_threshold: float | None = Field(None, ge=-1, le=1)
    top_k: int | None = Field(None, ge=1)
    dino_threshold: float | None = Field(None, ge=-1, le=1)
    ssim_min: float | None = Field(None, ge=-1, le=1)
    ssim_max: float | None = Field(None, ge=-1, le=1)
    vlm_threshold: float | None = Field(None, ge=0, le=10)
    rank_by: RankBy | None = None
    note: str = ""

    def resolve(self, base: Selection) -> Selection:
        """The effective selection: ``base`` (``render.keep``) overridden by the fields set here."""
        overrides = {k: v for k, v in self.model_dump(exclude={"note"}).items() if v is not None}
        return Selection.model_validate({**base.model_dump(), **overrides})


class DinoJudgeConfig(Section):
    """The DINOv2 rung (UltraEdit's gate), run by render on the decoded images right after CLIP scoring:
    cos of the before/after pooled (CLS) embeddings of ``models.dino``; threshold ``render.keep.dino_threshold``."""

    enabled: bool = False
    batch_size: int = operational(32, ge=1, description="images per DINOv2 forward pass")


class SsimJudgeConfig(Section):
    """The SSIM rung (torchmetrics' structural similarity, Gaussian window), run by render after DINOv2 on
    the decoded images in [0, 1]; bounds ``render.keep.ssim_min`` / ``ssim_max``."""

    enabled: bool = False
    sigma: float = Field(1.5, gt=0, description="Gaussian window's standard deviation (Wang et al.: 1.5, 11x11)")
    size: int | None = Field(None, ge=16, description="compute on images resized to this square size (None: as rendered)")


class TokenPrice(Section):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


# List prices (USD per 1M tokens, standard tier) when this was written; check the provider's page and
# override with --set judges.vlm.prices.<model>.input_per_mtok=... A served open model costs what its GPUs do.
DEFAULT_PRICES = {
    "gpt-4o-mini": TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4o": TokenPrice(input_per_mtok=2.50, output_per_mtok=10.00),
    "gpt-4.1-mini": TokenPrice(input_per_mtok=0.40, output_per_mtok=1.60),
    "gpt-4.1": TokenPrice(input_per_mtok=2.00, output_per_mtok=8.00),
}


class VLMJudgeConfig(OpenAIClientConfig):
    """The vision-language judge rung: its own stage (``judge``, between render and filter) asks any
    OpenAI-compatible chat API that accepts images (base64 data-URL image parts) to grade each candidate
    pair with the rubric in ``prompts/judge_*.txt`` (instruction followed, unedited content preserved,
    image quality; 0-10 each, VIEScore-like), parsed as JSON and validated with pydantic.

    Candidates: the samples whose images render stored and (``candidates: passed``) that passed every
    rung below (CLIP, DINOv2, SSIM under ``render.keep``); ``stored``: every stored pair. The threshold
    is ``render.keep.vlm_threshold`` / ``filter.vlm_threshold`` (re-selected by the filter stage without
    re-judging). Requests, retries, backoff, ``Retry-After``, checkpoint/resume and the Batch API are the
    text backend's machinery (:mod:`tasks.common.openai_client`); ``mode: batch`` costs ``batch_discount``
    of the price (OpenAI: half). ``prices`` (USD per million tokens, by model id or its prefix) gives the
    cost recorded per judged sample and per kept pair. ``gpus: 1`` when the judge model is served on the
    partition's own worker (e.g. vLLM on localhost): the partition then holds that GPU.
    """

    SECTION: ClassVar[str] = "judges.vlm"
    LABEL: ClassVar[str] = "judge"
    OWNER: ClassVar[str] = "the VLM judge (judges.vlm)"

    enabled: bool = False
    model: str = "gpt-4o-mini"
    rubric: Literal["viescore"] = "viescore"
    candidates: Literal["passed", "stored"] = "passed"
    detail: Literal["low", "high", "auto"] = Field("low", description="OpenAI's image detail (low: 85 tokens an image)")
    image_format: Literal["jpeg", "png"] = "jpeg"
    image_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the images sent")
    image_size: int | None = Field(512, ge=16, description="longest side of the images sent (None: as rendered)")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(400, ge=16)
    seed: int = 0
    response_format: Literal["json_object", "json_schema", "none"] = Field(
        "json_object", description="ask for JSON (json_schema: the rubric's schema, strict); none: plain text, parsed")
    mode: Literal["online", "batch"] = operational(
        "online", description="online requests, or the Batch API (same requests, recorded per row, cheaper)")
    batch_max_requests: int = operational(1000, ge=1, description="requests per batch job")
    gpus: int = operational(0, ge=0, le=1, description="1: the judge is served on the worker's own GPU")
    prices: dict[str, TokenPrice] = operational(DEFAULT_PRICES)
    batch_discount: float = operational(0.5, ge=0, le=1, description="the Batch API's price factor")


class JudgesConfig(Section):
    """The judge ladder after CLIP, each rung a switch: DINOv2 and SSIM run inside render (images in
    memory), the VLM judge is its own stage; thresholds live in ``render.keep`` / ``filter.*``."""

    dino: DinoJudgeConfig = DinoJudgeConfig()
    ssim: SsimJudgeConfig = SsimJudgeConfig()
    vlm: VLMJudgeConfig = VLMJudgeConfig()

    def image_rungs(self) -> tuple[str, ...]:
        """The rungs render runs after CLIP, in ladder order."""
        return tuple(r for r in IMAGE_RUNGS if getattr(self, r).enabled)

    def rungs(self) -> tuple[str, ...]:
        """Every rung that applies, in ladder order (CLIP always)."""
        return ("clip", *self.image_rungs(), *(("vlm",) if self.vlm.enabled else ()))


class PackConfig(Section):
    shard_max_samples: int = Field(1000, ge=1)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = Field(100, ge=1, le=100, description="JPEG/WebP quality (the reference saves JPEG at 100)")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    hf_export: bool = Field(False, description="also write Hugging Face parquet with the released columns")


class TrainConfig(Section):
    """The training flow (`flows/train.py`, `tasks/train/`): the editing model on the packed shards.

    Whose defaults they are:
    - the paper (arXiv 2211.09800, sec. 4 / appendix) and its reference code (`configs/train.yaml`,
      `edit_dataset.py`, `ddpm_edit.py`): SD 1.5 UNet widened to 8 input channels (bias kept), 256² crops
      from a random 256–288 resize, horizontal flip, AdamW lr 1e-4 without warm-up, batch 32 x 4
      accumulation per GPU (x 8 GPUs = 1024), EMA weights, conditioning dropout 5 % (text only / both /
      image only), no gradient clipping (`max_grad_norm: null`), one kept pair per triplet per epoch
      drawn at random (`sampling: per_triplet`), sampled with text 7.5 / image 1.5 guidance;
      AdamW's betas / weight decay / epsilon (0.9, 0.999, 1e-2, 1e-8) are PyTorch's defaults, which the
      reference (`AdamW(params, lr)`) and diffusers' example both use; float32 (`mixed_precision: "no"`);
    - diffusers' `train_instruct_pix2pix(_sdxl).py`, where the reference has no equivalent: the LR scheduler
      names and warm-up, `mixed_precision` fp16/bf16, `gradient_checkpointing`, `use_8bit_adam` and `allow_tf32`
      as switches (off, as there); diffusers' own
      `max_grad_norm: 1.0` and one item per pair (`sampling: per_pair`) are switches here, off by default;
    - SDXL (`models.diffusion: sdxl`): both text encoders (penultimate hidden states concatenated, the
      second one's pooled projection), `add_time_ids` = (original height, width, crop top, left, target
      height, width) per sample, the VAE in float32 unless `models.vae_path` names an fp16-safe one.
    Not part of the generation chain: its hash covers this section, the diffusion model, the VAE and the shards it trains on.

    The batch: ``total_batch_size`` (hashed; the paper's 1024) = ``batch_size`` per process x the accumulation
    x ``processes`` x ``nodes``; the accumulation is derived from the others (a ``gradient_accumulation_steps``
    that disagrees is an error naming both), so the same config trains on the same samples, in the same
    order, with the same noise on 1, 2 or 8 GPUs (``docs/training.md``). The flow launches the processes
    itself (torchrun); the settings that only say where it runs are operational.
    """

    steps: int = Field(10_000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="samples per process per micro-batch")
    total_batch_size: int = Field(1024, ge=1, description="samples per optimizer step over every process (the paper: "
                                  "1024 = 32 x 4 accumulation x 8 GPUs): batch_size x accumulation x processes x nodes")
    gradient_accumulation_steps: int | None = operational(
        None, ge=1, description="micro-batches per process per optimizer step; null: derived, total_batch_size / "
        "(batch_size x processes x nodes); a number is checked against that")
    processes: int | Literal["auto"] = operational(
        "auto", description="training processes per node, one per GPU, launched by the flow (torchrun); auto: every "
        "visible GPU (1 on the CPU)")
    nodes: int = operational(1, ge=1, description="machines training together; node 0 runs the flow, the others run "
                             "`editforge train --node-rank K` (docs/training.md)")
    rdzv_endpoint: str | None = operational(
        None, description="host:port of node 0 where the nodes meet (torchrun's static rendezvous) when nodes > 1; "
        "default: $EDITFORGE_RDZV_ENDPOINT")
    resume_other_processes: bool = operational(
        False, description="resume a checkpoint written by another number of processes (same samples and noise; "
        "the weights then differ from an uninterrupted run by float rounding)")
    log_samples: bool = operational(False, description="write the sample keys of every micro-batch, per process, to "
                                    "the work folder (samples-rank-NNNNN.jsonl)")
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(
        None, gt=0, description="clip the gradient norm to this (diffusers' example: 1.0); null: no clipping, as the reference")
    sampling: Literal["per_triplet", "per_pair"] = Field(
        "per_triplet", description="per_triplet: one kept pair per triplet per epoch, drawn with the seed (the reference); "
        "per_pair: every kept pair once per epoch (diffusers' example)")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = Field(False, description="bitsandbytes' 8-bit AdamW (diffusers' --use_8bit_adam): optimizer "
                                "state in 8 bits, about 3/4 of its memory saved")
    allow_tf32: bool = Field(False, description="TF32 matmuls on Ampere and newer GPUs (diffusers' --allow_tf32)")
    use_ema: bool = True
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    resolution: int = Field(256, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE,
                            description="square crop size (a multiple of the VAE downsampling)")
    max_resize_ratio: float = Field(288 / 256, ge=1, description="resize to a random size in [res, res*ratio]")
    flip_prob: float = Field(0.5, ge=0, le=1)
    conditioning_dropout: float = Field(0.05, ge=0, le=1 / 3, description="5%: text only, both, image only")
    shuffle_buffer: int = Field(1000, ge=1, description="samples in the WebDataset shuffle buffer")
    num_workers: int = operational(4, ge=0, description="DataLoader workers per process (the data order does not "
                                   "depend on it)")
    seed: int = 0
    device: Device = operational("auto")
    checkpoint_every: int = operational(500, ge=1)
    checkpoints_total_limit: int = operational(2, ge=1)
    log_every: int = operational(50, ge=1)
    sample_steps: int = Field(50, ge=1, description="denoising steps of the sample edit on a val example")
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5

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
            raise ValueError(f"total_batch_size {self.total_batch_size} is not a multiple of batch_size x processes = "
                             f"{self.batch_size} x {procs} = {per_micro}: change train.total_batch_size or "
                             "train.batch_size (or the process count)")
        accum = self.total_batch_size // per_micro
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps != accum:
            raise ValueError(f"gradient_accumulation_steps {self.gradient_accumulation_steps} disagrees with "
                             f"total_batch_size {self.total_batch_size} = {self.batch_size} x {accum} x {procs}: "
                             "leave train.gradient_accumulation_steps unset (it is derived) or change "
                             "train.total_batch_size")
        return accum

    def batch_line(self, world_size: int) -> str:
        """'total batch 1024 = 32 × 4 × 8 processes': the batch as it will train on `world_size` processes."""
        procs = f"{world_size} process{'es' if world_size > 1 else ''}"
        nodes = f" ({self.nodes} nodes × {world_size // self.nodes})" if self.nodes > 1 else ""
        return f"total batch {self.total_batch_size} = {self.batch_size} × {self.accumulation(world_size)} × {procs}{nodes}"


class RunConfig(Section):
    """How `editforge-generate` runs the chain (never part of a stage hash).

    ``in-process``: every stage in this flow run (the demo, a single box). ``fan-out``: each stage's
    partitions in blocks of ``block_size``, each block a child flow run of the stage's deployment
    (``deployments``: its name, ``{preset}`` and ``{stage}`` filled in), on the work pool that
    deployment names; a failed block is submitted again up to ``max_block_attempts`` times in all
    (see `flows/fanout.py`). ``alert_min_pass_rate``: see `flows/dashboard.py` (events).
    """

    mode: Literal["in-process", "fan-out"] = operational("in-process")
    block_size: int = operational(8, ge=1)
    max_block_attempts: int = operational(3, ge=1)
    deployments: str = operational("{preset}-{stage}")
    poll_s: float = operational(5.0, gt=0)
    max_parallel_partitions: int | None = operational(
        None, ge=1, description="partitions of a stage run at once in one process (in-process runs and each fan-out "
        "block); None: the available CPUs over the CPUs a partition takes (the stage's resources); stages that hold "
        "a GPU or an API quota run one at a time whatever this says")
    # the dashboard's alert: a render partition whose pass rate (passed / samples drawn) falls below this
    # emits `editforge.partition.low-pass-rate` (infra/automations/ notifies on it); None: never
    alert_min_pass_rate: float | None = operational(0.01, ge=0, le=1)


class ReviewConfig(Section):
    """People's review of a run's pairs (`editforge review`) and the filter calibrated on their labels
    (`editforge calibrate-filter`). Never part of a stage hash (no stage reads it; every field is
    operational). The page shows a stratified sample of the rendered pairs whose images are stored: the
    kept pairs, the passing ones top-k left out, for each rejection reason the rejected pairs within
    ``band`` below its threshold, and the rest (``far``); each label carries its stratum's weight (pairs
    in the stratum / pairs sampled), so the precision and recall estimated from the labels are those of
    every pair of the partitions read, not of the sample.
    """

    kept_pairs: int = operational(100, ge=0, description="kept pairs sampled for review")
    passed_pairs: int = operational(25, ge=0, description="passing pairs top-k left out, sampled for review")
    near_pairs: int = operational(50, ge=0, description="rejected pairs sampled per rejection reason, within band "
                                  "below its threshold")
    far_pairs: int = operational(25, ge=0, description="other rejected pairs sampled for review")
    band: float = operational(0.1, gt=0, description="how far below a threshold a rejected pair is near it (score "
                              "units: cosine / SSIM; the VLM's 0-10 score: ten times this)")
    max_partitions: int = operational(8, ge=1, description="render partitions read for review and calibration, "
                                      "spread over the run (the whole run: one sample of them)")
    target_precision: float = operational(0.9, gt=0, lt=1, description="calibrate-filter: the precision (share of "
                                          "passing pairs people call good edits) the suggested thresholds reach")
    confidence: float = operational(0.95, gt=0, lt=1, description="calibrate-filter: the Wilson intervals' level; a "
                                    "suggestion must reach the target at the interval's lower end")
    min_passing: int = operational(10, ge=1, description="calibrate-filter: labelled pairs a suggestion must pass at least")


class CostConfig(Section):
    """Prices for ``editforge estimate`` (:mod:`flows.estimate`), in US dollars. Never part of a stage hash:
    no stage record names this section, and every field is operational besides.

    Defaults, with where they come from (list prices as of May 2026, not checked live from here; set
    your own with ``--set cost.gpu_hour_usd=...``):

    - ``gpu_hour_usd`` 3.00: one H100 SXM 80GB on demand at a specialty GPU cloud (Lambda, CoreWeave,
      RunPod, Crusoe: $2.49-3.99 per GPU-hour in early 2026, pricegpu.pages.dev "H100 vs A100 cloud
      pricing"; hyperscalers list $3.50-5 and more, spot and reservations 30-50% less).
    - ``cpu_hour_usd`` 0.045: one vCPU on demand (AWS c7i.large, 2 vCPUs at $0.0893/h in us-east-1).
    - ``text_*``: OpenAI's fine-tuned ``gpt-4o-mini-2024-07-18`` (``text_price_model``, the default
      ``text.openai.base_model``): $0.30 / $1.20 per million input / output tokens and $3.00 per million
      training tokens (OpenAI's pricing page, fine-tuning section; the same figures in tokenmix.ai's
      April 2026 table). The Batch API (``text.openai.mode: batch``) bills generation at
      ``batch_discount`` (0.5) of that. Training tokens are the fine-tune file's tokens times the epochs:
      ``text.openai.finetune_epochs``, else ``finetune_epochs_assumed`` (OpenAI's ``auto`` picks from
      the dataset size).
    """

    gpu_hour_usd: float = operational(3.0, ge=0, description="one GPU-hour (render, local LM)")
    cpu_hour_usd: float = operational(0.045, ge=0, description="one CPU-core hour (captions, filter, pack)")
    text_price_model: str = operational("gpt-4o-mini-2024-07-18", description="the model the text_* prices are for")
    text_input_per_mtok_usd: float = operational(0.30, ge=0, description="per million prompt tokens (fine-tuned model)")
    text_output_per_mtok_usd: float = operational(1.20, ge=0, description="per million completion tokens")
    text_training_per_mtok_usd: float = operational(3.00, ge=0, description="per million fine-tune training tokens")
    batch_discount: float = operational(0.5, ge=0, le=1, description="Batch API price as a share of online")
    finetune_epochs_assumed: int = operational(3, ge=1, description="epochs when text.openai.finetune_epochs is unset")


class PipelineConfig(Section):
    name: str = Field("demo", description="the run's name: lowercase letters, digits and dashes (dashboard keys)")
    output_root: str = Field("runs/demo", description="the run's folder or object-store URL (s3://bucket/prefix); "
                             "checked at load: not empty, not a file (writable, the bucket there: flows.options)")
    verify: Literal["size", "sha256"] = Field(
        "size", description="before skipping a finished partition, check its outputs' sizes, or also their sha256")
    models: ModelsConfig = ModelsConfig()
    captions: CaptionsConfig = CaptionsConfig()
    text: TextConfig = TextConfig()
    render: RenderConfig = RenderConfig()
    filter: FilterConfig = FilterConfig()
    judges: JudgesConfig = JudgesConfig()
    pack: PackConfig = PackConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    cost: CostConfig = operational(CostConfig(), description="prices for editforge estimate (never hashed)")
    review: ReviewConfig = operational(ReviewConfig(), description="editforge review / calibrate-filter (never hashed)")

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
        for where, rank in (("render.keep.rank_by", self.render.keep.rank_by), ("filter.rank_by", selection.rank_by)):
            needs = "vlm" if rank in VLM_COLUMNS else "dino" if rank == "dino_similarity" else "ssim" if rank == "ssim" else None
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
    children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else
                node.value if isinstance(node, yaml.SequenceNode) else [])
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
        raise ConfigError(f"{origin}: {len(text):,} characters, more than a config takes ({MAX_YAML_BYTES:,})")
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses non-printable characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set())
        return loader.construct_document(node)
    except _YAMLTooBig as err:
        raise ConfigError(f"{origin}: YAML refused: {err}; write the values out instead of using anchors and "
                          "aliases") from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML refused: nested too deeply") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: invalid YAML: {_one_line(str(err))}") from None
    except (ValueError, TypeError, LookupError, ArithmeticError) as err:  # a constructor meeting a bad scalar
        raise ConfigError(f"{origin}: invalid YAML value ({type(err).__name__}: {_one_line(str(err))})") from None
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
                raise ConfigError(f"{path}: no such file (a preset is one of {preset_names()} or a YAML file)")
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
        raise ConfigError(f"unknown preset {preset!r}: expected one of {preset_names()} or a path to a YAML file "
                          "(.yaml or .yml)")
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
        raise ConfigError(f"override {text!r}: {key!r} has an empty part between dots: expected a dotted key such "
                          "as render.keep.top_k")
    return key, load_yaml(raw, f"override {key!r}") if raw.strip() else ""


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def load_config(preset: str = "demo", overrides: list[str] | None = None) -> PipelineConfig:
    text, origin = _preset_text(preset)
    data = load_yaml(text, origin) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections (name, output_root, render, ...), "
                          f"got {type(data).__name__}")
    if not origin.startswith("preset ") and "name" not in data:  # a YAML file: named after it
        data["name"] = re.sub("[^a-z0-9-]+", "-", Path(preset).stem.lower()).strip("-") or "run"
    for item in overrides or []:
        _set_dotted(data, *parse_override(item))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                 + ("" if isinstance(e.get("input"), dict) else f" (got {_shown(e.get('input'))})")
                 for e in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            lines.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more")
        raise ConfigError(f"{origin}: invalid config:\n  " + "\n  ".join(lines)) from None
