import pytest

from tasks.text.format import (
    REJECT_EDIT_HAS_CAPTION, REJECT_EMPTY, REJECT_LONG_EDIT, REJECT_SAME, REJECT_UNPARSEABLE, comparable,
    parse_completion, validate_triplet,
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
