"""Fine-tune files from the seed triplets, in the paper's completion format and in the chat format.

The paper fine-tuned GPT-3 davinci on ~700 hand-written triplets with prompt `"{input}\\n##\\n"` and
completion `"{edit}\\n%%\\n{output}\\nEND"`. The davinci fine-tune endpoint is gone; today's
fine-tuning APIs (and most open instruct models) take chat messages instead. Both files are written
from the same templates in `prompts/`, with the same held-out validation split:

    train.completion.jsonl  val.completion.jsonl   {"prompt": ..., "completion": ...}
    train.chat.jsonl        val.chat.jsonl         {"messages": [system, user, assistant]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from prompts.templates import chat_example, completion_example
from seed_annotations.schema import Triplet

Format = Literal["completion", "chat"]
FORMATS: dict[str, Callable[[str, str, str], dict[str, Any]]] = {
    "completion": completion_example,
    "chat": chat_example,
}


def finetune_file_name(split: Literal["train", "val"], fmt: Format) -> str:
    return f"{split}.{fmt}.jsonl"


def finetune_jsonl(triplets: Sequence[Triplet], fmt: Format) -> bytes:
    """JSON Lines of fine-tune examples in format `fmt` (one example per triplet, input order kept)."""
    make = FORMATS[fmt]
    lines = [json.dumps(make(t.input, t.edit, t.output), ensure_ascii=False) for t in triplets]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def finetune_files(train: Sequence[Triplet], val: Sequence[Triplet]) -> dict[str, bytes]:
    """All four fine-tune files by name (train/val x completion/chat)."""
    files = {}
    for fmt in FORMATS:
        files[finetune_file_name("train", fmt)] = finetune_jsonl(train, fmt)  # type: ignore[arg-type]
        files[finetune_file_name("val", fmt)] = finetune_jsonl(val, fmt)  # type: ignore[arg-type]
    return files
