"""Integration tier: `editforge train` launching 2 training processes on the CPU (torchrun, gloo) — the same
samples, losses and weights as 1 process at the same total batch; a SIGKILL of the whole run inside an
accelerate checkpoint write, placed by a count of files written, then a resume: the bytes of the
uninterrupted run; two launchers on loopback as two nodes writing one model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAULTS = Path(__file__).resolve().parent / "train_faults"  # sitecustomize.py: the kill by count
EDITFORGE = Path(sys.executable).parent / "editforge"
# 12 samples in shards of 5, 5 and 2 (uneven); 4 steps of a total batch of 4 = 16 samples: past one epoch
SMALL = [
    "train.steps=4",
    "train.batch_size=2",
    "train.total_batch_size=4",
    "train.checkpoint_every=2",
    "train.sample_steps=2",
    "train.shuffle_buffer=4",
    "train.log_samples=true",
]
UNET = "model/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real Prefect server for every run of this module (each `editforge train` would start its own)."""
    from flows.local_cluster import free_port, wait_http

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [str(EDITFORGE.parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> str:
    from tasks.train.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        str(tmp_path_factory.mktemp("shards")), train_samples=12, val_samples=2, per_shard=5
    )


def _train(
    env: dict, index: str, root: Path, *overrides: str, node_rank: int = 0, extra_env: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    """`editforge train` on the demo preset and `index` into `root`; (process, its log file)."""
    args = [str(EDITFORGE), "train", "--preset", "demo", "--index", index, "--set", f"output_root={root}"]
    for item in (*SMALL, *overrides):
        args += ["--set", item]
    if node_rank:
        args += ["--node-rank", str(node_rank)]
    log = root.parent / f"{root.name}-node{node_rank}-{uuid.uuid4().hex[:6]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**env, **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def _wait(run: tuple[subprocess.Popen, Path]) -> tuple[int, str]:
    proc, log = run
    proc.wait(timeout=600)
    return proc.returncode, log.read_text()


def _finish(run: tuple[subprocess.Popen, Path]) -> str:
    rc, out = _wait(run)
    assert rc == 0, out[-4000:]
    return out


def _partition(root: Path) -> Path:
    (marker,) = root.glob("train/*/part-00000/_SUCCESS.json")
    return marker.parent


def _outputs(root: Path) -> dict[str, bytes]:
    """Every output the manifest lists, by name; metrics.json without its clock readings."""
    part = _partition(root)
    found = {}
    for name in json.loads((part / "_SUCCESS.json").read_text())["outputs"]:
        data = (part / name).read_bytes()
        if name == "metrics.json":
            metrics = json.loads(data)
            metrics["summary"] = {
                k: v
                for k, v in metrics["summary"].items()
                if k not in ("steps_per_s", "wall_time_s", "resumed_from")
            }
            metrics["history"] = [{k: v for k, v in h.items() if k != "time_s"} for h in metrics["history"]]
            data = json.dumps(metrics, sort_keys=True).encode()
        found[name] = data
    return found


def _history(root: Path) -> list[dict]:
    return json.loads((_partition(root) / "metrics.json").read_text())["history"]


def _sample_log(root: Path, rank: int) -> list[dict]:
    (path,) = root.glob(f"train/_work/*/samples-rank-{rank:05d}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(index, tmp_path_factory) -> Path:
    """The reference: 1 process, 2 micro-batches of 2 per step (in this process, as the flow runs it)."""
    from tasks.common.config import load_config
    from tasks.train.stage import run

    root = tmp_path_factory.mktemp("one-process")
    run(load_config("demo", [f"output_root={root}", *SMALL, "train.processes=1"]), index_url=index)
    return root


@pytest.fixture(scope="module")
def two_processes(server, index, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("two-processes")
    return root, _finish(_train(server, index, root, "train.processes=2"))


def test_two_processes_train_the_samples_losses_and_weights_of_one(one_process, two_processes):
    root, out = two_processes
    assert "total batch 4 = 2 × 1 × 2 processes" in out
    assert "launching 2 process(es) on node 0 of 1" in out
    summary = json.loads((_partition(root) / "_SUCCESS.json").read_text())["figures"]["train"]
    assert summary["processes"] == 2 and summary["samples_seen"] == 16

    # each step: rank 0 and rank 1 trained one micro-batch of 2 each, disjoint, together the 1-process step's 4
    single = _sample_log(one_process, 0)
    ranks = [_sample_log(root, 0), _sample_log(root, 1)]
    for step in range(1, 5):
        shares = [[k for line in log if line["step"] == step for k in line["keys"]] for log in ranks]
        assert [len(s) for s in shares] == [2, 2] and not set(shares[0]) & set(shares[1])
        assert Counter(shares[0] + shares[1]) == Counter(
            k for line in single if line["step"] == step for k in line["keys"]
        )
    # the first epoch (12 samples in 3 uneven shards) split 6 and 6, every sample once
    first = [[k for line in log for k in line["keys"]][:6] for log in ranks]
    epoch = [k for line in single for k in line["keys"]][:12]
    assert len(set(epoch)) == 12 and sorted(first[0] + first[1]) == sorted(epoch)

    # the same samples with the same noise: losses and weights equal up to float rounding (measured: bitwise
    # on this CPU, where halving is exact and two ranks sum in one addition)
    for a, b in zip(_history(root), _history(one_process), strict=True):
        assert (a["step"], a["samples"], a["epoch"]) == (b["step"], b["samples"], b["epoch"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    two, one = load_file(str(_partition(root) / UNET)), load_file(str(_partition(one_process) / UNET))
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def _pids_with(token: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and f"EDITFORGE_TEST_TOKEN={token}".encode() in (entry / "environ").read_bytes()
            ):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_a_kill_inside_a_checkpoint_write_of_two_processes_resumes_to_the_uninterrupted_bytes(
    server, index, two_processes, tmp_path
):
    root = tmp_path / "killed"
    token = uuid.uuid4().hex
    # rank 0 writes 5 files per checkpoint (model, optimizer, scheduler, RNG states, EMA): the 7th is the
    # second file of checkpoint 4, so the run dies inside that save and resumes from checkpoint 2
    fault = {
        "PYTHONPATH": str(FAULTS),
        "EDITFORGE_TEST_KILL_AT_CHECKPOINT_WRITE": "7",
        "EDITFORGE_TEST_TOKEN": token,
    }
    rc, out = _wait(_train(server, index, root, "train.processes=2", extra_env=fault))
    assert rc == -signal.SIGKILL, out[-4000:]
    assert _pids_with(token) == []  # nothing of the run is left
    (work,) = root.glob("train/_work/*")
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        ".tmp-checkpoint-00000004",
        "checkpoint-00000002",
    ]
    assert not list(root.glob("train/*/part-00000/_SUCCESS.json"))

    out = _finish(_train(server, index, root, "train.processes=2"))
    assert "resumed from checkpoint-00000002 (step 2 of 4, 2 process(es))" in out
    assert _outputs(root) == _outputs(two_processes[0])
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        "checkpoint-00000002",
        "checkpoint-00000004",
    ]


def test_two_nodes_on_loopback_train_one_model(server, index, two_processes, tmp_path):
    """Two launchers as two machines of one process each (torchrun's static rendezvous on 127.0.0.1): node 0 is
    the flow run (lease, contract), node 1 only joins; one model, the 2-process one."""
    from flows.local_cluster import free_port

    root = tmp_path / "two-nodes"
    nodes = ["train.processes=1", "train.nodes=2", f"train.rdzv_endpoint=127.0.0.1:{free_port()}"]
    node0 = _train(server, index, root, *nodes)
    node1 = _train(server, index, root, *nodes, node_rank=1)
    out0, out1 = _finish(node0), _finish(node1)
    assert "total batch 4 = 2 × 1 × 2 processes (2 nodes × 1)" in out0
    assert "node 1 of 2" in out1 and "node 1 done" in out1
    assert "Flow run" not in out1  # node 1 started no flow run
    assert len(list(root.glob("train/*/part-00000/_SUCCESS.json"))) == 1
    assert _outputs(root)[UNET] == _outputs(two_processes[0])[UNET]
