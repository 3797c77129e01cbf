"""The stage contract, checked on every stage of the registry (tiny models, one partition, no Prefect).

One small run goes through every stage's own entry — `prepare`, `run(cfg, partition_id)`, `finalize`
— in registry order; then, on copies of it, each stage must: skip a re-run untouched; re-run when its
`_SUCCESS.json` is of another config; leave no marker after a crash mid-work (and finish on the next
run); refuse a stale upstream with a clear error, not retried, before touching anything. A new stage
in the registry is checked here without a new test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tasks import registry
from tasks.common.config import load_config
from tasks.common.contract import MissingInputError, PartitionRun
from tasks.common.layout import SUCCESS

pytestmark = pytest.mark.component

SMALL = [
    "captions.num_captions=6",
    "captions.num_partitions=1",
    "text.finetune_steps=150",
    "text.batch_size=3",
    "render.samples_per_triplet=2",
    "render.batch_samples=2",
    "render.steps=2",
    "render.keep.clip_image_threshold=-1",
    "render.keep.clip_direction_threshold=-1",
    "render.keep.clip_caption_threshold=-1",
    "train.steps=2",
    "train.batch_size=2",
    "train.sample_steps=2",
    "train.shuffle_buffer=4",
    "train.num_workers=0",
    "train.checkpoint_every=1",
]
STAGES = list(registry.STAGES)
STALE = "0000stale0000000"


def config(root: Path):
    return load_config("demo", [f"output_root={root}", *SMALL])


def run_partition(cfg, name: str) -> dict:
    return registry.entry(name)(cfg, 0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A whole run, every stage of the registry done through its own entry."""
    root = tmp_path_factory.mktemp("run")
    cfg = config(root)
    for name in registry.STAGES:
        registry.prepare(cfg, name)
        manifests = [registry.entry(name)(cfg, pid) for pid in registry.partition_ids(cfg, name)]
        assert all(not m["skipped"] for m in manifests)
        registry.finalize(cfg, name, manifests)
    assert json.loads(marker(root, "pack").read_text())["counts"]["out"] > 0
    return root


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    return root


def marker(root: Path, name: str) -> Path:
    if name == "train":  # its version follows from the index it trained on
        (found,) = (root / "train").glob("*/part-00000")
        return found / SUCCESS
    return Path(registry.partition_url(config(root), name)) / SUCCESS


def output_bytes(root: Path, name: str) -> dict[str, str]:
    folder = marker(root, name).parent
    names = json.loads(marker(root, name).read_text())["outputs"]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.parametrize("name", STAGES)
def test_a_finished_partition_is_skipped_untouched(finished, name):
    before = output_bytes(finished, name), marker(finished, name).read_bytes()
    manifest = run_partition(config(finished), name)
    assert manifest["skipped"]
    assert (output_bytes(finished, name), marker(finished, name).read_bytes()) == before


@pytest.mark.parametrize("name", STAGES)
def test_a_partition_of_another_config_is_run_again(copy, name):
    path = marker(copy, name)
    done = json.loads(path.read_text())
    path.write_text(json.dumps({**done, "config_hash": STALE}))
    manifest = run_partition(config(copy), name)
    assert not manifest["skipped"]
    assert json.loads(path.read_text())["config_hash"] == done["config_hash"]
    if name != "train":  # training's metrics carry timings; the chain writes the same bytes again
        assert output_bytes(copy, name) == {n: h for n, h in done["outputs"].items()}


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name", STAGES)
def test_a_crash_mid_work_leaves_no_marker_and_the_next_run_finishes(copy, name, monkeypatch):
    path = marker(copy, name)
    done = json.loads(path.read_text())
    path.unlink()
    others = {n: marker(copy, n).read_bytes() for n in STAGES if n != name}

    def crash(self, out_name):
        raise Crash(f"crash while registering {out_name}")

    with monkeypatch.context() as patch:
        patch.setattr(PartitionRun, "output", crash)
        with pytest.raises(Crash):
            run_partition(config(copy), name)
    assert not path.exists()
    assert {n: marker(copy, n).read_bytes() for n in others} == others  # nothing else touched
    manifest = run_partition(config(copy), name)
    assert not manifest["skipped"] and json.loads(path.read_text())["config_hash"] == done["config_hash"]


@pytest.mark.parametrize("name", [n for n, s in registry.STAGES.items() if s.reads])
def test_a_stale_upstream_is_a_clear_error_before_anything_is_touched(copy, name):
    stage = registry.get(name)
    upstream = stage.reads[0].name
    # training reads the run's shard index (the pack stage's finalize), the others their upstream partition
    stale = Path(registry.index_url(config(copy))) if name == "train" else marker(copy, upstream)
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config_hash": STALE}))
    own = marker(copy, name)
    own.write_text(json.dumps({**json.loads(own.read_text()), "config_hash": "0000older0000000"}))
    before = own.read_bytes(), output_bytes(copy, name)
    with pytest.raises(MissingInputError, match=rf"{upstream}.*another config.*{STALE}"):
        run_partition(config(copy), name)
    assert (own.read_bytes(), output_bytes(copy, name)) == before  # the finished work is still there


def test_a_copied_run_is_whole_where_it_lands(finished, copy):
    """Manifests and the shard index hold paths relative to the run: a copy (or a move) needs nothing redone."""
    from tasks.pack.index import read_index

    recorded = [p for p in copy.rglob("*.json") if str(finished) in p.read_text()]
    assert not recorded, f"absolute paths of the original run in {recorded}"
    assert all(run_partition(config(copy), name)["skipped"] for name in STAGES)
    shards = read_index(registry.index_url(config(copy)))["splits"]["train"]["shards"]
    assert shards and all(url.startswith(str(copy)) and Path(url).is_file() for url in shards)
