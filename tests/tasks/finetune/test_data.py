import json

from prompts.templates import (
    chat_example,
    chat_messages,
    finetune_completion,
    finetune_prompt,
    templates_hash,
)
from seed_annotations.schema import default_triplets_path, load_triplets, split_train_val
from tasks.common.config import load_config
from tasks.finetune.data import finetune_files
from tasks.text.openai_api import caption_seed, request_body


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_both_formats_share_the_split_and_the_paper_completion():
    triplets = load_triplets(default_triplets_path())
    train, val = split_train_val(triplets, 0.1, 0)
    files = finetune_files(train, val)
    assert sorted(files) == [
        "train.chat.jsonl",
        "train.completion.jsonl",
        "val.chat.jsonl",
        "val.completion.jsonl",
    ]
    comp, chat = _lines(files["train.completion.jsonl"]), _lines(files["train.chat.jsonl"])
    assert len(comp) == len(chat) == len(train) and len(_lines(files["val.chat.jsonl"])) == len(val) > 0
    t = train[0]
    assert comp[0] == {"prompt": f"{t.input}\n##\n", "completion": f"{t.edit}\n%%\n{t.output}\nEND"}
    roles = [m["role"] for m in chat[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert chat[0]["messages"][1]["content"].endswith(t.input)
    assert chat[0]["messages"][2]["content"] == finetune_completion(t.edit, t.output)
    # no validation caption leaks into training
    assert not {x.input for x in val} & {x.input for x in train}


def test_generation_requests_use_the_same_templates():
    cfg = load_config("demo", ["text.openai.endpoint=chat"])
    body = request_body(cfg.text, "m", "abc", "a cat")
    assert (
        body["messages"]
        == chat_messages("a cat")
        == chat_example("a cat", "make it a dog", "a dog")["messages"][:2]
    )
    assert body["seed"] == caption_seed(cfg.text.seed, "abc") and body["stop"] == ["\nEND"]
    assert (body["temperature"], body["top_p"], body["frequency_penalty"]) == (0.7, 1.0, 0.1)
    comp = request_body(load_config("demo", ["text.openai.endpoint=completions"]).text, "m", "abc", "a cat")
    assert comp["prompt"] == finetune_prompt("a cat") and comp["max_tokens"] == 64
    assert len(templates_hash()) == 12


def test_operational_settings_do_not_change_the_text_hash():
    base = load_config("demo")
    faster = load_config("demo", ["text.openai.concurrency=256", "text.openai.max_retries=2"])
    assert base.text.output_fields() == faster.text.output_fields()
    assert "concurrency" not in base.text.output_fields()["openai"]
