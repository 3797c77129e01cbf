r"""Local LLM backend (transformers): fine-tune a causal LM on the seed triplets, then generate.

Fine-tuning in the paper's format (loss on completion tokens only), ``full`` or ``lora`` (peft); generation
with the paper's sampling settings (temperature 0.7, top_p 1.0, frequency penalty 0.1, stop at ``\nEND``),
seeded per batch with fixed boundaries so a resumed run regenerates exactly what an uninterrupted one would.
Serving instead: vLLM or any OpenAI-compatible server with ``text.backend=openai``.

The format, LoRA, seeding and retries in full: docs/text.md ("In the code").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from prompts.templates import STOP_SEQUENCE, finetune_completion, finetune_prompt
from tasks.common import storage
from tasks.common.config import PipelineConfig, TextConfig
from tasks.common.contract import Checkpoint, Stats
from tasks.common.devices import compute_dtype, torch_device
from tasks.common.models import load_lm
from tasks.text.format import TRIPLET_COLUMNS, attempt_key, rejections_so_far, triplet_row, wants_retry

ADAPTER_CONFIG = "adapter_config.json"


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style frequency penalty over the generated tokens (not the prompt)."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


def _encode_example(tokenizer, input_caption: str, edit: str, output: str, max_length: int):
    prompt_ids = tokenizer(finetune_prompt(input_caption), add_special_tokens=False).input_ids
    completion_ids = tokenizer(finetune_completion(edit, output), add_special_tokens=False).input_ids
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels


def _collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


class FinetuneCheckpoint:
    """The fine-tune's state every ``every`` steps in ``folder`` (safetensors + JSON, newest only), so a
    killed fine-tune resumes where it stopped and ends with the weights of an uninterrupted one: the
    trainable weights, the optimizer's moments, the schedule, the example order and both RNGs."""

    def __init__(self, folder: str, every: int):
        self.folder, self.every = folder, every
        self.state_url = storage.url_join(folder, "state.json")  # written last: names the step's tensors

    def _tensors_url(self, step: int) -> str:
        return storage.url_join(self.folder, f"step-{step:08d}.safetensors")

    def save(self, step: int, model, optimizer, schedule, rng: random.Random, order: list[int], losses: list[float]) -> None:
        from safetensors.torch import save

        tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        scalars: dict[str, dict] = {}
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(i), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        state = {"step": step, "order": order, "losses": losses, "py_rng": _jsonable(rng.getstate()),
                 "optim_scalars": scalars, "param_groups": optimizer.state_dict()["param_groups"],
                 "schedule": {k: v for k, v in schedule.state_dict().items() if k != "lr_lambdas"},
                 "tensors": self._tensors_url(step).rsplit("/", 1)[-1]}
        previous = json.loads(storage.read_bytes(self.state_url))["tensors"] if storage.exists(self.state_url) else None
        # the tensors first, then the state that names them: a kill in between leaves the previous pair whole
        storage.write_bytes_atomic(self._tensors_url(step), save(tensors))
        storage.write_bytes_atomic(self.state_url, json.dumps(state).encode())
        if previous and previous != state["tensors"]:
            storage.remove(storage.url_join(self.folder, previous))

    def restore(self, model, optimizer, schedule, rng: random.Random) -> tuple[int, list[int], list[float]] | None:
        """Load the newest state into the objects; (step, order, losses), or None when there is none."""
        if not storage.exists(self.state_url):
            return None
        from safetensors.torch import load

        state = json.loads(storage.read_bytes(self.state_url))
        tensors = load(storage.read_bytes(storage.url_join(self.folder, state["tensors"])))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(tensors[f"model.{name}"])
        moments: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                moments.setdefault(int(i), {})[name] = value
        for i, extra in state["optim_scalars"].items():
            moments.setdefault(int(i), {}).update(extra)
        optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
        schedule.load_state_dict({**state["schedule"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        version, internal, gauss = state["py_rng"]
        rng.setstate((version, tuple(internal), gauss))
        return state["step"], state["order"], state["losses"]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def finetune(
    model, tokenizer, train: Sequence, val: Sequence, steps: int, batch_size: int, lr: float, seed: int,
    stats: Stats, progress: Callable[[int, float], None] | None = None,
    checkpoint: FinetuneCheckpoint | None = None,
) -> dict:
    """Train `model` in place on (input, edit, output) triplets; return train/val loss figures.

    With `checkpoint`, the state is saved every `checkpoint.every` steps and a saved state is resumed.
    """
    max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    examples = [_encode_example(tokenizer, t.input, t.edit, t.output, max_length) for t in train]
    val_examples = [_encode_example(tokenizer, t.input, t.edit, t.output, max_length) for t in val]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    )
    model.train()
    order: list[int] = []
    losses: list[float] = []
    start = 0
    resumed = checkpoint.restore(model, optimizer, schedule, rng) if checkpoint else None
    if resumed:
        start, order, losses = resumed
        stats.add("finetune_resumed_at", start)
    for step in range(start, steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        input_ids, attention, labels = (x.to(device) for x in _collate([examples[i] for i in idx], tokenizer.pad_token_id))
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if checkpoint and (step + 1) % checkpoint.every == 0 and step + 1 < steps:
            checkpoint.save(step + 1, model, optimizer, schedule, rng, order, losses)
        if progress:
            progress(step, losses[-1])
    model.eval()
    val_loss = None
    if val_examples:
        with torch.inference_mode():
            input_ids, attention, labels = (x.to(device) for x in _collate(val_examples, tokenizer.pad_token_id))
            val_loss = float(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss)
    stats.add("finetune_steps", steps)
    stats.add("finetune_examples", len(examples))
    first = sum(losses[:10]) / max(1, len(losses[:10])) if losses else None
    last = sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None
    every = -(-len(losses) // 200) if losses else 1  # at most 200 points: the report's loss curve
    curve = [{"step": min(i + every, len(losses)), "loss": round(sum(losses[i: i + every]) / len(losses[i: i + every]), 5)}
             for i in range(0, len(losses), every)]
    return {"train_loss_first10": first, "train_loss_last10": last, "val_loss": val_loss,
            "train_examples": len(examples), "val_examples": len(val_examples), "loss_curve": curve}


def apply_lora(model, t: TextConfig):
    """Wrap `model` with LoRA adapters (peft); the base weights are frozen, only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, task_type="CAUSAL_LM",
        target_modules=list(t.lora_targets) or None,
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",  # GPT-2 uses Conv1D layers
    )
    return get_peft_model(model, config)


def place(model, t: TextConfig):
    """Move the LM to ``text.device`` in ``text.dtype`` (float32 on CPU, where half precision is slow)."""
    device = torch_device(t.device, "text.device")
    return model.to(device=device, dtype=compute_dtype(device, t.dtype))


def load_finetuned(cfg: PipelineConfig, model_dir: Path):
    """Load what `finetune` saved (a whole model, or a LoRA adapter merged into its base) on ``text.device``."""
    if (model_dir / ADAPTER_CONFIG).exists():
        from peft import PeftModel
        from transformers import AutoTokenizer

        base, _ = load_lm(cfg.models.lm, cfg.models.lm_path)
        model = PeftModel.from_pretrained(place(base, cfg.text), str(model_dir)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer
    model, tokenizer = load_lm(cfg.models.lm, str(model_dir))
    return place(model, cfg.text).eval(), tokenizer


def batch_seed(seed: int, first_key: str, attempt: int = 1) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{attempt_key(first_key, attempt)}".encode()).digest()[:4], "little")


@torch.inference_mode()
def generate(
    model, tokenizer, captions: Sequence[str], *, temperature: float, top_p: float, frequency_penalty: float,
    max_new_tokens: int, seed: int, stop: str = STOP_SEQUENCE,
) -> list[str]:
    """Sample one completion per caption with the paper's settings; return the raw completions."""
    tokenizer.padding_side = "left"
    prompts = [finetune_prompt(c) for c in captions]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    room = max(1, (getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048))
               - enc.input_ids.shape[1])
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p,
        top_k=0,
        max_new_tokens=min(max_new_tokens, room),
        logits_processor=LogitsProcessorList([FrequencyPenaltyLogitsProcessor(frequency_penalty, enc.input_ids.shape[1])]),
        stop_strings=[stop],
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [t.split(stop)[0] for t in texts]


def generate_partition(
    cfg: PipelineConfig, captions: pd.DataFrame, checkpoint: Checkpoint, stats: Stats,
    load_model: Callable[[], tuple], partition_id: int, logger: logging.Logger,
) -> None:
    """Generate every batch of the partition not yet in `checkpoint`, one checkpoint chunk per batch.

    `load_model()` returns (model, tokenizer); it is called only when there is something to generate."""
    t = cfg.text
    done = checkpoint.done_keys()
    batches = [captions.iloc[i: i + t.batch_size] for i in range(0, len(captions), t.batch_size)]
    pending = [b for b in batches if not set(b["caption_id"]).issubset(done)]
    if len(pending) < len(batches):
        logger.info("text part-%05d: resuming, %d of %d batches already generated",
                    partition_id, len(batches) - len(pending), len(batches))
    if not pending:
        return
    model, tokenizer = load_model()
    model_name = f"{cfg.models.lm_path or cfg.models.lm}+{t.finetune_method}-finetune"
    for batch in tqdm(pending, desc=f"generate triplets p{partition_id}", unit="batch", leave=False):
        first = batch["caption_id"].iloc[0]
        rows: dict[str, dict] = {}
        todo = list(zip(batch["caption_id"], batch["text"]))
        for attempt in range(1, t.max_attempts + 1):
            # the captions of the batch still rejected, sampled together with this try's seed: which
            # ones they are follows from the earlier tries, so a re-generated batch is the same
            with stats.timer("generate"):
                raws = generate(model, tokenizer, [text for _, text in todo], temperature=t.temperature,
                                top_p=t.top_p, frequency_penalty=t.frequency_penalty,
                                max_new_tokens=t.max_new_tokens, seed=batch_seed(t.seed, first, attempt), stop=t.stop)
            for (cid, text), raw in zip(todo, raws):
                earlier = rejections_so_far(rows[cid]) if cid in rows else []
                rows[cid] = triplet_row(cid, text, raw, model_name, t.max_edit_words, attempt=attempt, earlier=earlier)
            todo = [(cid, text) for cid, text in todo if wants_retry(rows[cid], t.max_attempts)]
            if not todo:
                break
            stats.add("retried_captions", len(todo))
        ordered = [rows[cid] for cid in batch["caption_id"]]
        checkpoint.append(first, pd.DataFrame(ordered, columns=TRIPLET_COLUMNS))
        stats.add("batches_generated")
