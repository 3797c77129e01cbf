"""The fine-tuning job life cycle against the fake: success, failure surfaced, resume without a second job."""

import json

import pytest
from text_helpers import openai_config

from tasks.common import storage
from tasks.common.contract import read_success
from tasks.common.layout import OPENAI_MODEL_FILE
from tasks.finetune.openai_job import FineTuneJobError
from tasks.finetune.stage import finetuned_model_id
from tasks.finetune.stage import run as run_finetune
from tasks.registry import partition_url


def test_job_runs_queued_running_succeeded_and_is_recorded(fake, tmp_path, caplog):
    fake.knobs.job_polls_per_status = 2
    cfg = openai_config(fake, tmp_path, "text.openai.finetune_epochs=3")
    caplog.set_level("INFO", logger="editforge")
    manifest = run_finetune(cfg)
    ft = manifest["figures"]["finetune"]
    assert ft["model"].startswith("ft:gpt-4o-mini-2024-07-18:") and ft["status"] == "succeeded"
    assert ft["job_id"].startswith("ftjob-") and ft["trained_tokens"] and not ft["resumed"]
    assert ft["train_examples"] > ft["val_examples"] > 0
    assert finetuned_model_id(cfg) == ft["model"]
    done = read_success(partition_url(cfg, "finetune"))
    assert done["figures"]["finetune"]["job_id"] == ft["job_id"]
    assert (
        json.loads(storage.read_bytes(str(tmp_path / manifest["path"] / OPENAI_MODEL_FILE)))["model"]
        == ft["model"]
    )
    statuses = [line for line in caplog.messages if line.startswith(f"fine-tune: job {ft['job_id']} ")]
    assert [s.split()[3] for s in statuses if "trained tokens" in s] == [
        "validating_files",
        "queued",
        "running",
        "succeeded",
    ]
    assert any("training loss" in m for m in caplog.messages)  # job events are shown as progress
    # the uploaded training file is the chat-format file with the held-out split
    uploads = [f for f in fake.state.files.values() if f.get("purpose") == "fine-tune"]
    assert [f["filename"] for f in uploads] == ["train.chat.jsonl", "val.chat.jsonl"]
    assert json.loads(uploads[0]["data"].decode().splitlines()[0])["messages"][2]["content"].endswith("\nEND")
    # done: a second run is skipped whole and creates no job
    assert run_finetune(cfg)["skipped"] and fake.state.count("/v1/fine_tuning/jobs") == 1


def test_completion_format_for_completion_models(fake, tmp_path):
    cfg = openai_config(
        fake, tmp_path, "text.openai.endpoint=completions", "text.openai.base_model=davinci-002"
    )
    run_finetune(cfg)
    names = [f["filename"] for f in fake.state.files.values() if f.get("purpose") == "fine-tune"]
    assert names == ["train.completion.jsonl", "val.completion.jsonl"]


def test_failed_job_surfaces_its_error_and_is_not_resumed(fake, tmp_path):
    fake.knobs.job_error = {"code": "invalid_training_file", "message": "3 lines are malformed"}
    cfg = openai_config(fake, tmp_path)
    with pytest.raises(FineTuneJobError, match="failed: invalid_training_file: 3 lines are malformed"):
        run_finetune(cfg)
    assert read_success(partition_url(cfg, "finetune")) is None
    fake.knobs.job_error = None
    assert run_finetune(cfg)["figures"]["finetune"]["status"] == "succeeded"
    assert fake.state.count("/v1/fine_tuning/jobs") == 2  # the failed job is not polled again: a new one


def test_a_running_job_is_resumed_not_created_twice(fake, tmp_path):
    fake.knobs.job_polls_per_status = 10_000  # stays queued: the first run gives up polling
    cfg = openai_config(fake, tmp_path, "text.openai.poll_timeout_s=0.2")
    with pytest.raises(TimeoutError, match="re-run to keep polling"):
        run_finetune(cfg)
    assert fake.state.count("/v1/fine_tuning/jobs") == 1
    fake.knobs.job_polls_per_status = 3  # the job moves on
    manifest = run_finetune(cfg)
    assert manifest["figures"]["finetune"]["resumed"] and manifest["counts"]["finetune_jobs_resumed"] == 1
    assert fake.state.count("/v1/fine_tuning/jobs") == 1
    assert fake.state.count("/v1/files") == 2  # the training files were not uploaded again


def test_a_served_model_needs_no_job(fake, tmp_path):
    cfg = openai_config(fake, tmp_path, "text.openai.model=Qwen/Qwen2.5-1.5B-Instruct")
    assert run_finetune(cfg)["figures"]["finetune"]["model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert fake.state.count("/v1/fine_tuning/jobs") == 0 and fake.state.count("/v1/files") == 0
