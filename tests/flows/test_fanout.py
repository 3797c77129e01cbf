"""The fan-out plan: blocks per stage, and a block ready exactly when the partitions it reads are done."""

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.layout import success_url
from tasks.registry import stage_hash


def _done(cfg, stage, pid):
    storage.write_json_atomic(success_url(cfg.output_root, stage, stage_hash(cfg, stage), pid), {"config_hash": stage_hash(cfg, stage),
                                                                         "outputs": {}})


def test_blocks_cover_every_partition_once_and_one_partition_stages_once(tmp_path):
    from flows.fanout import plan_blocks

    cfg = load_config("demo", [f"output_root={tmp_path}", "captions.num_partitions=5", "run.block_size=2"])
    blocks = plan_blocks(cfg)
    by_stage = {}
    for b in blocks:
        by_stage.setdefault(b.stage, []).append(b.partitions)
    assert by_stage["captions"] == by_stage["render"] == [[0, 1], [2, 3], [4]]
    assert by_stage["finetune"] == [[0]] and "train" not in by_stage


def test_a_block_is_ready_when_what_it_reads_is_done_under_this_config(tmp_path):
    from flows.fanout import Block, Progress

    cfg = load_config("demo", [f"output_root={tmp_path}", "captions.num_partitions=4"])
    progress = Progress(cfg)
    text = Block("text", [2, 3])
    assert not progress.inputs_ready(text)
    _done(cfg, "captions", 2)
    _done(cfg, "captions", 3)
    assert not progress.inputs_ready(text)  # the fine-tune too
    other = load_config("demo", [f"output_root={tmp_path}", "text.finetune_steps=7"])
    _done(other, "finetune", 0)  # another config's fine-tune does not count
    assert not progress.inputs_ready(text)
    _done(cfg, "finetune", 0)
    assert progress.inputs_ready(text) and not progress.inputs_ready(Block("text", [0, 1]))
    assert progress.pending("captions", [0, 1, 2, 3]) == [0, 1]
