"""Fixtures for the judge ladder: the OpenAI-compatible fake (vision chat) served on 127.0.0.1 by the session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # judge_helpers (beside this file) and tests/ (for `fakes`)

from fakes.openai_server import FakeOpenAIServer, Knobs
from judge_helpers import API_KEY, KEY_ENV


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(Knobs(api_key=API_KEY)) as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAIServer:
    """The fake with default knobs (API key required), an empty log, and the key in the environment."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return fake_server.fresh(API_KEY)
