"""The OpenAI-compatible API as EditForge's clients use it (the text backend, the VLM judge): client, API
key, retries, polling, chat/completion requests with their token usage.

Any OpenAI-compatible server works through ``base_url`` (OpenAI, vLLM, TGI, a proxy). Retries are ours
(exponential backoff with jitter, ``Retry-After`` honoured, counted by reason); 401/403/404 stop the stage
(:class:`PermanentAPIError`). The key comes from ``api_key_env`` or a Prefect Secret block and is never
logged or written.

Which errors are retried, polling and the key in full: docs/text.md ("In the code").
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import openai

from tasks.common.config import OpenAIClientConfig
from tasks.common.contract import Stats
from tasks.common.errors import PermanentError

T = TypeVar("T")
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class MissingAPIKeyError(PermanentError, RuntimeError):
    """No API key was found where the config says to look (the message names the place, not a key)."""


class PermanentAPIError(PermanentError, RuntimeError):
    """The server refuses every request (wrong key, no permission, wrong URL or model): stop the stage."""


def fix_hints(section: str = "text.openai") -> dict[int, str]:
    """What to fix after a 401/403/404, naming the settings of ``section``."""
    model = f"{section}.model" + (" / the fine-tuned model id" if section == "text.openai" else "")
    return {
        401: f"the API key was refused: check the variable {section}.api_key_env names (or the Prefect Secret "
        f"block in {section}.api_key_secret)",
        403: f"the key has no access to this model or endpoint: check the account's permissions or {section}.model",
        404: f"no such endpoint or model on this server: check {section}.base_url (it usually ends in /v1) and "
        f"{model}",
    }


FIX_HINTS = fix_hints()


class DeadlineExceeded(openai.APITimeoutError):
    """A request took longer than ``request_timeout_s`` in all (a server trickling its answer)."""


class MalformedResponse(openai.APIError):
    """The server's answer was not valid JSON (cut short)."""


def resolve_api_key(cfg: OpenAIClientConfig) -> str:
    """The API key from a Prefect Secret block or the environment (never logged)."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(cfg.api_key_secret).get()
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise MissingAPIKeyError(
            f"{cfg.OWNER}: environment variable {cfg.api_key_env} is not set. Set it, point "
            f"{cfg.SECTION}.api_key_env at another variable, or name a Prefect Secret block in "
            f"{cfg.SECTION}.api_key_secret (a local server without authentication takes any value, e.g. EMPTY)."
        )
    return key


def make_client(cfg: OpenAIClientConfig, api_key: str) -> openai.AsyncOpenAI:
    """An async client with the SDK's own retries off (the retry loop below does them)."""
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=cfg.base_url, max_retries=0, timeout=cfg.request_timeout_s
    )


def redacted_endpoint(cfg: OpenAIClientConfig) -> str:
    """Where requests go, for manifests and logs (a base URL never holds the key; userinfo is dropped)."""
    url = cfg.base_url or "https://api.openai.com/v1"
    if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        scheme, rest = url.split("//", 1)
        url = f"{scheme}//{rest.split('@', 1)[1]}"
    return url


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits U(0.5, 1) x min(max_s, initial_s x 2^k);
    a server's Retry-After replaces that wait (plus up to 25 % jitter, so a storm does not return at once).
    ``section`` / ``label`` name the client in the error that stops a stage."""

    max_retries: int = 8
    initial_s: float = 1.0
    max_s: float = 60.0
    section: str = field(default="text.openai", compare=False)
    label: str = field(default="text", compare=False)

    @classmethod
    def from_config(cls, cfg: OpenAIClientConfig) -> RetryPolicy:
        return cls(cfg.max_retries, cfg.backoff_initial_s, cfg.backoff_max_s, cfg.SECTION, cfg.LABEL)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None and retry_after >= 0:
            return retry_after * (1.0 + 0.25 * rng.random())
        cap = min(self.max_s, self.initial_s * 2.0**attempt)
        return cap * (0.5 + 0.5 * rng.random())


def retry_reason(err: BaseException) -> str | None:
    """Why a failed request is worth retrying ('429', '5xx', 'timeout', ...), or None when it is not."""
    if isinstance(err, DeadlineExceeded):
        return "deadline"
    if isinstance(err, MalformedResponse):
        return "malformed"
    if isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection"
    if isinstance(err, openai.APIStatusError):
        code = err.status_code
        if code == 429:
            return "429"
        if code >= 500:
            return "5xx"
        if code in (408, 409):
            return str(code)
    return None


def retry_after_seconds(err: BaseException) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` as seconds or HTTP date)."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return max(0.0, email.utils.mktime_tz(parsed) - time.time()) if parsed else None


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    rng: random.Random,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Await `call()` until it succeeds; retry retryable errors up to `policy.max_retries` times."""
    attempt = 0
    while True:
        try:
            return await call()
        except openai.APIError as err:
            reason = retry_reason(err)
            hints = fix_hints(policy.section)
            if isinstance(err, openai.APIStatusError) and err.status_code in hints:
                raise PermanentAPIError(
                    f"{policy.label}: {err.request.url} answered HTTP {err.status_code} "
                    f"({(err.message or '')[:160]}): {hints[err.status_code]}"
                ) from None
            if reason is None or attempt >= policy.max_retries:
                raise
            if on_retry:
                on_retry(reason)
            await asyncio.sleep(policy.delay(attempt, retry_after_seconds(err), rng))
            attempt += 1


def retrying(
    policy: RetryPolicy,
    rng: random.Random,
    stats: Stats,
) -> Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]:
    """`call_with_retries` bound to one policy and RNG, counting each retry as `retries_<reason>` in `stats`."""

    def retried(call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return call_with_retries(call, policy, rng, lambda reason: stats.add(f"retries_{reason}"))

    return retried


class HasStatus(Protocol):
    """A polled job as the SDK returns it (batch, fine-tuning job): it has a status."""

    status: str


Job = TypeVar("Job", bound=HasStatus)


async def poll_until(
    fetch: Callable[[], Awaitable[Job]],
    is_done: Callable[[Job], bool],
    on_update: Callable[[Job], Awaitable[None]],
    interval_s: float,
    timeout_s: float,
    what: str,
    first: Job | None = None,
) -> Job:
    """Poll a long-running job until `is_done(job)`; return its last state.

    Each state (`first` when given, else a `fetch()`) is passed to `on_update` (progress logging) before
    it is checked; between fetches the poller sleeps `interval_s`. After `timeout_s` it raises
    `TimeoutError` naming the job (`what`, e.g. "batch job batch_123") and its status: the job keeps
    running on the server and its id is recorded by the caller, so a re-run resumes polling it.
    """
    start = time.monotonic()
    job = first if first is not None else await fetch()
    while True:
        await on_update(job)
        if is_done(job):
            return job
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"{what} still {job.status} after {timeout_s:.0f}s; "
                f"re-run to keep polling it (its id is recorded)"
            )
        await asyncio.sleep(interval_s)
        job = await fetch()


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(make_coro())
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = err

    thread = threading.Thread(target=target, name="editforge-openai")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclass(frozen=True)
class Completion:
    """A generated text, why generation stopped (``stop``, ``length``, ``content_filter``, ...) and the
    tokens it took (``prompt_tokens``, ``completion_tokens``: 0 when the server reports none)."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def completion_of(endpoint: str, response: dict[str, Any]) -> Completion:
    """The generated text, finish reason and token usage of a (chat) completion response body."""
    usage = response.get("usage") or {}
    tokens = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    choices = response.get("choices") or []
    if not choices:
        return Completion(None, **tokens)
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if endpoint == "chat" else choice.get("text")
    return Completion(text, choice.get("finish_reason"), **tokens)


async def create_completion(
    client: openai.AsyncOpenAI, endpoint: str, body: dict[str, Any], deadline_s: float
) -> Completion:
    """One generation request, abandoned (:class:`DeadlineExceeded`) after ``deadline_s`` in all."""
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    try:
        response = await asyncio.wait_for(create(**body), deadline_s)
    except TimeoutError:
        raise DeadlineExceeded(
            request=httpx.Request("POST", f"{client.base_url}{ENDPOINT_PATHS[endpoint][4:]}")
        ) from None
    except json.JSONDecodeError as err:
        raise MalformedResponse(
            f"the answer was not valid JSON ({err})",
            httpx.Request("POST", f"{client.base_url}{ENDPOINT_PATHS[endpoint][4:]}"),
            body=None,
        ) from None
    return completion_of(endpoint, response.model_dump())
