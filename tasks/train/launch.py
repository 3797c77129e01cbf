"""Training on several processes and nodes: the training flow starts its own workers with torchrun.

    flow run (node 0) ── lease, contract ──► torchrun --nproc-per-node P ──► P x python -m tasks.train.worker
    node K >= 1: editforge train --node-rank K ──► torchrun --node-rank K ──► P x worker   (no lease, no contract)

`train.processes` (per node; `auto`: every visible GPU, 1 on the CPU) times `train.nodes` processes train
together (`tasks.train.loop`); one process in all trains inside the flow's own process, as before. The
flow run holds the partition lease, launches torchrun, waits, and writes the contract's outputs from the
work folder; the workers write only into the work folder, and of them only the main process (global
rank 0, on node 0) writes checkpoints, the model and `result.json`. One node: torchrun's standalone
rendezvous on a free loopback port. Several: torchrun's static rendezvous at `train.rdzv_endpoint` (or
`$EDITFORGE_RDZV_ENDPOINT`), node 0 being the flow's, so rank 0 is where the lease is. A worker that fails
leaves its error in the work folder; the launcher raises it with the worker's message (permanent when
the worker's error was, so the task is not retried for a bad setting). Workers stop when their launcher
is gone (never two trainings in one work folder).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.common.config import ModelsConfig, TrainConfig
from tasks.common.errors import PermanentError

log = logging.getLogger("editforge")
RESULT_FILE = "result.json"
FAILURES = "failures"
LAUNCHER_ENV = "EDITFORGE_TRAIN_LAUNCHER_PID"
RDZV_ENV = "EDITFORGE_RDZV_ENDPOINT"
# what a launcher (torchrun, accelerate launch, mpirun via accelerate) sets in each process it starts
LAUNCHED_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


class LaunchedError(PermanentError):
    """The training flow was itself started by a launcher (one flow run per rank would fight for the lease)."""


class WorkerError(RuntimeError):
    """A training worker failed (not a setting or input problem, as far as its error says)."""


class PermanentWorkerError(WorkerError, PermanentError):
    """A training worker failed on a setting or input problem: running it again would fail again."""


def refuse_launcher(environ: dict[str, str] | None = None) -> None:
    """LaunchedError when this process was started by torchrun/accelerate launch: the flow launches its workers."""
    env = os.environ if environ is None else environ
    world = env.get("WORLD_SIZE", "1")
    if not any(name in env for name in LAUNCHED_ENV) and world in ("", "1"):
        return
    raise LaunchedError(
        f"editforge train was started by a launcher (WORLD_SIZE={world}, RANK={env.get('RANK', '?')}): the training "
        "flow starts its own workers — run it once, without accelerate launch/torchrun, with "
        f"--set train.processes={world if world not in ('', '1') else 'N'} (GPUs on this node; 'auto': all of them), "
        "and for several machines train.nodes, train.rdzv_endpoint and `editforge train --node-rank K` on the others "
        "(docs/training.md)")


def resolve_processes(cfg: TrainConfig) -> int:
    """`train.processes` as a number: `auto` is every visible GPU (1 on the CPU or without one)."""
    if cfg.processes != "auto":
        return cfg.processes
    if cfg.device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def world_size(cfg: TrainConfig) -> int:
    """Processes in all: per node times nodes (the accumulation is derived for this many)."""
    return resolve_processes(cfg) * cfg.nodes


def check(cfg: TrainConfig) -> int:
    """The world size after checking what the config cannot check alone (ValueError naming the setting)."""
    world = world_size(cfg)
    cfg.accumulation(world)
    if world > 1 and cfg.device.startswith("cuda:"):
        raise ValueError(f"train.device={cfg.device} names one GPU, but {world} processes train: use train.device=auto "
                         "or cuda (process k of a node takes GPU k), or train.processes=1")
    if cfg.nodes > 1:
        rdzv_endpoint(cfg)
    return world


def rdzv_endpoint(cfg: TrainConfig) -> tuple[str, int]:
    """(host, port) of node 0 for `train.nodes` > 1: `train.rdzv_endpoint`, else `$EDITFORGE_RDZV_ENDPOINT`."""
    value = cfg.rdzv_endpoint or os.environ.get(RDZV_ENV, "")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"train.nodes={cfg.nodes} needs train.rdzv_endpoint (or ${RDZV_ENV}) as host:port of node 0, "
                         f"where the nodes meet (got {value!r}), e.g. --set train.rdzv_endpoint=10.0.0.5:29500")
    return host, int(port)


def write_spec(workdir: Path, node_rank: int, cfg: TrainConfig, models: ModelsConfig, train_urls: list[str],
               run_key: str) -> Path:
    """What every worker of this node trains: the settings, the shards, the work folder, the weights key."""
    spec = {"train": cfg.model_dump(mode="json"), "models": models.model_dump(mode="json"), "train_urls": train_urls,
            "workdir": str(workdir), "run_key": run_key}
    path = workdir / f"launch-node-{node_rank}.json"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return path


def read_spec(path: str | Path) -> dict[str, Any]:
    spec = json.loads(Path(path).read_text())
    return {**spec, "train": TrainConfig.model_validate(spec["train"]), "models": ModelsConfig.model_validate(spec["models"]),
            "workdir": Path(spec["workdir"])}


def torchrun_command(cfg: TrainConfig, spec: Path, node_rank: int = 0) -> list[str]:
    """`python -m torch.distributed.run ... -m tasks.train.worker SPEC` for this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(resolve_processes(cfg)),
           "--max-restarts", "0"]
    if cfg.nodes == 1:
        cmd += ["--standalone"]
    else:
        host, port = rdzv_endpoint(cfg)
        cmd += ["--nnodes", str(cfg.nodes), "--node-rank", str(node_rank), "--master-addr", host,
                "--master-port", str(port)]
    return [*cmd, "-m", "tasks.train.worker", str(spec)]


def run_workers(cfg: TrainConfig, models: ModelsConfig, train_urls: list[str], workdir: Path, run_key: str,
                node_rank: int = 0, logger: logging.Logger | None = None) -> None:
    """Launch this node's workers and wait for them; their output goes to `logger`. A failure raises the first
    failed worker's error (PermanentWorkerError when it was a setting or input problem)."""
    logger = logger or log
    processes = resolve_processes(cfg)
    ranks = range(node_rank * processes, (node_rank + 1) * processes)
    for rank in ranks:
        failure_file(workdir, rank).unlink(missing_ok=True)
    if node_rank == 0:
        (workdir / RESULT_FILE).unlink(missing_ok=True)
    cmd = torchrun_command(cfg, write_spec(workdir, node_rank, cfg, models, train_urls, run_key), node_rank)
    logger.info("train: launching %d process(es) on node %d of %d: %s", processes, node_rank, cfg.nodes,
                " ".join(cmd[1:]))
    env = {**os.environ, LAUNCHER_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    try:
        for line in proc.stdout:
            if line.strip():
                logger.info("%s", line.rstrip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # the launcher was interrupted: its workers go with it
            proc.terminate()
            proc.wait()
    if rc:
        raise _failure(workdir, range(world_size(cfg)), rc)


def failure_file(workdir: Path, rank: int) -> Path:
    return workdir / FAILURES / f"rank-{rank:05d}.json"


def record_failure(workdir: Path, rank: int, err: BaseException) -> None:
    """A worker's error for its launcher: message, type and whether a retry could help."""
    from tasks.common.errors import is_permanent

    path = failure_file(workdir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "type": type(err).__name__, "message": str(err),
                                "permanent": is_permanent(err)}))


def _failure(workdir: Path, ranks: range, rc: int) -> WorkerError:
    for rank in ranks:
        path = failure_file(workdir, rank)
        if path.is_file():
            found = json.loads(path.read_text())
            kind = PermanentWorkerError if found["permanent"] else WorkerError
            return kind(f"training process {found['rank']} failed: {found['message']} ({found['type']})")
    return WorkerError(f"the training processes ended with exit code {rc} before reporting an error (killed, out of "
                       "memory, a lost node or connection: see the log above); a new run resumes from the last checkpoint")


def read_result(workdir: Path):
    """The main process's TrainResult (`result.json`)."""
    from tasks.train.loop import TrainResult

    path = workdir / RESULT_FILE
    if not path.is_file():
        raise WorkerError(f"the training processes ended without writing {path}")
    return TrainResult.from_json(json.loads(path.read_text()))
