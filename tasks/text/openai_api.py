"""The OpenAI-compatible API as the text stage uses it: the shared client machinery, request bodies, moderation.

The client, API key, retries (429/5xx/timeouts/deadline/malformed JSON with backoff, jitter and
`Retry-After`), polling and `run_sync` are shared with the VLM judge (:mod:`tasks.common.openai_client`)
and re-exported here; what is the text stage's own is below: the per-caption seed, the generation request
body (the paper's sampling settings, completion or chat format) and moderation.

Any server that speaks the OpenAI HTTP API works through `text.openai.base_url`: the OpenAI API itself,
or an open model served by vLLM (`vllm serve Qwen/Qwen2.5-1.5B-Instruct --enable-lora ...`, then
`text.openai.base_url=http://host:8000/v1`, `text.openai.model=<served name>`), TGI, or a proxy.
The API key is read from the environment variable named by `text.openai.api_key_env` or from a
Prefect Secret block (`text.openai.api_key_secret`); it is handed to the SDK only, never logged and
never written anywhere.
"""

from __future__ import annotations

import hashlib
from typing import Any

import openai

from prompts.templates import chat_messages, finetune_prompt
from tasks.common.config import TextConfig
from tasks.common.errors import PermanentError
from tasks.common.openai_client import (  # noqa: F401  (re-exported: the text stage's API surface)
    ENDPOINT_PATHS,
    FIX_HINTS,
    Completion,
    DeadlineExceeded,
    HasStatus,
    Job,
    MalformedResponse,
    MissingAPIKeyError,
    PermanentAPIError,
    RetryPolicy,
    call_with_retries,
    completion_of,
    create_completion,
    make_client,
    poll_until,
    redacted_endpoint,
    resolve_api_key,
    retry_after_seconds,
    retry_reason,
    retrying,
    run_sync,
)
from tasks.text.format import attempt_key


class ModerationUnavailableError(PermanentError, RuntimeError):
    """Moderation is on but the server has no moderation endpoint."""


def caption_seed(seed: int, caption_id: str, attempt: int = 1) -> int:
    """The per-caption (and per-try) sampling seed sent with every request, so a resumed run asks the
    same question; the first try's is the caption's own, a retry's that of `attempt_key`."""
    key = attempt_key(caption_id, attempt)
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def request_body(
    t: TextConfig, model: str, caption_id: str, caption: str, attempt: int = 1
) -> dict[str, Any]:
    """The generation request for one caption's try `attempt`, with the paper's sampling settings.

    The prompt comes from the same templates as the fine-tune files (completion or chat format).
    """
    body: dict[str, Any] = {
        "model": model,
        "temperature": t.temperature,
        "top_p": t.top_p,
        "frequency_penalty": t.frequency_penalty,
        "stop": [t.stop],
        "seed": caption_seed(t.seed, caption_id, attempt),
    }
    if t.openai.endpoint == "chat":
        return body | {"messages": chat_messages(caption), "max_completion_tokens": t.max_new_tokens}
    return body | {"prompt": finetune_prompt(caption), "max_tokens": t.max_new_tokens}


async def moderate(client: openai.AsyncOpenAI, model: str, texts: list[str]) -> list[bool]:
    """Whether the moderation endpoint flags each text (one request for the whole list)."""
    try:
        response = await client.moderations.create(model=model, input=texts)
    except openai.NotFoundError as err:
        raise ModerationUnavailableError(
            f"the server at {client.base_url} has no moderation endpoint ({err.status_code}); servers such as "
            f"vLLM do not implement /v1/moderations: set text.openai.moderation=false"
        ) from err
    flags = [bool(r.flagged) for r in response.results]
    if len(flags) != len(texts):
        raise RuntimeError(f"moderation endpoint returned {len(flags)} results for {len(texts)} inputs")
    return flags
