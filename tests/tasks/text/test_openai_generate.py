"""Online and Batch API generation against the fake: faults, malformed answers, moderation, resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from fakes.openai_server import fake_completion
from text_helpers import make_captions, openai_config, write_captions

from tasks.common import storage
from tasks.text.format import (
    REJECT_API,
    REJECT_MODERATION,
    TRIPLET_COLUMNS,
    attempt_counts,
    mark_duplicates,
    rejections_so_far,
    triplet_row,
    wants_retry,
)
from tasks.text.openai_api import caption_seed
from tasks.text.openai_batch import BatchJobError
from tasks.text.stage import run as run_text

MODEL = "ft:gpt-4o-mini-2024-07-18:fake-org:editforge:abc123"


def _only(found):
    (path,) = list(found)  # one version of the text stage in these tests
    return path


def _triplets(root) -> pd.DataFrame:
    return storage.read_parquet(str(_only(Path(root).glob("text/*/part-00000/triplets.parquet"))))


def expected_rows(
    cfg, captions: pd.DataFrame, malformed_rate: float = 0.0, flag_words=(), refuse_words=()
) -> pd.DataFrame:
    """What the stage must write for `captions`, computed without any request."""
    rows = []
    for cid, text in zip(captions["caption_id"], captions["text"]):
        if any(w in text for w in flag_words):
            rows.append(
                triplet_row(cid, text, None, MODEL, reject_reason=REJECT_MODERATION, attempt=0)
            )  # never sent
        elif any(w in text for w in refuse_words):
            rows.append(triplet_row(cid, text, None, MODEL, reject_reason=REJECT_API))
        else:
            row = triplet_row(
                cid, text, fake_completion(text, caption_seed(cfg.text.seed, cid), malformed_rate), MODEL
            )
            if row["status"] == "ok" and any(w in f"{row['edit']}\n{row['output']}" for w in flag_words):
                row |= {"status": "rejected", "reject_reason": REJECT_MODERATION}
            rows.append(row)
    return mark_duplicates(pd.DataFrame(rows, columns=TRIPLET_COLUMNS))


def _assert_same(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        actual.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False
    )


def test_429_storm_and_500s_still_complete_with_correct_rows(fake, tmp_path):
    fake.knobs.rate_429, fake.knobs.rate_500, fake.knobs.retry_after = 0.3, 0.3, 0.0
    fake.knobs.latency = (0.0, 0.01)
    captions = make_captions(120)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(
        fake,
        tmp_path,
        f"text.openai.model={MODEL}",
        "text.openai.concurrency=16",
        "text.openai.checkpoint_every=16",
    )
    manifest = run_text(cfg, 0)
    counts = manifest["counts"]
    assert counts["in"] == 120 and counts["out"] + sum(manifest["rejected"].values()) == 120
    assert counts["retries_429"] > 20 and counts["retries_5xx"] > 20 and counts["requests_answered"] == 120
    assert fake.state.count("/v1/chat/completions", 429) == counts["retries_429"] - _moderation_retries(
        fake, 429
    )
    _assert_same(_triplets(tmp_path), expected_rows(cfg, captions))
    assert max(fake.state.answered().values()) == 1  # no caption answered twice


def _moderation_retries(fake, status: int) -> int:
    return fake.state.count("/v1/moderations", status)


def test_malformed_completions_are_counted_by_reason(fake, tmp_path):
    fake.knobs.malformed_rate = 0.5
    captions = make_captions(60)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.endpoint=completions")
    manifest = run_text(cfg, 0)
    expected = expected_rows(cfg, captions, malformed_rate=0.5)
    _assert_same(_triplets(tmp_path), expected)
    want = expected["reject_reason"].value_counts().to_dict()
    assert manifest["rejected"] == want and {"unparseable", "empty_part", "output_equals_input"} <= set(want)
    assert manifest["counts"]["out"] == (expected["status"] == "ok").sum()
    assert fake.state.count("/v1/completions", 200) == 60 and fake.state.count("/v1/chat/completions") == 0


def test_moderation_of_captions_and_of_generated_text(fake, tmp_path):
    fake.knobs.flag_words = ("FLAGGED", "fireworks")  # "fireworks" appears in some generated edits
    captions = make_captions(40, ["a FLAGGED scene in the park", "a REFUSED scene by the lake"])
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}")
    manifest = run_text(cfg, 0)
    expected = expected_rows(cfg, captions, flag_words=fake.knobs.flag_words, refuse_words=("REFUSED",))
    _assert_same(_triplets(tmp_path), expected)
    assert manifest["rejected"][REJECT_MODERATION] >= 2 and manifest["rejected"][REJECT_API] == 1
    assert "a FLAGGED scene in the park" not in fake.state.answered()  # a flagged caption is never sent


def test_moderation_can_be_switched_off(fake, tmp_path):
    captions = make_captions(10, ["a FLAGGED scene in the park"])
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.moderation=false")
    run_text(cfg, 0)
    assert fake.state.count("/v1/moderations") == 0 and len(fake.state.answered()) == 11


def test_batch_api_round_trip_equals_online(fake, tmp_path):
    fake.knobs.batch_polls = 2
    fake.knobs.malformed_rate = 0.2
    captions = make_captions(50, ["a FLAGGED scene in the park"])
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.mode=batch")
    manifest = run_text(cfg, 0)
    assert fake.state.count("/v1/batches") == 1 and fake.state.count("/v1/chat/completions") == 0
    batch_input = [f for f in fake.state.files.values() if f.get("purpose") == "batch"]
    assert len(batch_input) == 1 and b'"custom_id"' in batch_input[0]["data"]
    assert manifest["counts"]["batch_answered"] == 50
    _assert_same(_triplets(tmp_path), expected_rows(cfg, captions, 0.2, flag_words=("FLAGGED",)))


def test_batch_errors_fall_back_to_online_requests(fake, tmp_path):
    fake.knobs.batch_error_rate = 0.3
    captions = make_captions(40)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.mode=batch")
    manifest = run_text(cfg, 0)
    fallback = manifest["counts"]["batch_fallback_online"]
    assert 0 < fallback < 40 and fake.state.count("/v1/chat/completions", 200) == fallback
    assert max(fake.state.answered().values()) == 1
    _assert_same(_triplets(tmp_path), expected_rows(cfg, captions))


def test_a_failed_batch_surfaces_its_errors(fake, tmp_path):
    fake.knobs.batch_fail = True
    write_captions(str(tmp_path), 0, make_captions(5))
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.mode=batch")
    with pytest.raises(BatchJobError, match="invalid_request: line 1: unknown model"):
        run_text(cfg, 0)


def test_a_recorded_batch_is_polled_not_created_again(fake, tmp_path):
    fake.knobs.batch_polls = 10_000
    captions = make_captions(20)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(
        fake,
        tmp_path,
        f"text.openai.model={MODEL}",
        "text.openai.mode=batch",
        "text.openai.poll_timeout_s=0.2",
    )
    with pytest.raises(TimeoutError, match="re-run to keep polling"):
        run_text(cfg, 0)
    fake.knobs.batch_polls = 1
    manifest = run_text(cfg, 0)
    assert manifest["counts"]["batch_jobs_resumed"] == 1 and fake.state.count("/v1/batches") == 1
    _assert_same(_triplets(tmp_path), expected_rows(cfg, captions))


def test_a_server_without_moderation_gives_a_clear_error(fake, tmp_path):
    from tasks.text import openai_api

    write_captions(str(tmp_path), 0, make_captions(3))
    cfg = openai_config(
        fake,
        tmp_path,
        f"text.openai.model={MODEL}",
        f"text.openai.base_url={fake.base_url.removesuffix('/v1')}/no-such-prefix/v1",
    )
    with pytest.raises(openai_api.ModerationUnavailableError, match="text.openai.moderation=false"):
        run_text(cfg, 0)


@pytest.mark.parametrize(
    "setting, status, fix",
    [
        ("text.openai.api_key_env=EDITFORGE_WRONG_KEY", 401, "text.openai.api_key_env"),
        ("text.openai.base_url={base}/no-such-prefix/v1", 404, "text.openai.base_url"),
    ],
)
def test_auth_and_not_found_stop_the_stage_and_nothing_is_marked_done(
    fake, tmp_path, monkeypatch, setting, status, fix
):
    """The documented vLLM set-up (moderation off): a wrong key or URL must not turn into a finished partition."""
    from tasks.text.openai_api import PermanentAPIError

    monkeypatch.setenv("EDITFORGE_WRONG_KEY", "sk-wrong")
    captions = make_captions(12)
    write_captions(str(tmp_path), 0, captions)
    base = fake.base_url.removesuffix("/v1")
    cfg = openai_config(
        fake,
        tmp_path,
        f"text.openai.model={MODEL}",
        "text.openai.moderation=false",
        setting.format(base=base),
    )
    with pytest.raises(PermanentAPIError, match=rf"HTTP {status} .*{fix}"):
        run_text(cfg, 0)
    assert not list(tmp_path.glob("text/*/part-00000/_SUCCESS.json"))
    assert fake.state.count("/v1/chat/completions", 200) == 0
    fixed = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.moderation=false")
    manifest = run_text(fixed, 0)  # once fixed, every caption is asked and answered
    assert not manifest["skipped"] and manifest["counts"]["requests_answered"] == 12


def test_truncated_and_filtered_answers_are_rejected_with_their_reason(fake, tmp_path):
    captions = make_captions(6, ["a TRUNCATED tale of a lighthouse", "a FILTERED scene at night"])
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.moderation=false")
    manifest = run_text(cfg, 0)
    rows = _triplets(tmp_path).set_index("input")
    assert rows.loc["a TRUNCATED tale of a lighthouse", "reject_reason"] == "truncated"
    assert rows.loc["a FILTERED scene at night", "reject_reason"] == "content_filter"
    assert manifest["rejected"]["truncated"] == manifest["rejected"]["content_filter"] == 1


def test_a_trickling_server_hits_the_request_deadline(fake, tmp_path):
    fake.knobs.trickle_s = 0.4  # 8 pieces: ~3 s an answer, each piece well inside a per-read timeout
    write_captions(str(tmp_path), 0, make_captions(2))
    cfg = openai_config(
        fake,
        tmp_path,
        f"text.openai.model={MODEL}",
        "text.openai.moderation=false",
        "text.openai.request_timeout_s=1",
        "text.openai.max_retries=1",
    )
    with pytest.raises(Exception, match="timed out"):
        run_text(cfg, 0)
    assert not list(tmp_path.glob("text/*/part-00000/_SUCCESS.json"))


def test_an_answer_cut_short_is_retried(fake, tmp_path):
    fake.knobs.cut_json_rate = 0.3
    captions = make_captions(30)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}", "text.openai.moderation=false")
    manifest = run_text(cfg, 0)
    assert manifest["counts"]["retries_malformed"] > 0 and manifest["counts"]["requests_answered"] == 30
    _assert_same(_triplets(tmp_path), expected_rows(cfg, captions))


def expected_retried_rows(cfg, captions: pd.DataFrame, malformed_rate: float, flag_words=()) -> pd.DataFrame:
    """The rows of `text.max_attempts` tries per caption against the fake, computed without any request:
    each try asks with its own seed, a flagged or malformed answer is asked again while tries are left."""
    t, rows = cfg.text, []
    for cid, text in zip(captions["caption_id"], captions["text"]):
        earlier: list[str] = []
        for attempt in range(1, t.max_attempts + 1):
            raw = fake_completion(text, caption_seed(t.seed, cid, attempt), malformed_rate)
            row = triplet_row(cid, text, raw, MODEL, attempt=attempt, earlier=earlier)
            if row["status"] == "ok" and any(w in f"{row['edit']}\n{row['output']}" for w in flag_words):
                row |= {"status": "rejected", "reject_reason": REJECT_MODERATION}
            if not wants_retry(row, t.max_attempts):
                break
            earlier = rejections_so_far(row)
        rows.append(row)
    return mark_duplicates(pd.DataFrame(rows, columns=TRIPLET_COLUMNS))


def _sent_seeds(fake, path: str) -> set[tuple[str, int]]:
    return {
        (r["caption"], r["seed"]) for r in fake.state.requests if r["path"] == path and r["status"] == 200
    }


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_rejected_answer_is_asked_again_up_to_max_attempts_with_each_try_counted(fake, tmp_path, mode):
    fake.knobs.malformed_rate, fake.knobs.flag_words = 0.6, ("FLAGGED", "fireworks")
    captions = make_captions(40)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(
        fake, tmp_path, f"text.openai.model={MODEL}", "text.max_attempts=4", f"text.openai.mode={mode}"
    )
    manifest = run_text(cfg, 0)
    expected = expected_retried_rows(cfg, captions, 0.6, fake.knobs.flag_words)
    table = storage.read_parquet(str(tmp_path / manifest["path"] / "triplets.parquet"))
    _assert_same(table, expected)

    # retries happened, accepted late or given up after the 4th try, and the table says which try it was
    accepted, rejected = table[table.status == "ok"], table[table.status == "rejected"]
    assert (accepted["attempt"] > 1).sum() >= 5 and (accepted["attempt"] == 1).sum() >= 5
    assert (rejected["attempt"] == 4).any() and table["attempt"].max() == 4
    assert (
        table["earlier_rejections"].str.count(";") + (table["earlier_rejections"] != "")
        == table["attempt"] - 1
    ).all()
    assert "moderation_flag" in ";".join(table["earlier_rejections"])  # a flagged answer was asked again

    # one request per try, each with that try's seed (the first try's is the caption's own, as before retries)
    want = {
        (text, caption_seed(cfg.text.seed, cid, k))
        for cid, text, n in zip(table["caption_id"], table["input"], table["attempt"])
        for k in range(1, n + 1)
    }
    path = "/v1/chat/completions" if mode == "online" else "batch:/v1/chat/completions"
    assert _sent_seeds(fake, path) == want and fake.state.count(path, 200) == table["attempt"].sum()
    if mode == "batch":
        assert fake.state.count("/v1/batches") == 4  # one job per try

    # per-try counts in the stage's stats: what each try was rejected for, and which try was accepted
    per_try = {k: v for k, v in manifest["counts"].items() if k.startswith(("attempt_", "accepted_attempt_"))}
    assert per_try == {k: v for k, v in attempt_counts(expected).items() if k != "generation_attempts"}
    assert manifest["counts"]["generation_attempts"] == table["attempt"].sum()
    assert (
        sum(v for k, v in per_try.items() if k.startswith("attempt_1_"))
        == (table["attempt"] > 1).sum() + ((table["attempt"] == 1) & (table["status"] == "rejected")).sum()
    )
    assert manifest["rejected"] == table["reject_reason"].dropna().value_counts().to_dict()


def test_one_attempt_asks_each_caption_once_with_its_own_seed(fake, tmp_path):
    fake.knobs.malformed_rate = 0.6
    captions = make_captions(20)
    write_captions(str(tmp_path), 0, captions)
    cfg = openai_config(fake, tmp_path, f"text.openai.model={MODEL}")
    assert cfg.text.max_attempts == 1
    manifest = run_text(cfg, 0)
    table = storage.read_parquet(str(tmp_path / manifest["path"] / "triplets.parquet"))
    assert set(table["attempt"]) == {1} and set(table["earlier_rejections"]) == {""}
    assert _sent_seeds(fake, "/v1/chat/completions") == {
        (t, caption_seed(0, c)) for c, t in zip(captions["caption_id"], captions["text"])
    }
    assert not any(k.startswith("attempt_") for k in manifest["counts"])  # one try: `rejected` says it all
