import pandas as pd
import pytest

from tasks.text.format import (
    REJECT_EDIT_HAS_CAPTION,
    REJECT_EMPTY,
    REJECT_LONG_EDIT,
    REJECT_SAME,
    REJECT_UNPARSEABLE,
    TRIPLET_COLUMNS,
    comparable,
    parse_completion,
    triplet_row,
    validate_triplet,
)


def test_parses_the_paper_format():
    p = parse_completion("make it winter\n%%\na snowy house\nEND")
    assert p.ok and (p.edit, p.output) == ("make it winter", "a snowy house")
    # the stop sequence is usually stripped by the API
    assert parse_completion(" make it winter \n%%\n a snowy house").edit == "make it winter"
    assert parse_completion("make it winter\r\n%%\r\na snowy house").ok


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, REJECT_UNPARSEABLE),
        ("", REJECT_EMPTY),
        ("   \n", REJECT_EMPTY),
        ("make it winter", REJECT_UNPARSEABLE),
        ("make it winter\n%%\n", REJECT_EMPTY),
        ("make it winter\n%%\n   \nEND", REJECT_EMPTY),
        ("\n%%\na snowy house", REJECT_EMPTY),
        ("a\n%%\nb\n%%\nc", REJECT_UNPARSEABLE),
        ("line one\nline two\n%%\nout", REJECT_UNPARSEABLE),
        ("edit\n%%\nout %% more", REJECT_UNPARSEABLE),
    ],
)
def test_malformed_completions_are_rejected_with_a_reason(raw, reason):
    p = parse_completion(raw)
    assert not p.ok and p.reject_reason == reason


def test_output_equal_to_input_ignores_case_and_trailing_punctuation():
    assert comparable("A House.") == comparable("a house!")
    assert validate_triplet("A house.", "do nothing", "a house!") == REJECT_SAME
    assert validate_triplet("A house", "make it red", "A red house") is None


def test_other_validation_reasons():
    assert validate_triplet("a cat", " ".join(["word"] * 50), "a dog") == REJECT_LONG_EDIT
    caption = "a photograph of a mountain lake at dawn"
    assert validate_triplet(caption, f"turn {caption} into night", "x") == REJECT_EDIT_HAS_CAPTION


def test_triplet_row_keeps_or_rejects_with_one_reason():
    from tasks.text.format import REJECT_MODERATION, triplet_row

    ok = triplet_row("a", "a cat", "make it a dog\n%%\na dog", "m")
    assert (ok["status"], ok["reject_reason"], ok["edit"], ok["output"]) == (
        "ok",
        None,
        "make it a dog",
        "a dog",
    )
    bad = triplet_row("b", "a cat", "make it a dog", "m")
    assert (bad["status"], bad["reject_reason"], bad["edit"]) == ("rejected", REJECT_UNPARSEABLE, None)
    same = triplet_row("c", "a cat.", "do nothing\n%%\nA cat", "m")
    assert same["reject_reason"] == REJECT_SAME
    flagged = triplet_row("d", "a cat", None, "m", reject_reason=REJECT_MODERATION)
    assert flagged["reject_reason"] == REJECT_MODERATION and flagged["raw_completion"] is None


def test_duplicate_input_edit_pairs_are_rejected_independently_of_order():
    import pandas as pd

    from tasks.text.format import REJECT_DUPLICATE, TRIPLET_COLUMNS, mark_duplicates, triplet_row

    rows = [
        triplet_row("c3", "A cat on a mat.", "Make it snow\n%%\na cat on a mat in snow", "m"),
        triplet_row("a1", "a cat on a mat", "make it snow!\n%%\na cat on a mat, snowing", "m"),
        triplet_row("b2", "a cat on a mat", "make it night\n%%\na cat on a mat at night", "m"),
        triplet_row("d4", "a cat on a mat", "make it snow\n%%\nx", "m")
        | {"status": "rejected", "reject_reason": "x"},
    ]
    for order in (rows, rows[::-1]):
        df = mark_duplicates(pd.DataFrame(order, columns=TRIPLET_COLUMNS))
        assert list(df["caption_id"]) == ["a1", "b2", "c3", "d4"]
        assert list(df["reject_reason"].fillna("")) == ["", "", REJECT_DUPLICATE, "x"]


def test_only_what_another_try_can_fix_is_retried_and_only_while_tries_are_left():
    from tasks.text.format import wants_retry

    def row(raw, reason=None, attempt=1):
        return triplet_row("c1", "a red barn at dawn", raw, "m", reject_reason=reason, attempt=attempt)

    assert wants_retry(row("make it winter make it snowy"), 2)  # unparseable
    assert wants_retry(row("make it winter\n%%\na red barn at dawn."), 2)  # output equals input
    assert wants_retry(row(None, "truncated"), 2) and wants_retry(row(None, "moderation_flag"), 2)
    assert not wants_retry(row("make it winter make it snowy", attempt=2), 2)  # out of tries
    assert not wants_retry(row(None, "api_error"), 4)  # the server refused the request for good
    assert not wants_retry(row("make it winter\n%%\na snowy red barn"), 4)  # accepted


def test_attempt_counts_say_what_each_try_was_rejected_for():
    from tasks.text.format import attempt_counts, rejections_so_far

    first = triplet_row("c1", "a red barn", "nonsense", "m")
    second = triplet_row(
        "c1",
        "a red barn",
        "make it winter\n%%\na snowy red barn",
        "m",
        attempt=2,
        earlier=rejections_so_far(first),
    )
    given_up = triplet_row("c2", "a lake", "a lake", "m", attempt=3, earlier=["empty_part", "unparseable"])
    flagged_caption = triplet_row("c3", "a cat", None, "m", reject_reason="moderation_flag", attempt=0)
    at_once = triplet_row("c4", "a dog", "add a hat\n%%\na dog with a hat", "m")
    assert (
        second["earlier_rejections"] == "unparseable"
        and given_up["earlier_rejections"] == "empty_part;unparseable"
    )
    df = pd.DataFrame([second, given_up, flagged_caption, at_once], columns=TRIPLET_COLUMNS)
    assert attempt_counts(df) == {
        "accepted_attempt_1": 1,
        "accepted_attempt_2": 1,
        "attempt_1_empty_part": 1,
        "attempt_1_unparseable": 1,
        "attempt_2_unparseable": 1,
        "attempt_3_unparseable": 1,
        "generation_attempts": 6,
    }
