"""The training stage under the contract: outputs, manifest, hashes, skip, re-sampling without re-training."""

import json

import pytest
from PIL import Image

from tasks.common.config import load_config
from tasks.registry import stage_hash
from tasks.train.stage import loss_curve, train_hash, weights_key
from tasks.train.stage import run as run_train
from tasks.train.synthetic import write_synthetic_shards

pytestmark = pytest.mark.component

SMALL = [
    "train.steps=2",
    "train.batch_size=2",
    "train.checkpoint_every=1",
    "train.sample_steps=2",
    "train.shuffle_buffer=4",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_synthetic_shards(
        str(tmp_path_factory.mktemp("shards")), train_samples=8, val_samples=2, per_shard=4
    )


def test_hashes_ignore_operational_settings_and_split_sampling_from_weights(index):
    from tasks.common import storage

    idx = storage.read_json(index)
    base = load_config("demo")
    ops = load_config("demo", ["train.checkpoint_every=3", "train.log_every=1", "train.device=cuda"])
    sampling = load_config("demo", ["train.guidance_scale=5.0"])
    weights = load_config("demo", ["train.learning_rate=0.001"])
    assert train_hash(ops, idx) == train_hash(base, idx) and weights_key(ops, idx) == weights_key(base, idx)
    assert train_hash(sampling, idx) != train_hash(base, idx) and weights_key(sampling, idx) == weights_key(
        base, idx
    )
    assert weights_key(weights, idx) != weights_key(base, idx)
    other = {**idx, "config_hash": "other-data"}
    assert weights_key(base, other) != weights_key(base, idx)
    # where it runs is not what it trains: the total batch is hashed, not how the processes make it up
    where = load_config(
        "demo", ["train.batch_size=2", "train.processes=2", "train.num_workers=3", "train.nodes=1"]
    )
    assert weights_key(where, idx) == weights_key(load_config("demo", ["train.batch_size=2"]), idx)
    assert weights_key(load_config("demo", ["train.total_batch_size=8"]), idx) != weights_key(base, idx)
    assert weights_key(load_config("demo", ["train.batch_size=2"]), idx) != weights_key(
        base, idx
    )  # other draws
    # the generation chain's hashes do not depend on the train section
    assert stage_hash(weights, "pack") == stage_hash(base, "pack")


def test_stage_writes_model_metrics_sample_and_skips_or_resamples(index, tmp_path):
    cfg = load_config("demo", [f"output_root={tmp_path}", *SMALL])
    manifest = run_train(cfg, index_url=index)
    part = tmp_path / manifest["path"]
    assert not manifest["skipped"] and manifest["figures"]["train"]["steps"] == 2
    success = json.loads((part / "_SUCCESS.json").read_text())
    assert success["config_hash"] == manifest["config_hash"] and success["counts"]["steps"] == 2
    assert {
        "model/model_index.json",
        "model/unet/diffusion_pytorch_model.safetensors",
        "metrics.json",
        "sample_edit.png",
    } <= set(success["outputs"])
    assert Image.open(part / "sample_edit.png").size == (3 * 64, 64)
    metrics = json.loads((part / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert [r["step"] for r in manifest["figures"]["loss_curve"]] == [1, 2]

    assert run_train(cfg, index_url=index)["skipped"]

    # only the sample-edit settings changed: re-sampled from the final checkpoint, no new training step
    resampled = run_train(
        load_config("demo", [f"output_root={tmp_path}", *SMALL, "train.guidance_scale=3.0"]), index_url=index
    )
    own = resampled["figures"]
    assert not resampled["skipped"] and own["train"]["resumed_from"] == 2
    assert own["train"]["steps"] == 2 and own["sample"]["guidance_scale"] == 3.0


def test_missing_index_names_the_generate_flow(tmp_path):
    cfg = load_config("demo", [f"output_root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="flows.generate"):
        run_train(cfg)


def test_loss_curve_is_bounded():
    history = [{"step": i, "loss": 1.0 / i, "lr": 1e-4, "epoch": 0} for i in range(1, 1001)]
    rows = loss_curve(history, max_points=100)
    assert len(rows) == 100 and rows[-1]["step"] == 1000
    assert rows[0]["loss"] == pytest.approx(sum(1.0 / i for i in range(1, 11)) / 10, rel=1e-5)
