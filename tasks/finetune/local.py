"""Fine-tuning a causal LM in-process (transformers): the paper's format, full or LoRA, checkpointed.

The paper's format — prompt `"{input}\\n##\\n"`, completion `"{edit}\\n%%\\n{output}\\nEND"` — with the loss on
completion tokens only. ``full`` trains every weight (the tiny CPU default); ``lora`` (peft: rank ``lora_r``,
scale ``lora_alpha``, on ``lora_targets`` or peft's default modules) trains and saves only the adapter, merged
into the base model when the text stage loads it (:func:`load_finetuned`). Generation is
:mod:`tasks.text.local_backend`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prompts.templates import finetune_completion, finetune_prompt
from tasks.common import storage
from tasks.common.config import PipelineConfig, TextConfig
from tasks.common.contract import Stats
from tasks.common.devices import compute_dtype, torch_device
from tasks.common.models import load_lm

ADAPTER_CONFIG = "adapter_config.json"


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

    def save(
        self, step: int, model, optimizer, schedule, rng: random.Random, order: list[int], losses: list[float]
    ) -> None:
        from safetensors.torch import save

        tensors = {
            f"model.{n}": p.detach().cpu().contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
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
        state = {
            "step": step,
            "order": order,
            "losses": losses,
            "py_rng": _jsonable(rng.getstate()),
            "optim_scalars": scalars,
            "param_groups": optimizer.state_dict()["param_groups"],
            "schedule": {k: v for k, v in schedule.state_dict().items() if k != "lr_lambdas"},
            "tensors": self._tensors_url(step).rsplit("/", 1)[-1],
        }
        previous = (
            json.loads(storage.read_bytes(self.state_url))["tensors"]
            if storage.exists(self.state_url)
            else None
        )
        # the tensors first, then the state that names them: a kill in between leaves the previous pair whole
        storage.write_bytes_atomic(self._tensors_url(step), save(tensors))
        storage.write_bytes_atomic(self.state_url, json.dumps(state).encode())
        if previous and previous != state["tensors"]:
            storage.remove(storage.url_join(self.folder, previous))

    def restore(
        self, model, optimizer, schedule, rng: random.Random
    ) -> tuple[int, list[int], list[float]] | None:
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
    model,
    tokenizer,
    train: Sequence,
    val: Sequence,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    stats: Stats,
    progress: Callable[[int, float], None] | None = None,
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
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))),
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
        input_ids, attention, labels = (
            x.to(device) for x in _collate([examples[i] for i in idx], tokenizer.pad_token_id)
        )
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
            input_ids, attention, labels = (
                x.to(device) for x in _collate(val_examples, tokenizer.pad_token_id)
            )
            val_loss = float(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss)
    stats.add("finetune_steps", steps)
    stats.add("finetune_examples", len(examples))
    first = sum(losses[:10]) / max(1, len(losses[:10])) if losses else None
    last = sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None
    every = -(-len(losses) // 200) if losses else 1  # at most 200 points: the report's loss curve
    curve = [
        {
            "step": min(i + every, len(losses)),
            "loss": round(sum(losses[i : i + every]) / len(losses[i : i + every]), 5),
        }
        for i in range(0, len(losses), every)
    ]
    return {
        "train_loss_first10": first,
        "train_loss_last10": last,
        "val_loss": val_loss,
        "train_examples": len(examples),
        "val_examples": len(val_examples),
        "loss_curve": curve,
    }


def apply_lora(model, t: TextConfig):
    """Wrap `model` with LoRA adapters (peft); the base weights are frozen, only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        task_type="CAUSAL_LM",
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
