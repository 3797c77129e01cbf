"""Prompt templates live as text files beside this module; variables are named `{like_this}`.

The same templates render the fine-tune data and the generation requests, so a change to a template
changes both (and the config hash of every stage that uses it):

- completion format (the paper's GPT-3 fine-tune): prompt `finetune_prompt.txt` = `"{input}\\n##\\n"`,
  completion `finetune_completion.txt` = `"{edit}\\n%%\\n{output}\\nEND"`;
- chat format (today's fine-tuning APIs and instruct models): system `chat_system.txt`, user
  `chat_user.txt` (`{input}`), assistant = the paper's completion, so one parser reads both;
- the VLM judge's rubric (VIEScore-like: instruction followed, unedited content preserved, image quality,
  0-10 each, answered as JSON): system `judge_system.txt`, user `judge_user.txt` (`{instruction}`,
  `{input_caption}`, `{output_caption}`), followed by the two images. Its own hash
  (:func:`judge_templates_hash`) is part of the judge stage's, not the fine-tune's.
"""

from __future__ import annotations

import hashlib
import string
from functools import cache
from importlib import resources
from typing import Any

STOP_SEQUENCE = "\nEND"
EDIT_OUTPUT_SEPARATOR = "\n%%\n"
TEMPLATE_NAMES = ("finetune_prompt", "finetune_completion", "chat_system", "chat_user")
JUDGE_TEMPLATE_NAMES = ("judge_system", "judge_user")


@cache
def load_template(name: str) -> str:
    """Return the text of `prompts/{name}.txt`."""
    return resources.files("prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def template_variables(name: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(load_template(name)) if field}


def render(name: str, **values: str) -> str:
    """Render template `name`; a missing or unexpected variable is an error naming it."""
    expected = template_variables(name)
    missing, extra = expected - values.keys(), values.keys() - expected
    if missing or extra:
        raise KeyError(f"template {name!r}: missing variables {sorted(missing)}, unexpected {sorted(extra)}")
    return load_template(name).format(**values)


def finetune_prompt(input_caption: str) -> str:
    """The paper's prompt: '{input}\\n##\\n'."""
    return render("finetune_prompt", input=input_caption)


def finetune_completion(edit: str, output: str) -> str:
    """The paper's completion: '{edit}\\n%%\\n{output}\\nEND'."""
    return render("finetune_completion", edit=edit, output=output)


def chat_messages(
    input_caption: str, edit: str | None = None, output: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for one caption: [system, user] for a request, plus the assistant's answer
    (the paper's completion) when `edit` and `output` are given (a fine-tune example)."""
    messages = [
        {"role": "system", "content": render("chat_system")},
        {"role": "user", "content": render("chat_user", input=input_caption)},
    ]
    if edit is not None and output is not None:
        messages.append({"role": "assistant", "content": finetune_completion(edit, output)})
    return messages


def completion_example(input_caption: str, edit: str, output: str) -> dict[str, Any]:
    """One line of a completion-format fine-tune file: {"prompt", "completion"}."""
    return {"prompt": finetune_prompt(input_caption), "completion": finetune_completion(edit, output)}


def chat_example(input_caption: str, edit: str, output: str) -> dict[str, Any]:
    """One line of a chat-format fine-tune file: {"messages": [system, user, assistant]}."""
    return {"messages": chat_messages(input_caption, edit, output)}


def templates_hash() -> str:
    return hashlib.sha1("\0".join(load_template(n) for n in TEMPLATE_NAMES).encode()).hexdigest()[:12]


def judge_messages(
    instruction: str, input_caption: str, output_caption: str, image_parts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The VLM judge's chat messages for one pair: the rubric (system), then the instruction and captions
    followed by the two images (``image_parts``: OpenAI ``image_url`` content parts, original first)."""
    text = render(
        "judge_user", instruction=instruction, input_caption=input_caption, output_caption=output_caption
    )
    return [
        {"role": "system", "content": render("judge_system")},
        {"role": "user", "content": [{"type": "text", "text": text}, *image_parts]},
    ]


def judge_templates_hash() -> str:
    return hashlib.sha1("\0".join(load_template(n) for n in JUDGE_TEMPLATE_NAMES).encode()).hexdigest()[:12]
