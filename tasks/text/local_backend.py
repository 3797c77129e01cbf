r"""Local LLM backend (transformers): generate triplets with the fine-tuned LM (:mod:`tasks.finetune.local`).

Generation with the paper's format and sampling settings (temperature 0.7, top_p 1.0, frequency penalty 0.1,
stop at ``\nEND``), seeded per batch with fixed boundaries so a resumed run regenerates exactly what an
uninterrupted one would; a ``lora`` fine-tune is merged into the base model. Serving instead: vLLM or any
OpenAI-compatible server with ``text.backend=openai``.

The format, LoRA, seeding and retries in full: docs/text.md ("In the code").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from prompts.templates import STOP_SEQUENCE, finetune_prompt
from tasks.common.config import PipelineConfig
from tasks.common.contract import Checkpoint, Stats
from tasks.text.format import TRIPLET_COLUMNS, attempt_key, rejections_so_far, triplet_row, wants_retry


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style frequency penalty over the generated tokens (not the prompt)."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


def batch_seed(seed: int, first_key: str, attempt: int = 1) -> int:
    return int.from_bytes(
        hashlib.sha256(f"{seed}:{attempt_key(first_key, attempt)}".encode()).digest()[:4], "little"
    )


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    captions: Sequence[str],
    *,
    temperature: float,
    top_p: float,
    frequency_penalty: float,
    max_new_tokens: int,
    seed: int,
    stop: str = STOP_SEQUENCE,
) -> list[str]:
    """Sample one completion per caption with the paper's settings; return the raw completions."""
    tokenizer.padding_side = "left"
    prompts = [finetune_prompt(c) for c in captions]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    room = max(
        1,
        (getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048))
        - enc.input_ids.shape[1],
    )
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p,
        top_k=0,
        max_new_tokens=min(max_new_tokens, room),
        logits_processor=LogitsProcessorList(
            [FrequencyPenaltyLogitsProcessor(frequency_penalty, enc.input_ids.shape[1])]
        ),
        stop_strings=[stop],
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return [t.split(stop)[0] for t in texts]


def generate_partition(
    cfg: PipelineConfig,
    captions: pd.DataFrame,
    checkpoint: Checkpoint,
    stats: Stats,
    load_model: Callable[[], tuple],
    partition_id: int,
    logger: logging.Logger,
) -> None:
    """Generate every batch of the partition not yet in `checkpoint`, one checkpoint chunk per batch.

    `load_model()` returns (model, tokenizer); it is called only when there is something to generate."""
    t = cfg.text
    done = checkpoint.done_keys()
    batches = [captions.iloc[i : i + t.batch_size] for i in range(0, len(captions), t.batch_size)]
    pending = [b for b in batches if not set(b["caption_id"]).issubset(done)]
    if len(pending) < len(batches):
        logger.info(
            "text part-%05d: resuming, %d of %d batches already generated",
            partition_id,
            len(batches) - len(pending),
            len(batches),
        )
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
                raws = generate(
                    model,
                    tokenizer,
                    [text for _, text in todo],
                    temperature=t.temperature,
                    top_p=t.top_p,
                    frequency_penalty=t.frequency_penalty,
                    max_new_tokens=t.max_new_tokens,
                    seed=batch_seed(t.seed, first, attempt),
                    stop=t.stop,
                )
            for (cid, text), raw in zip(todo, raws):
                earlier = rejections_so_far(rows[cid]) if cid in rows else []
                rows[cid] = triplet_row(
                    cid, text, raw, model_name, t.max_edit_words, attempt=attempt, earlier=earlier
                )
            todo = [(cid, text) for cid, text in todo if wants_retry(rows[cid], t.max_attempts)]
            if not todo:
                break
            stats.add("retried_captions", len(todo))
        ordered = [rows[cid] for cid in batch["caption_id"]]
        checkpoint.append(first, pd.DataFrame(ordered, columns=TRIPLET_COLUMNS))
        stats.add("batches_generated")
