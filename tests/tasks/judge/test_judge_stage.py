"""The VLM rung against the OpenAI-compatible fake: scores parsed and stored, malformed answers and refusals
counted as rejections, 429/5xx storms survived, resume without asking a judged sample again, the Batch API,
no API key in any written file, and re-selection with a new judge threshold without a render or judge call."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes.fault_proxy import FaultProxy
from fakes.faults import Killed, stop_after_writes, wait_stopped, wait_until
from fakes.openai_server import fake_judgment
from judge_helpers import API_KEY, MODEL, fake_render, judge_config, judgments, kept

from tasks.common.config import load_config
from tasks.common.selection import VLM_SCORE
from tasks.filter.stage import run as run_filter
from tasks.judge.stage import run as run_judge
from tasks.registry import partition_url, stage_hash

ROOT = Path(__file__).resolve().parents[3]


def _candidates(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["passed"] & df["image_stored"]]


def test_scores_are_parsed_stored_priced_and_filtered(fake, tmp_path):
    cfg = judge_config(fake, tmp_path)
    samples = fake_render(cfg)
    manifest = run_judge(cfg, 0)
    got = judgments(cfg)
    cands = _candidates(samples)
    assert len(cands) > 4 and got["sample_key"].tolist() == sorted(cands["sample_key"])
    assert (got["vlm_status"] == "ok").all() and (got["vlm_model"] == MODEL).all()
    for row in got.itertuples():  # the scripted judge's answer, parsed
        instruction = samples.set_index("sample_key").at[row.sample_key, "edit"]
        answer = json.loads(fake_judgment(instruction, row.vlm_input_sha))
        assert (row.vlm_instruction, row.vlm_preservation, row.vlm_quality) == (
            answer["instruction_followed"],
            answer["preservation"],
            answer["quality"],
        )
        assert row.vlm_score == pytest.approx(
            math.sqrt(min(row.vlm_instruction, row.vlm_preservation) * row.vlm_quality)
        )
        assert row.vlm_raw == fake_judgment(instruction, row.vlm_input_sha)
        assert row.vlm_prompt_tokens > 170 and row.vlm_completion_tokens > 0  # two images at 85 tokens each
    price = cfg.judges.vlm.prices["gpt-4o-mini"]
    expected = (
        got["vlm_prompt_tokens"] * price.input_per_mtok + got["vlm_completion_tokens"] * price.output_per_mtok
    ) / 1e6
    np.testing.assert_allclose(got["vlm_cost_usd"], expected)
    assert (
        manifest["counts"]["in"]
        == manifest["counts"]["vlm_judged"]
        == manifest["counts"]["out"]
        == len(cands)
    )
    assert (
        manifest["figures"]["vlm_cost_usd"] == pytest.approx(expected.sum())
        and manifest["figures"]["vlm_cost_per_judged_usd"] > 0
    )
    assert manifest["counts"]["requests_answered"] == len(cands) == sum(fake.state.judged().values())

    filtered = run_filter(cfg, 0)
    k = kept(cfg)
    assert len(k) and (k[VLM_SCORE] >= cfg.render.keep.vlm_threshold).all()
    low = int((got[VLM_SCORE] < cfg.render.keep.vlm_threshold).sum())
    assert filtered["rejected"].get("vlm_score", 0) == low > 0
    c = filtered["counts"]
    assert c["ladder_vlm_in"] == len(cands) and c["ladder_vlm_passed"] == len(cands) - low
    assert c["ladder_clip_in"] == len(samples) and c["ladder_dino_in"] == c["ladder_clip_passed"]
    assert filtered["figures"]["vlm_cost_usd"] == pytest.approx(expected.sum())
    assert filtered["figures"]["vlm_cost_per_kept_pair_usd"] == pytest.approx(
        expected.sum() / len(k), rel=1e-3
    )
    assert {"vlm_rubric", "vlm_raw", "vlm_model", "dino_similarity", "ssim"} <= set(k.columns)


def test_malformed_answers_and_refusals_are_rejections_by_reason(fake, tmp_path):
    fake.knobs.judge_malformed_rate = 0.4
    cfg = judge_config(fake, tmp_path)
    samples = fake_render(cfg, triplets=10, instructions={1: "make it REFUSED", 4: "make it REFUSED"})
    manifest = run_judge(cfg, 0)
    got = judgments(cfg)
    status = got["vlm_status"].value_counts().to_dict()
    refused = int(_candidates(samples)["edit"].str.contains("REFUSED").sum())
    assert status.get("unparseable", 0) > 0 and status.get("refused", 0) == refused > 0
    bad = got[got["vlm_status"] == "unparseable"]
    assert bad["vlm_score"].isna().all() and bad["vlm_raw"].notna().all() and bad["vlm_error"].notna().all()
    assert manifest["rejected"] == {"vlm_unparseable": status["unparseable"], "vlm_refused": refused}
    filtered = run_filter(cfg, 0)
    assert filtered["rejected"]["vlm_unparseable"] == status["unparseable"]
    assert filtered["rejected"]["vlm_refused"] == refused
    assert not set(kept(cfg)["sample_key"]) & set(got.loc[got["vlm_status"] != "ok", "sample_key"])


def test_429_and_5xx_storms_are_survived_with_every_candidate_judged_once(fake, tmp_path):
    fake.knobs.rate_429, fake.knobs.rate_500, fake.knobs.retry_after = 0.35, 0.2, 0.0
    fake.knobs.latency = (0.001, 0.01)
    cfg = judge_config(fake, tmp_path)
    samples = fake_render(cfg, triplets=12)
    manifest = run_judge(cfg, 0)
    got = judgments(cfg)
    assert got["sample_key"].tolist() == sorted(_candidates(samples)["sample_key"])
    assert (got["vlm_status"] == "ok").all()
    assert manifest["counts"]["retries_429"] > 0 and manifest["counts"]["retries_5xx"] > 0
    assert set(fake.state.judged().values()) == {1}  # each sample answered once, however many retries it took
    statuses = {r["status"] for r in fake.state.requests if r["path"].endswith("chat/completions")}
    assert {200, 429, 500} <= statuses


# count-placed faults: chunks of exactly `checkpoint_every` answers (no flush by the clock)
COUNTED = (
    "judges.vlm.checkpoint_every=3",
    "judges.vlm.checkpoint_interval_s=3600",
    "judges.vlm.concurrency=4",
)


def _reference(fake, root: Path, *settings: str) -> bytes:
    clean = judge_config(fake, root, *settings)
    fake_render(clean, triplets=12)
    run_judge(clean, 0)
    return (Path(partition_url(clean, "judge")) / "judgments.parquet").read_bytes()


def _checkpointed(cfg) -> pd.DataFrame:
    from tasks.common.contract import Checkpoint
    from tasks.common.layout import progress_dir

    return Checkpoint(
        progress_dir(partition_url(cfg, "judge"), stage_hash(cfg, "judge")), "sample_key"
    ).load()


def test_a_kill_mid_run_then_resume_asks_no_judged_sample_again(fake, tmp_path):
    """Placed by counts: the fake answers 6 requests and holds the rest; the run is killed (a BaseException no
    `except Exception` catches) right after its 2nd checkpoint chunk of 3: exactly 6 judged samples kept."""
    fake.knobs.latency, fake.knobs.rate_429 = (0.002, 0.02), 0.1
    reference = _reference(fake, tmp_path / "clean", *COUNTED)
    total = len(judgments(judge_config(fake, tmp_path / "clean", *COUNTED)))

    cfg = judge_config(fake, tmp_path / "crashed", *COUNTED)
    fake_render(cfg, triplets=12)
    fake.state.reset()
    fake.knobs.answer_limit = 6

    def killed_after_two_chunks(n: int) -> None:
        if n == 2:
            raise Killed("simulated kill after the 2nd chunk")

    with pytest.raises(Killed):
        run_judge(cfg, 0, on_chunk=killed_after_two_chunks)
    wait_until(lambda: fake.state.held == 0, "the fake to see the held requests abandoned")
    checkpointed = _checkpointed(cfg)
    assert len(checkpointed) == 6 < total and sum(fake.state.judged().values()) == 6
    fake.knobs.answer_limit = None
    before = len(fake.state.requests)
    manifest = run_judge(cfg, 0)
    asked_after = [r["judge"] for r in fake.state.requests[before:] if r.get("judge") and r["status"] == 200]
    assert not set(asked_after) & set(checkpointed["vlm_input_sha"])  # no judged sample asked again
    assert len(asked_after) == len(set(asked_after)) == total - 6  # the rest were, once each
    assert (Path(partition_url(cfg, "judge")) / "judgments.parquet").read_bytes() == reference
    assert manifest["counts"]["out"] == total


KILLED_JUDGE = """
import json, sys
from tasks.common.config import load_config
from tasks.judge.stage import run
run(load_config("demo", json.loads(sys.argv[1])), 0)
"""


def test_a_sigkill_after_the_second_chunk_then_resume_writes_the_clean_bytes(fake, tmp_path):
    """A real SIGKILL of a judging process, placed by a count: the process stops itself right after its 2nd
    checkpoint chunk is written (tests/fakes/faults.py), then is killed there."""
    import os
    import signal
    import subprocess

    from judge_helpers import KEY_ENV, judge_overrides

    fake.knobs.latency = (0.002, 0.02)
    reference = _reference(fake, tmp_path / "clean", *COUNTED)
    root = tmp_path / "killed"
    cfg = judge_config(fake, root, *COUNTED)
    fake_render(cfg, triplets=12)
    fake.state.reset()
    args = stop_after_writes(
        2,
        "*/judge/*/_progress/*/chunk-*.parquet",
        "-c",
        KILLED_JUDGE,
        json.dumps(judge_overrides(fake, root, *COUNTED)),
    )
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(ROOT)}, start_new_session=True
    )
    try:
        wait_stopped(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    checkpointed = _checkpointed(cfg)
    assert len(checkpointed) == 6 and not list(root.glob("judge/*/part-00000/_SUCCESS.json"))
    lost = set(fake.state.judged()) - set(checkpointed["vlm_input_sha"])
    assert len(lost) <= 4 + 2  # answered but never written: the requests in flight and an unflushed chunk
    before = len(fake.state.requests)
    run_judge(cfg, 0)
    asked_after = {r["judge"] for r in fake.state.requests[before:] if r.get("judge") and r["status"] == 200}
    assert not asked_after & set(checkpointed["vlm_input_sha"])
    assert (Path(partition_url(cfg, "judge")) / "judgments.parquet").read_bytes() == reference


PROXY_FAULTS = {
    1: "reset",
    3: "lost",
    4: "partial",
    6: "slow",
    8: "stall",
    9: "partial",
    12: "reset",
    14: "lost",
}


def test_a_fault_proxy_resets_cuts_and_slows_answers_and_the_judgments_are_the_clean_bytes(fake, tmp_path):
    """Between the judge and the fake: connections reset before and after the answer, answers cut in half, a
    slow stream and one that never comes (the request deadline) — each placed by its request number."""
    reference = _reference(fake, tmp_path / "clean", *COUNTED)
    with FaultProxy(fake.base_url, PROXY_FAULTS) as proxy:
        cfg = judge_config(
            fake,
            tmp_path / "proxied",
            *COUNTED,
            f"judges.vlm.base_url={proxy.base_url}",
            "judges.vlm.request_timeout_s=3",
        )
        fake_render(cfg, triplets=12)
        manifest = run_judge(cfg, 0)
    assert proxy.faults_done() == {"reset": 2, "lost": 2, "partial": 2, "slow": 1, "stall": 1}
    assert (Path(partition_url(cfg, "judge")) / "judgments.parquet").read_bytes() == reference
    c = manifest["counts"]
    assert c.get("retries_connection", 0) + c.get("retries_deadline", 0) + c.get("retries_timeout", 0) == 7, c


def test_batch_mode_judges_as_online_at_the_batch_price(fake, tmp_path):
    online = judge_config(fake, tmp_path / "online")
    fake_render(online)
    run_judge(online, 0)
    batch = judge_config(fake, tmp_path / "batch", "judges.vlm.mode=batch", "judges.vlm.batch_max_requests=4")
    assert stage_hash(batch, "judge") == stage_hash(online, "judge")  # the mode is how, not what
    fake_render(batch)
    fake.state.reset()
    manifest = run_judge(batch, 0)
    a, b = judgments(online), judgments(batch)
    same = [c for c in a.columns if c not in ("vlm_batch", "vlm_cost_usd")]
    pd.testing.assert_frame_equal(a[same], b[same])
    assert b["vlm_batch"].all() and not a["vlm_batch"].any()
    np.testing.assert_allclose(b["vlm_cost_usd"], a["vlm_cost_usd"] * 0.5)
    jobs = -(-len(b) // 4)
    assert manifest["counts"]["batch_jobs_created"] == jobs and manifest["counts"][
        "vlm_batch_answered"
    ] == len(b)
    assert not [r for r in fake.state.requests if r["path"] == "/v1/chat/completions"]  # nothing online


def test_no_api_key_in_any_written_file_or_log(fake, tmp_path, caplog):
    fake.knobs.rate_429 = 0.2
    cfg = judge_config(fake, tmp_path)
    fake_render(cfg)
    with caplog.at_level(logging.DEBUG):
        run_judge(cfg, 0)
        run_filter(cfg, 0)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked
    assert API_KEY not in caplog.text
    assert list(tmp_path.rglob("judgments.parquet")) and list(tmp_path.rglob("kept.parquet"))


def test_missing_key_names_the_variable(fake, tmp_path, monkeypatch):
    from tasks.common.openai_client import MissingAPIKeyError

    cfg = judge_config(fake, tmp_path, "judges.vlm.api_key_env=EDITFORGE_NO_SUCH_JUDGE_KEY")
    fake_render(cfg)
    monkeypatch.delenv("EDITFORGE_NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(
        MissingAPIKeyError,
        match="judges.vlm.api_key_env.*EDITFORGE_NO_SUCH_JUDGE_KEY|"
        "EDITFORGE_NO_SUCH_JUDGE_KEY.*judges.vlm.api_key_env",
    ):
        run_judge(cfg, 0)
    assert not (Path(partition_url(cfg, "judge")) / "_SUCCESS.json").exists()


def test_a_new_judge_threshold_or_order_re_selects_without_a_render_or_judge_call(fake, tmp_path):
    cfg = judge_config(fake, tmp_path)
    fake_render(cfg, triplets=10)
    run_judge(cfg, 0)
    run_filter(cfg, 0)
    first = kept(cfg)
    asked = len(fake.state.requests)

    def reselect(*overrides: str) -> pd.DataFrame:
        other = load_config("demo", [*[f"{k}={v}" for k, v in _overrides(cfg).items()], *overrides])
        assert stage_hash(other, "render") == stage_hash(cfg, "render")  # nothing is rendered again
        assert stage_hash(other, "judge") == stage_hash(cfg, "judge")  # nor judged again
        assert stage_hash(other, "filter") != stage_hash(cfg, "filter")
        assert run_judge(other, 0)["skipped"]
        assert not run_filter(other, 0)["skipped"]
        return kept(other)

    looser = reselect("filter.vlm_threshold=3")
    assert set(looser["sample_key"]) > set(first["sample_key"])
    stricter = float(first["dino_similarity"].max()) - 1e-6  # only the most similar kept pair stays
    assert set(reselect(f"filter.dino_threshold={stricter}")["sample_key"]) < set(first["sample_key"])
    by_direction = reselect("filter.top_k=1", "filter.vlm_threshold=0")
    by_judge = reselect("filter.top_k=1", "filter.vlm_threshold=0", "filter.rank_by=vlm_score")
    assert set(by_judge["sample_key"]) != set(by_direction["sample_key"])
    best = judgments(cfg).groupby("caption_id")[VLM_SCORE].max()  # every judged sample passed the rungs below
    assert by_judge.set_index("caption_id")[VLM_SCORE].to_dict() == pytest.approx(best.to_dict())
    assert len(fake.state.requests) == asked  # the fake's log: no request since the first judge run


def _overrides(cfg) -> dict[str, str]:
    v = cfg.judges.vlm
    return {
        "output_root": cfg.output_root,
        "render.save_images": "passed",
        "judges.vlm.enabled": "true",
        "judges.vlm.base_url": v.base_url,
        "judges.vlm.api_key_env": v.api_key_env,
        "judges.vlm.model": v.model,
    }


def test_estimate_reports_tokens_and_cost_per_judged_sample_and_kept_pair(fake, tmp_path):
    from tasks.filter.stage import funnel_line
    from tasks.judge.cost import estimate

    cfg = judge_config(fake, tmp_path)
    fake_render(cfg)
    judged, filtered = run_judge(cfg, 0), run_filter(cfg, 0)
    e = estimate([judged], [filtered], 1_000_000)  # what `editforge estimate` adds as its judge stage
    assert e["judged"] == judged["counts"]["vlm_judged"] and e["kept_pairs"] == filtered["counts"]["out"]
    assert e["cost_usd"] == pytest.approx(judged["figures"]["vlm_cost_usd"])
    assert e["cost_per_kept_pair_usd"] == pytest.approx(
        judged["figures"]["vlm_cost_usd"] / filtered["counts"]["out"]
    )
    assert e["projected_cost_usd"] == pytest.approx(e["cost_per_kept_pair_usd"] * 1_000_000)
    line = funnel_line(filtered["counts"])
    assert line.startswith("judge ladder (filter): clip ") and " vlm " in line


def test_recorded_batch_jobs_are_polled_not_created_again(fake, tmp_path):
    fake.knobs.batch_polls = 10_000
    cfg = judge_config(
        fake,
        tmp_path,
        "judges.vlm.mode=batch",
        "judges.vlm.batch_max_requests=4",
        "judges.vlm.poll_timeout_s=0.2",
    )
    fake_render(cfg)
    with pytest.raises(TimeoutError, match="re-run to keep polling"):
        run_judge(cfg, 0)
    created = [r for r in fake.state.requests if r["path"] == "/v1/batches"]
    fake.knobs.batch_polls = 1
    manifest = run_judge(cfg, 0)
    assert manifest["counts"]["batch_jobs_resumed"] == len(created) > 0
    assert "batch_jobs_created" not in manifest["counts"]
    assert len([r for r in fake.state.requests if r["path"] == "/v1/batches"]) == len(
        created
    )  # no new job paid for
    assert (judgments(cfg)["vlm_status"] == "ok").all() and judgments(cfg)["vlm_batch"].all()


def test_key_from_a_prefect_secret_block(fake, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from prefect.blocks.system import Secret

    loaded: list[str] = []
    monkeypatch.setattr(
        Secret,
        "load",
        staticmethod(lambda name, *a, **k: loaded.append(name) or SimpleNamespace(get=lambda: API_KEY)),
    )
    monkeypatch.delenv("EDITFORGE_TEST_JUDGE_KEY")
    cfg = judge_config(fake, tmp_path, "judges.vlm.api_key_secret=editforge-judge")
    fake_render(cfg)
    assert run_judge(cfg, 0)["counts"]["vlm_judged"] > 0 and loaded == ["editforge-judge"]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
