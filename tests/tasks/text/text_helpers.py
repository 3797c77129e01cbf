"""Helpers for the text stage tests: caption partitions and configs pointed at the OpenAI fake."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `fakes`

from fakes.openai_server import FakeOpenAIServer

from tasks.captions.laion import caption_id
from tasks.common import storage
from tasks.common.config import PipelineConfig, load_config
from tasks.common.layout import partition_dir
from tasks.registry import stage_hash

API_KEY = "sk-editforge-test-DO-NOT-LEAK-4f9c2a"
KEY_ENV = "EDITFORGE_TEST_OPENAI_KEY"
SUBJECTS = [
    "a red barn",
    "a lighthouse",
    "an old bicycle",
    "a mountain lake",
    "a city street",
    "a teapot",
    "a sailing boat",
    "a cat on a sofa",
    "a forest path",
    "a desert road",
    "a snowy cabin",
    "a bridge",
]
PLACES = [
    "at dawn",
    "in the rain",
    "by the sea",
    "in a field",
    "under a tree",
    "on a table",
    "in autumn",
    "in a museum",
    "at noon",
    "in the fog",
    "near a river",
    "on a hill",
    "in spring",
    "at sunset",
]


def make_captions(n: int, extra: list[str] | None = None) -> pd.DataFrame:
    texts = [
        f"{SUBJECTS[i % len(SUBJECTS)]} {PLACES[(i // len(SUBJECTS)) % len(PLACES)]}, photo {i}"
        for i in range(n)
    ]
    texts += extra or []
    return pd.DataFrame({"caption_id": [caption_id(t) for t in texts], "text": texts})


def write_captions(root: str, partition_id: int, df: pd.DataFrame, preset: str = "demo") -> None:
    """A finished captions partition (data + `_SUCCESS.json` under the preset's captions hash)."""
    from tasks.common.config import load_config

    expected = stage_hash(load_config(preset), "captions")
    folder = partition_dir(root, "captions", expected, partition_id)
    storage.write_parquet_atomic(storage.url_join(folder, "captions.parquet"), df)
    storage.write_json_atomic(storage.url_join(folder, "_SUCCESS.json"), {"config_hash": expected})


def openai_overrides(fake: FakeOpenAIServer, root: Path | str, *overrides: str) -> list[str]:
    """Overrides of the demo preset for the openai backend pointed at the fake, with fast polling and retries."""
    return [
        f"output_root={root}",
        "text.backend=openai",
        f"text.openai.base_url={fake.base_url}",
        f"text.openai.api_key_env={KEY_ENV}",
        "text.openai.poll_interval_s=0.01",
        "text.openai.backoff_initial_s=0.005",
        "text.openai.backoff_max_s=0.05",
        "text.openai.max_retries=30",
        "text.openai.checkpoint_interval_s=0.2",
        "text.openai.request_timeout_s=20",
        *overrides,
    ]


def openai_config(fake: FakeOpenAIServer, root: Path | str, *overrides: str) -> PipelineConfig:
    """The config; with `text.openai.model` given (a model used as is, no fine-tuning job) its finetune
    partition — which the text stage reads — is finished too, as `editforge run` would (no request)."""
    cfg = load_config("demo", openai_overrides(fake, root, *overrides))
    if cfg.text.openai.model:
        from tasks.finetune.stage import run as run_finetune

        run_finetune(cfg)
    return cfg


def checkpointed_ids(root: Path, partition_id: int = 0) -> set[str]:
    """Caption ids in the text partition's checkpoint chunks (what a crashed run kept)."""
    chunks = sorted(Path(root).glob(f"text/*/part-{partition_id:05d}/_progress/*/chunk-*.parquet"))
    return {cid for c in chunks for cid in storage.read_parquet(str(c))["caption_id"]}
