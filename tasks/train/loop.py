"""The InstructPix2Pix training loop on `accelerate` (paper sec. 3.2 and 4; reference `ddpm_edit.py`).

Per micro-batch, as the reference `LatentDiffusion` with `conditioning_key: hybrid`:

- target latent z = E(edited) sampled from the VAE posterior, times the VAE's `scaling_factor`;
- image conditioning c_I = E(original).mode(), *unscaled* — the reference's `encode_first_stage(...).mode()`
  and exactly what `StableDiffusionInstructPix2PixPipeline.prepare_image_latents` feeds at inference;
- text conditioning c_T = CLIP text encoder's last hidden state of the instruction; SDXL (as diffusers'
  `train_instruct_pix2pix_sdxl.py`): both encoders' penultimate hidden states concatenated, the second's
  pooled projection as `text_embeds`, and `time_ids` = (original h, w, crop top, left, target h, w) of each
  sample's view (the SDXL micro-conditioning; diffusers' example uses a fixed (res, res, 0, 0, res, res));
  the VAE stays float32 under mixed precision (SDXL's VAE overflows in float16) unless `models.vae_path`
  names a replacement (an fp16-fix VAE), which then runs in the training dtype;
- t ~ U{0..T-1}, z_t = DDPM q(z_t | z) (noise scheduler built from the model's scheduler config);
- conditioning dropout (`tasks.train.conditioning`), UNet input cat([z_t, c_I], dim=1) (8 channels);
- loss = MSE(ε̂, ε) (or the velocity when the scheduler is v-prediction).

AdamW (bitsandbytes' 8-bit AdamW with `use_8bit_adam`), lr 1e-4 without warm-up, gradient accumulation,
gradient clipping only when `max_grad_norm` is set (the reference has none; diffusers' example clips at 1.0),
optional EMA (diffusers `EMAModel`, decay warm-up (1+n)/(10+n) like the SD code base's LitEma).

One optimizer step trains `total_batch_size` samples: global micro-batches of `batch_size`, process r of N
taking micro-batches r, r + N, ... (`tasks.train.data`). All randomness of a micro-batch (VAE sample,
noise, timesteps, dropout) comes from a generator seeded by (seed, its global index), so 1 or N processes
train on the same samples with the same draws, and a run resumed from a checkpoint
(`accelerator.save_state`, every `checkpoint_every` steps and at the end) continues exactly as the
uninterrupted run would. Under a launcher (torchrun: `tasks.train.launch`) the main process alone writes
the checkpoints and the model. The final weights (EMA weights when `use_ema`) are saved as an
InstructPix2Pix pipeline folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tasks.common.config import ConfigError, ModelsConfig, TrainConfig
from tasks.common.errors import PermanentError
from tasks.train.conditioning import apply_dropout, drop_rows, dropout_masks, encode_text, null_text
from tasks.train.data import Augment, index_samples, make_train_loader
from tasks.train.model import base_folder, load_editing_model, save_pipeline

log = logging.getLogger("editforge")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_per_s: float = 0.0
    wall_time_s: float = 0.0
    processes: int = 1

    def summary(self) -> dict[str, Any]:
        losses = [h["loss"] for h in self.history]
        return {"steps": self.steps, "resumed_from": self.resumed_from, "steps_per_s": round(self.steps_per_s, 4),
                "wall_time_s": round(self.wall_time_s, 3), "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "samples_seen": self.history[-1]["samples"] if self.history else 0, "processes": self.processes}

    def to_json(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "steps": self.steps, "resumed_from": self.resumed_from,
                "history": self.history, "steps_per_s": self.steps_per_s, "wall_time_s": self.wall_time_s,
                "processes": self.processes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{**data, "model_dir": Path(data["model_dir"])})


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of global micro-batch `batch_index`'s random draws: the same whichever process trains it and
    whenever the run was (re)started (the `0` is where the process index was: one process keeps its seeds)."""
    return int(hashlib.sha256(f"{seed}/0/{batch_index}".encode()).hexdigest()[:15], 16)


class ProcessCountChangedError(PermanentError):
    """A checkpoint written by another number of processes, resumed without `train.resume_other_processes`."""


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-<step>` with a trainer state) under `folder`, by step."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path, run_key: str) -> Path | None:
    """The newest checkpoint written under `run_key`; checkpoints of another config are removed."""
    latest = None
    for _, path in list_checkpoints(folder):
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("run_key") != run_key:
            log.info("train: removing checkpoint %s of another config (%s)", path.name, state.get("run_key"))
            shutil.rmtree(path, ignore_errors=True)
        else:
            latest = path
    return latest


def save_checkpoint(accelerator, folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, trainer state last, then rename; keep the newest."""
    final = folder / f"checkpoint-{step:08d}"
    tmp = folder / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _make_accelerator(cfg: TrainConfig):
    """The Accelerator of this process: one of WORLD_SIZE under a launcher, else the only one; its accumulation
    is the config's, derived for that many processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate keeps process-wide singletons; a second training in one process (a retry, a test) with
    # other settings must start from a clean state (single process only: a launched job trains once).
    if world == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.accumulation(world),
                              cpu=cfg.device == "cpu")
    if accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes, the launcher started {world}")
    return accelerator


@dataclass
class _Prepared:
    """What `_prepare` sets up: `unet` is the prepared (wrapped) UNet, `comps.unet` the bare one."""
    accelerator: Any
    comps: Any
    noise_scheduler: Any
    unet: Any
    ema: Any  # diffusers `EMAModel`, or None
    optimizer: Any
    lr_scheduler: Any
    weight_dtype: torch.dtype
    base: Path | None = None  # the base model folder the frozen components are copied from
    vae_dir: str | None = None  # models.vae_path


def train_editing_model(cfg: TrainConfig, models: ModelsConfig, train_urls: list[str], workdir: str | Path,
                        run_key: str = "", logger: logging.Logger | None = None,
                        on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train for `cfg.steps` optimizer steps (resuming from `workdir/checkpoints`), save `workdir/model`.

    Called in every process of a launched job (the same arguments); the main process writes the files."""
    logger, workdir = logger or log, Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    # 1. prepare: accelerator, models on the device, EMA, optimizer + LR schedule, `accelerator.prepare`
    prep = _prepare(cfg, models)
    _same_run_everywhere(prep.accelerator, run_key)
    # 2. resume: step and history from the newest checkpoint of this run_key, if any
    step, history = _resume(cfg, prep, ckpt_dir, run_key, logger)
    resumed_from = step
    # 3. data: the null-text embedding for dropout, the data stream past the micro-batches already seen
    null = null_text(prep.comps)
    loader = _make_loader(cfg, prep, train_urls, step)
    sample_log = _sample_log(workdir, prep.accelerator.process_index, step) if cfg.log_samples else None
    # 4. train up to `cfg.steps`, checkpointing on the way
    step, train_time = _train_steps(cfg, prep, loader, null, step, history, ckpt_dir, run_key, logger,
                                    on_step, sample_log)
    # 5. save the final (EMA) weights as a pipeline folder
    model_dir = _save_final(prep, workdir)
    done = step - resumed_from
    return TrainResult(model_dir, step, resumed_from, history, done / train_time if done else 0.0, train_time,
                       prep.accelerator.num_processes)


def _same_run_everywhere(accelerator, run_key: str) -> None:
    """Every process trains the same weights key (nodes started with other settings would train garbage)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    keys = gather_object([run_key])
    if len(set(keys)) > 1:
        raise ValueError(f"the processes train different configs (weights keys by process: {keys}): start every "
                         "node with the same preset, overrides and index")


def _sample_log(workdir: Path, rank: int, step: int) -> Path:
    """This process's sample-key log, cut back to the steps up to `step` (a resumed run rewrites the rest)."""
    path = workdir / f"samples-rank-{rank:05d}.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(f"{line}\n" for line in kept))
    return path


def _prepare(cfg: TrainConfig, models: ModelsConfig) -> _Prepared:
    """Accelerator, models on its device, EMA, AdamW + LR schedule, the trained pieces `prepare`d."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = _make_accelerator(cfg)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    comps = load_editing_model(models.diffusion, models.diffusion_path, models.vae_path)
    base = base_folder(comps)
    factor = comps.vae_scale_factor
    if cfg.resolution % factor:
        raise ValueError(f"train.resolution={cfg.resolution} must be a multiple of the VAE's downsampling {factor}")
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    vae, unet = comps.vae, comps.unet
    # SDXL's own VAE overflows in float16: it stays float32 unless models.vae_path names a replacement
    vae_dtype = torch.float32 if comps.is_sdxl and not models.vae_path else weight_dtype
    frozen = [(vae, vae_dtype), (comps.text_encoder, weight_dtype), (comps.text_encoder_2, weight_dtype)]
    for module, dtype in frozen:  # `to(dtype=...)` only when it changes: diffusers warns on any cast
        if module is not None:
            module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
    unet.to(device).train().requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    optimizer = _optimizer_class(cfg)(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    return _Prepared(accelerator, comps, noise_scheduler, unet, ema, optimizer, lr_scheduler, weight_dtype, base,
                     models.vae_path)


def _optimizer_class(cfg: TrainConfig):
    """AdamW, or bitsandbytes' 8-bit AdamW (`use_8bit_adam`, as diffusers' trainers)."""
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("train.use_8bit_adam needs bitsandbytes: pip install 'editforge[cluster]' (or "
                          "bitsandbytes), or set train.use_8bit_adam=false") from None
    return bnb.optim.AdamW8bit


def _resume(cfg: TrainConfig, prep: _Prepared, ckpt_dir: Path, run_key: str,
            logger: logging.Logger) -> tuple[int, list[dict[str, Any]]]:
    """Load the newest checkpoint of `run_key` into the accelerator: its (step, history), else (0, []).

    A checkpoint of another process count is refused unless `resume_other_processes` (the same samples and
    draws follow, but the gradients' sums are rounded in another order)."""
    step, history, accelerator = 0, [], prep.accelerator
    latest = latest_checkpoint(ckpt_dir, run_key) if accelerator.is_main_process else None
    latest = _broadcast_path(accelerator, latest)
    if latest is not None:
        if not (latest / STATE_FILE).is_file():
            raise FileNotFoundError(f"process {accelerator.process_index} cannot see {latest}: with train.nodes > 1 "
                                    "the work folder must be on storage every node shares (docs/training.md)")
        state = json.loads((latest / STATE_FILE).read_text())
        before, now = int(state.get("processes", 1)), accelerator.num_processes
        if before != now and not cfg.resume_other_processes:
            raise ProcessCountChangedError(
                f"{latest} was written by {before} process(es), this run has {now}: resume with {before} "
                f"(train.processes x train.nodes) to continue exactly, or set train.resume_other_processes=true to "
                f"continue on {now} (the same samples, order and noise; the weights then differ from an "
                "uninterrupted run by float rounding)")
        accelerator.load_state(str(latest))
        step, history = int(state["step"]), list(state["history"])[: int(state["step"])]
        if before != now:  # accelerate steps the schedule once per process and optimizer step
            schedule = prep.lr_scheduler.scheduler
            schedule.last_epoch = step * now - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                schedule.step()
        logger.info("train: resumed from %s (step %d of %d, %d process(es))", latest.name, step, cfg.steps, now)
    return step, history


def _make_loader(cfg: TrainConfig, prep: _Prepared, train_urls: list[str], step: int):
    """This process's batch stream, past the micro-batches of the `step` optimizer steps already done; the
    shards' sample index is listed once, by the main process, and shared."""
    accelerator = prep.accelerator
    accum = accelerator.gradient_accumulation_steps
    index = index_samples(train_urls) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [index]
        broadcast_object_list(box, from_process=0)
        index = box[0]
    augment = Augment(cfg.resolution, cfg.max_resize_ratio, cfg.flip_prob)
    return make_train_loader(train_urls, prep.comps.tokenizer, augment, cfg.batch_size, cfg.seed,
                             cfg.shuffle_buffer, cfg.num_workers, skip_batches=step * accum,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             sampling=cfg.sampling, tokenizer_2=prep.comps.tokenizer_2, index=index)


def _train_steps(cfg: TrainConfig, prep: _Prepared, loader, null: tuple[torch.Tensor, torch.Tensor | None], step: int,
                 history: list[dict[str, Any]], ckpt_dir: Path, run_key: str, logger: logging.Logger,
                 on_step: Callable[[dict[str, Any]], None] | None, sample_log: Path | None = None
                 ) -> tuple[int, float]:
    """Steps `step`..`cfg.steps`, each appended to `history`, checkpointed; returns (step, seconds)."""
    accelerator, device, unet, ema = prep.accelerator, prep.accelerator.device, prep.unet, prep.ema
    optimizer, lr_scheduler = prep.optimizer, prep.lr_scheduler
    resumed_from, samples_per_step = step, cfg.total_batch_size
    t0 = time.perf_counter()
    micro_losses: list[torch.Tensor] = []
    epoch = 0
    while step < cfg.steps:
        data = next(loader)
        epoch = max(epoch, *data["epochs"])
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, data["batch"]))
        if sample_log is not None:
            with sample_log.open("a") as out:
                out.write(json.dumps({"step": step + 1, "batch": data["batch"], "keys": data["keys"]}) + "\n")
        with accelerator.accumulate(unet):
            loss = batch_loss(data, gen, cfg.conditioning_dropout, prep.comps, unet, prep.noise_scheduler, null,
                              prep.weight_dtype)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_losses.append(accelerator.reduce(loss.detach(), reduction="mean"))
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(unet.parameters())
        if accelerator.num_processes > 1:  # the newest epoch any process has reached, as one process would see it
            epoch = int(accelerator.gather(torch.tensor([epoch], device=device)).max())
        record = {"step": step, "loss": float(torch.stack(micro_losses).mean()), "lr": lr_scheduler.get_last_lr()[0],
                  "epoch": epoch, "samples": step * samples_per_step,
                  "time_s": round(time.perf_counter() - t0, 4)}
        micro_losses = []
        history.append(record)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (step - resumed_from) / max(time.perf_counter() - t0, 1e-9)
            logger.info("train: step %d/%d loss %.4f lr %.2e %.2f steps/s", step, cfg.steps, record["loss"],
                        record["lr"], rate)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(accelerator, ckpt_dir, step, {"step": step, "run_key": run_key, "history": history,
                                                          "processes": accelerator.num_processes},
                            cfg.checkpoints_total_limit)
        if on_step is not None:
            on_step(record)
    return step, time.perf_counter() - t0


def _save_final(prep: _Prepared, workdir: Path) -> Path:
    """The trained (EMA, when used) UNet, in float32, as `workdir/model`, beside the base model's frozen
    components copied as files (`save_pipeline`)."""
    accelerator, comps = prep.accelerator, prep.comps
    accelerator.wait_for_everyone()
    model_dir = workdir / "model"
    final_unet = accelerator.unwrap_model(prep.unet)
    if prep.ema is not None:
        prep.ema.copy_to(final_unet.parameters())
    if accelerator.is_main_process:
        comps.unet = final_unet.eval()
        for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
            if module is not None and module.dtype != torch.float32:
                module.to(dtype=torch.float32)
        save_pipeline(comps, model_dir, base=prep.base, vae_dir=prep.vae_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model_dir


def batch_loss(data: dict[str, Any], gen: torch.Generator, dropout: float, comps, unet, noise_scheduler,
               null: tuple[torch.Tensor, torch.Tensor | None], weight_dtype: torch.dtype) -> torch.Tensor:
    """The denoising loss of one micro-batch; every random draw from `gen` (dropout probability `dropout`)."""
    device, vae = gen.device, comps.vae
    edited = data["edited_pixel_values"].to(device, dtype=vae.dtype)
    original = data["original_pixel_values"].to(device, dtype=vae.dtype)
    with torch.no_grad():
        latents = (vae.encode(edited).latent_dist.sample(generator=gen) * vae.config.scaling_factor).to(weight_dtype)
        image_latents = vae.encode(original).latent_dist.mode().to(weight_dtype)
        text, pooled = encode_text(comps, data["input_ids"], data.get("input_ids_2"))
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    drop_text, drop_image = dropout_masks(n, dropout, gen, device)
    text, image_latents = apply_dropout(text, image_latents, null[0], drop_text, drop_image)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    kwargs = {}
    if comps.is_sdxl:
        pooled = drop_rows(pooled, null[1], drop_text)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype),
                                       "time_ids": data["time_ids"].to(device, dtype=weight_dtype)}
    pred = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text.to(weight_dtype), **kwargs).sample
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _broadcast_path(accelerator, path: Path | None) -> Path | None:
    """The main process's choice of checkpoint, shared with every process."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    box = [str(path) if path else None]
    broadcast_object_list(box, from_process=0)
    return Path(box[0]) if box[0] else None
