import asyncio
import random

import httpx2
import openai
import pytest

from tasks.common.config import OpenAITextConfig
from tasks.text.openai_api import (
    MissingAPIKeyError,
    RetryPolicy,
    call_with_retries,
    redacted_endpoint,
    resolve_api_key,
    retry_after_seconds,
    retry_reason,
    run_sync,
)


def _status_error(code: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/completions")
    response = httpx2.Response(code, headers=headers or {}, request=request)
    cls = {429: openai.RateLimitError, 500: openai.InternalServerError, 400: openai.BadRequestError}[code]
    return cls("boom", response=response, body=None)


def test_backoff_is_exponential_with_jitter_and_capped():
    policy, rng = RetryPolicy(max_retries=5, initial_s=1.0, max_s=8.0), random.Random(0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert cap * 0.5 <= min(delays) and max(delays) <= cap and len(set(delays)) > 100


def test_retry_after_is_honoured():
    policy, rng = RetryPolicy(initial_s=0.001), random.Random(0)
    assert all(3.0 <= policy.delay(0, 3.0, rng) <= 3.75 for _ in range(50))
    assert retry_after_seconds(_status_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after_seconds(_status_error(429, {"retry-after-ms": "250", "retry-after": "7"})) == 0.25
    assert retry_after_seconds(_status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after_seconds(_status_error(500)) is None


def test_which_errors_are_retried():
    assert retry_reason(_status_error(429)) == "429"
    assert retry_reason(_status_error(500)) == "5xx"
    assert retry_reason(_status_error(400)) is None
    assert retry_reason(openai.APITimeoutError(httpx2.Request("GET", "http://x"))) == "timeout"


def test_call_with_retries_counts_and_gives_up():
    errors = [_status_error(429, {"retry-after": "0"}), _status_error(500)]
    seen: list[str] = []

    async def flaky():
        if errors:
            raise errors.pop(0)
        return "ok"

    policy = RetryPolicy(max_retries=3, initial_s=0.001, max_s=0.001)
    assert asyncio.run(call_with_retries(flaky, policy, random.Random(0), seen.append)) == "ok"
    assert seen == ["429", "5xx"]

    async def always_500():
        raise _status_error(500)

    with pytest.raises(openai.InternalServerError):
        asyncio.run(
            call_with_retries(always_500, RetryPolicy(2, 0.001, 0.001), random.Random(0), seen.append)
        )
    assert seen.count("5xx") == 3

    async def bad_request():
        raise _status_error(400)

    with pytest.raises(openai.BadRequestError):
        asyncio.run(call_with_retries(bad_request, policy, random.Random(0), seen.append))
    assert len(seen) == 4  # a 400 is not retried


def test_missing_key_names_the_variable_not_a_value(monkeypatch):
    monkeypatch.delenv("EDITFORGE_NO_SUCH_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="EDITFORGE_NO_SUCH_KEY"):
        resolve_api_key(OpenAITextConfig(api_key_env="EDITFORGE_NO_SUCH_KEY"))
    monkeypatch.setenv("EDITFORGE_NO_SUCH_KEY", "sk-x")
    assert resolve_api_key(OpenAITextConfig(api_key_env="EDITFORGE_NO_SUCH_KEY")) == "sk-x"
    assert (
        redacted_endpoint(OpenAITextConfig(base_url="https://user:pw@host:8000/v1")) == "https://host:8000/v1"
    )


def test_run_sync_works_inside_a_running_loop():
    async def value():
        return 42

    async def outer():
        return run_sync(value)

    assert run_sync(value) == 42
    assert asyncio.run(outer()) == 42


def test_key_from_a_prefect_secret_block(monkeypatch):
    from types import SimpleNamespace

    from prefect.blocks.system import Secret

    loaded: list[str] = []

    def load(name: str, *args, **kwargs):
        loaded.append(name)
        return SimpleNamespace(get=lambda: "sk-from-block")

    monkeypatch.setattr(Secret, "load", staticmethod(load))
    assert resolve_api_key(OpenAITextConfig(api_key_secret="editforge-openai")) == "sk-from-block"
    assert loaded == ["editforge-openai"]
