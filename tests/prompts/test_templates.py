import pytest

from prompts.templates import finetune_completion, finetune_prompt, render, template_variables


def test_paper_format():
    assert finetune_prompt("a cat") == "a cat\n##\n"
    assert finetune_completion("make it a dog", "a dog") == "make it a dog\n%%\na dog\nEND"


def test_variables_are_named_and_checked():
    assert template_variables("finetune_completion") == {"edit", "output"}
    with pytest.raises(KeyError, match="missing variables"):
        render("finetune_completion", edit="x")
    with pytest.raises(KeyError, match="unexpected"):
        render("finetune_prompt", input="x", other="y")
