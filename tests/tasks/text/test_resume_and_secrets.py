"""Kill-and-resume of online generation (a crash inside the run, and a SIGKILL of the process), and the
API key never leaving the process: not in logs, manifests, checkpoints or parquet."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from fakes.faults import stop_after_writes, wait_stopped, wait_until
from text_helpers import (
    API_KEY,
    KEY_ENV,
    checkpointed_ids,
    make_captions,
    openai_config,
    openai_overrides,
    write_captions,
)

from tasks.common import storage
from tasks.text.finetune import run as run_finetune
from tasks.text.stage import run as run_text_partition

MODEL = "ft:gpt-4o-mini-2024-07-18:fake-org:editforge:abc123"
ROOT = Path(__file__).resolve().parents[3]


class Crash(RuntimeError):
    pass


def _only(found):
    (path,) = list(found)  # one version of the text stage in these tests
    return path


def _triplets(root: Path) -> pd.DataFrame:
    return storage.read_parquet(str(_only(Path(root).glob("text/*/part-00000/triplets.parquet"))))


def _answers_since(fake, start: int) -> Counter:
    return Counter(r["caption"] for r in fake.state.requests[start:] if r["caption"] is not None and r["status"] == 200)


def _uninterrupted(fake, tmp_path: Path, captions: pd.DataFrame, *overrides: str) -> pd.DataFrame:
    root = tmp_path / "uninterrupted"
    write_captions(str(root), 0, captions)
    run_text_partition(openai_config(fake, root, *overrides), 0)
    return _triplets(root)


def test_crash_mid_run_then_resume_sends_no_answered_caption_again(fake, tmp_path):
    """Placed by counts: the fake answers 24 requests and holds the rest; the run crashes right after its 3rd
    checkpoint chunk of 8, so exactly the 24 answered captions are kept and none is lost."""
    fake.knobs.latency, fake.knobs.rate_429, fake.knobs.malformed_rate = (0.002, 0.02), 0.1, 0.2
    captions = make_captions(80)
    settings = (f"text.openai.model={MODEL}", "text.openai.concurrency=8", "text.openai.checkpoint_every=8",
                "text.openai.checkpoint_interval_s=3600")
    reference = _uninterrupted(fake, tmp_path, captions, *settings)

    root = tmp_path / "crashed"
    write_captions(str(root), 0, captions)
    cfg = openai_config(fake, root, *settings)

    def crash_after_three_chunks(n: int) -> None:
        if n == 3:
            raise Crash("simulated crash")

    start = len(fake.state.requests)
    fake.knobs.answer_limit = fake.state.passed_gate + 24
    with pytest.raises(Crash):
        run_text_partition(cfg, 0, on_chunk=crash_after_three_chunks)
    wait_until(lambda: fake.state.held == 0, "the fake to see the held requests abandoned")
    kept = checkpointed_ids(root)
    texts = dict(zip(captions["caption_id"], captions["text"]))
    assert len(kept) == 24 and set(_answers_since(fake, start)) == {texts[c] for c in kept}  # none lost

    fake.knobs.answer_limit = None
    resumed_from = len(fake.state.requests)
    manifest = run_text_partition(cfg, 0)
    again = _answers_since(fake, resumed_from)
    assert not set(again) & {texts[c] for c in kept}  # no answered caption is requested twice
    assert len(again) == 80 - len(kept) and max(again.values()) == 1
    pd.testing.assert_frame_equal(_triplets(root), reference)
    assert manifest["counts"]["in"] == 80 and manifest["counts"]["out"] + sum(manifest["rejected"].values()) == 80


KILLED_RUN = """
import json, sys
from tasks.common.config import load_config
from tasks.text.stage import run as run_text_partition
run_text_partition(load_config("demo", json.loads(sys.argv[1])), 0)
"""


def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_rows(fake, tmp_path):
    """A real SIGKILL placed by a count: the process stops itself right after its 2nd checkpoint chunk of 4
    (tests/fakes/faults.py) and is killed there."""
    fake.knobs.latency = (0.002, 0.02)
    captions = make_captions(64)
    settings = (f"text.openai.model={MODEL}", "text.openai.concurrency=4", "text.openai.checkpoint_every=4",
                "text.openai.checkpoint_interval_s=3600", "text.openai.moderation=false")
    reference = _uninterrupted(fake, tmp_path, captions, *settings)

    root = tmp_path / "killed"
    write_captions(str(root), 0, captions)
    openai_config(fake, root, *settings)  # its (no-job) fine-tune finished, as the text stage needs
    start = len(fake.state.requests)
    args = stop_after_writes(2, "*/text/*/_progress/*/chunk-*.parquet", "-c", KILLED_RUN,
                             json.dumps(openai_overrides(fake, root, *settings)))
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    try:
        wait_stopped(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kept = checkpointed_ids(root)
    texts = dict(zip(captions["caption_id"], captions["text"]))
    lost = set(_answers_since(fake, start)) - {texts[c] for c in kept}
    assert len(kept) == 8 and len(lost) <= 4 + 3  # in flight + one unflushed chunk at most

    resumed_from = len(fake.state.requests)
    run_text_partition(openai_config(fake, root, *settings), 0)
    again = _answers_since(fake, resumed_from)
    assert not set(again) & {texts[c] for c in kept} and max(again.values()) == 1
    pd.testing.assert_frame_equal(_triplets(root), reference)


def test_the_api_key_never_appears_in_logs_manifests_or_files(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and the HTTP client's included
    fake.knobs.rate_429, fake.knobs.rate_500 = 0.2, 0.1
    write_captions(str(tmp_path), 0, make_captions(20, ["a REFUSED scene by the lake"]))
    write_captions(str(tmp_path), 1, make_captions(10))
    cfg = openai_config(fake, tmp_path)
    manifests = [run_finetune(cfg), run_text_partition(cfg, 0),
                 run_text_partition(openai_config(fake, tmp_path, "text.openai.mode=batch"), 1)]
    assert manifests[1]["counts"]["requests_answered"] == 20  # the fake checks the key: it was sent
    assert manifests[2]["counts"]["batch_answered"] == 10
    blobs = {"log": caplog.text, "manifests": json.dumps(manifests), "config": cfg.model_dump_json()}
    blobs |= {str(p): p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()}
    assert any(name.endswith("triplets.parquet") for name in blobs) and any("_SUCCESS" in n for n in blobs)
    for name, text in blobs.items():
        assert API_KEY not in text and API_KEY[-10:] not in text, f"API key found in {name}"


RETRIES = (f"text.openai.model={MODEL}", "text.max_attempts=4", "text.openai.checkpoint_every=4",
           "text.openai.concurrency=4")


def _triplet_bytes(root: Path, manifest: dict) -> bytes:
    return (root / manifest["path"] / "triplets.parquet").read_bytes()


def test_with_retries_a_crash_then_resume_writes_the_uninterrupted_bytes(fake, tmp_path):
    """Placed by counts: the fake answers 60 requests (at least 12 captions finished: 4 in progress hold at
    most 3 answers each) and holds the rest; the run crashes right after its 3rd chunk of 4."""
    fake.knobs.malformed_rate, fake.knobs.flag_words = 0.6, ("FLAGGED", "fireworks")
    fake.knobs.latency = (0.002, 0.02)
    captions = make_captions(48)
    settings = (*RETRIES, "text.openai.checkpoint_interval_s=3600")
    clean = tmp_path / "uninterrupted"
    write_captions(str(clean), 0, captions)
    reference = run_text_partition(openai_config(fake, clean, *settings), 0)
    assert reference["counts"]["accepted_attempt_2"] > 0 and reference["counts"]["generation_attempts"] > 60

    root = tmp_path / "crashed"
    write_captions(str(root), 0, captions)
    cfg = openai_config(fake, root, *settings)

    def crash(n: int) -> None:
        if n == 3:
            raise Crash("simulated crash")

    fake.knobs.answer_limit = fake.state.passed_gate + 60
    with pytest.raises(Crash):
        run_text_partition(cfg, 0, on_chunk=crash)
    wait_until(lambda: fake.state.held == 0, "the fake to see the held requests abandoned")
    kept = checkpointed_ids(root)  # checkpoints hold finished captions only, each with every try it took
    assert 12 <= len(kept) <= 12 + 3 < 48  # the three chunks, and what was buffered when the crash came
    texts = dict(zip(captions["caption_id"], captions["text"]))
    fake.knobs.answer_limit = None
    resumed_from = len(fake.state.requests)
    manifest = run_text_partition(cfg, 0)
    assert not set(_answers_since(fake, resumed_from)) & {texts[c] for c in kept}
    assert _triplet_bytes(root, manifest) == _triplet_bytes(clean, reference)
    assert manifest["counts"]["generation_attempts"] == reference["counts"]["generation_attempts"]
    assert manifest["rejected"] == reference["rejected"]


def test_with_retries_a_batch_run_killed_in_its_second_try_resumes_both_jobs(fake, tmp_path):
    fake.knobs.malformed_rate = 0.6
    captions = make_captions(40)
    settings = (*RETRIES, "text.openai.mode=batch", "text.openai.moderation=false")
    clean = tmp_path / "uninterrupted"
    write_captions(str(clean), 0, captions)
    reference = run_text_partition(openai_config(fake, clean, *settings), 0)
    jobs = fake.state.count("/v1/batches")
    assert jobs == reference["counts"]["batch_jobs_created"] >= 3  # one job per try

    root = tmp_path / "killed"
    write_captions(str(root), 0, captions)
    cfg = openai_config(fake, root, *settings)
    start_jobs = fake.state.count("/v1/batches")

    def crash_in_second_try(n: int) -> None:
        if fake.state.count("/v1/batches") - start_jobs == 2:
            raise Crash("killed while writing the second try's answers")

    with pytest.raises(Crash):
        run_text_partition(cfg, 0, on_chunk=crash_in_second_try)
    progress = list(root.rglob("openai-batch*.json"))
    assert sorted(p.name for p in progress) == ["openai-batch-attempt-2.json", "openai-batch.json"]
    manifest = run_text_partition(cfg, 0)
    assert manifest["counts"]["batch_jobs_resumed"] == 2  # the first two tries' jobs read again, not paid again
    assert fake.state.count("/v1/batches") - start_jobs == jobs
    assert _triplet_bytes(root, manifest) == _triplet_bytes(clean, reference)
    assert not list(root.rglob("openai-batch*.json"))
