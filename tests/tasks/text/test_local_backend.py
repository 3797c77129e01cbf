"""The local backend on the tiny LM (CPU): LoRA trains only adapter weights; the stage runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from text_helpers import make_captions, write_captions

from seed_annotations.schema import default_triplets_path, load_triplets
from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.contract import Stats
from tasks.common.models import load_lm
from tasks.finetune.local import apply_lora, finetune

pytestmark = pytest.mark.component


def test_lora_changes_only_the_adapter_weights():
    cfg = load_config("demo", ["text.finetune_method=lora", "text.lora_r=4", "text.lora_alpha=8"])
    model, tokenizer = load_lm("tiny")
    model = apply_lora(model, cfg.text)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    figures = finetune(
        model,
        tokenizer,
        load_triplets(default_triplets_path())[:32],
        [],
        steps=3,
        batch_size=4,
        lr=1e-2,
        seed=0,
        stats=Stats(),
    )
    assert figures["train_examples"] == 32
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: it moved, so the adapter learned


def test_local_stage_with_lora_writes_one_row_per_caption(tmp_path):
    from tasks.finetune.stage import run as run_finetune
    from tasks.text.stage import run as run_text

    cfg = load_config(
        "demo",
        [
            f"output_root={tmp_path}",
            "text.finetune_method=lora",
            "text.finetune_steps=2",
            "text.finetune_batch_size=4",
            "text.max_new_tokens=16",
            "text.batch_size=4",
        ],
    )
    captions = make_captions(6)
    write_captions(str(tmp_path), 0, captions)
    ft = run_finetune(cfg)
    model_dir = tmp_path / ft["path"] / "model"
    assert (model_dir / "adapter_config.json").exists() and not (model_dir / "model.safetensors").exists()
    summary = ft["figures"]["finetune"]
    assert summary["method"] == "lora" and summary["trainable_parameters"] < 50_000
    assert {"train.chat.jsonl", "val.completion.jsonl"} <= set(ft["outputs"])
    manifest = run_text(cfg, 0)
    df = storage.read_parquet(str(tmp_path / manifest["path"] / "triplets.parquet"))
    assert sorted(df["caption_id"]) == sorted(captions["caption_id"]) and list(df["caption_id"]) == sorted(
        df["caption_id"]
    )
    assert manifest["counts"]["out"] + sum(manifest["rejected"].values()) == 6
    assert (
        set(df["status"]) <= {"ok", "rejected"}
        and df.loc[df.status == "rejected", "reject_reason"].notna().all()
    )
    assert json.loads(json.dumps(manifest))["counts"]["batches_generated"] == 2


def test_place_puts_the_lm_on_text_device_in_float32_on_cpu():
    from tasks.common.config import TextConfig
    from tasks.finetune.local import place

    model, _ = load_lm("tiny")
    placed = place(model, TextConfig(device="cpu", dtype="bfloat16"))  # half precision applies on CUDA only
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert {p.dtype for p in placed.parameters()} == {torch.float32}


class Killed(RuntimeError):
    pass


def test_a_killed_fine_tune_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    from tasks.finetune.local import FinetuneCheckpoint

    seeds = load_triplets(default_triplets_path())[:24]

    def tune(folder, kill_at=None):
        torch.manual_seed(123)  # whatever the process did before: the fine-tune seeds itself
        model, tokenizer = load_lm("tiny")

        def progress(step, loss):
            if step == kill_at:
                raise Killed(step)

        figures = finetune(
            model,
            tokenizer,
            seeds,
            seeds[:4],
            steps=12,
            batch_size=4,
            lr=1e-3,
            seed=0,
            stats=Stats(),
            progress=progress,
            checkpoint=FinetuneCheckpoint(str(folder), every=5),
        )
        return model, figures

    reference, ref_figures = tune(tmp_path / "clean")
    with pytest.raises(Killed):
        tune(tmp_path / "killed", kill_at=7)  # after the checkpoint at step 5
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["step"] == 5
    resumed, figures = tune(tmp_path / "killed")
    assert figures == ref_figures
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def _local_cfg(root, *overrides):
    # the untrained tiny LM (0 fine-tune steps) writes noise: every completion is rejected, so every
    # caption takes all its tries
    return load_config(
        "demo",
        [
            f"output_root={root}",
            "text.finetune_steps=0",
            "text.max_new_tokens=12",
            "text.batch_size=4",
            *overrides,
        ],
    )


def _run_local(cfg, captions):
    from tasks.finetune.stage import run as run_finetune
    from tasks.text.stage import run as run_text

    write_captions(cfg.output_root, 0, captions)
    run_finetune(cfg)
    manifest = run_text(cfg, 0)
    return manifest, storage.read_parquet(f"{cfg.output_root}/{manifest['path']}/triplets.parquet")


def test_local_retries_up_to_max_attempts_with_each_try_counted(tmp_path):
    from tasks.text.format import RETRIED

    captions = make_captions(6)
    manifest, table = _run_local(_local_cfg(tmp_path / "three", "text.max_attempts=3"), captions)
    assert list(table["caption_id"]) == sorted(captions["caption_id"])
    rejected = table[table.status == "rejected"]
    assert len(rejected) and (rejected["attempt"] == 3).all()  # given up after the third try, not before
    assert (table.loc[table.status == "ok", "attempt"] >= 1).all()
    for earlier, n in zip(table["earlier_rejections"], table["attempt"]):
        reasons = earlier.split(";") if earlier else []
        assert len(reasons) == n - 1 and set(reasons) <= RETRIED
    counts = manifest["counts"]
    for k in (1, 2, 3):  # every caption still rejected after try k-1 was tried a k-th time, each try counted
        tried = (table["attempt"] >= k).sum()
        assert (
            sum(v for name, v in counts.items() if name.startswith(f"attempt_{k}_"))
            + counts.get(f"accepted_attempt_{k}", 0)
            == tried
        )
    assert counts["generation_attempts"] == table["attempt"].sum()

    # each try samples with its own seed: the third try's answers are not the first's
    _, once = _run_local(_local_cfg(tmp_path / "one"), captions)
    assert set(once["attempt"]) == {1}
    thrice = table.set_index("caption_id")["raw_completion"]
    first = once.set_index("caption_id")["raw_completion"]
    retried = table.loc[table["attempt"] == 3, "caption_id"]
    assert sum(thrice[c] != first[c] for c in retried) >= len(retried) - 1


def test_local_retries_resume_at_a_batch_boundary_with_the_same_bytes(tmp_path, monkeypatch):
    from tasks.common.contract import Checkpoint
    from tasks.text.stage import run as run_text

    captions = make_captions(10)  # batches of 4, 4, 2
    reference, _ = _run_local(_local_cfg(tmp_path / "clean", "text.max_attempts=3"), captions)
    cfg = _local_cfg(tmp_path / "killed", "text.max_attempts=3")
    append, calls = Checkpoint.append, []

    def killed_after_the_first_batch(self, batch_id, df):
        append(self, batch_id, df)
        calls.append(batch_id)
        raise Killed("after the first batch's checkpoint")

    monkeypatch.setattr(Checkpoint, "append", killed_after_the_first_batch)
    with pytest.raises(Killed):
        _run_local(cfg, captions)
    monkeypatch.setattr(Checkpoint, "append", append)
    manifest = run_text(cfg, 0)
    assert len(calls) == 1 and manifest["counts"]["batches_generated"] == 2  # the first batch was not redone
    path = "triplets.parquet"
    assert (tmp_path / "killed" / manifest["path"] / path).read_bytes() == (
        tmp_path / "clean" / reference["path"] / path
    ).read_bytes()
    assert manifest["rejected"] == reference["rejected"]
    assert {k: v for k, v in manifest["counts"].items() if k.startswith("attempt_")} == {
        k: v for k, v in reference["counts"].items() if k.startswith("attempt_")
    }
