"""Prompt templates live as text files beside this module; variables are named `{like_this}`.

The same templates render the fine-tune data and the generation requests, so a change to a template
changes both (and the config hash of every stage that uses it).
"""

from __future__ import annotations

import hashlib
import string
from functools import lru_cache
from importlib import resources

STOP_SEQUENCE = "\nEND"
EDIT_OUTPUT_SEPARATOR = "\n%%\n"


@lru_cache(maxsize=None)
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


def templates_hash() -> str:
    names = ["finetune_prompt", "finetune_completion", "chat_system"]
    return hashlib.sha1("\0".join(load_template(n) for n in names).encode()).hexdigest()[:12]
