"""A Prefect cluster on one box, on 127.0.0.1: a real `prefect server`, the three process pools and every
deployment of infra/prefect.yaml as `make deploy` makes them (flows/deploy.py), and workers (`--limit 1`):
one on the driver pool for the `editforge-generate` runs, CPU-pool and GPU-pool ones for the stages.

What the integration tests and `bench/fanout.py` run against (the manual equivalent, and what a test runs
as written, is infra/walkthrough.sh: `make server`, `make deploy`, `make worker`); everything it starts is
stopped when the context ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("captions", "finetune", "text", "render", "judge", "filter", "pack")
DRIVER_POOL, CPU_POOL, GPU_POOL = "editforge-driver", "editforge-cpu", "editforge-gpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class Cluster:
    env: dict[str, str]
    logs: Path
    url: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)


@contextmanager
def prefect_cluster(home: Path, workers: int, gpu_workers: int = 0, extra_env: dict[str, str] | None = None,
                    ui: bool = False, driver_workers: int = 1, gpu_limit: int = 0) -> Iterator[Cluster]:
    """Start the server (state under ``home``; with ``ui`` its web UI at ``Cluster.url``), the pools,
    ``driver_workers`` workers on the driver pool (`driver-<i>`), ``workers`` on the CPU pool (`worker-<i>`)
    and ``gpu_workers`` on the GPU one (`gpu-worker-<i>`), and deploy everything in infra/prefect.yaml
    in one command. ``gpu_limit``: the `editforge-gpu` tag's concurrency limit (0: none)."""
    from flows.deploy import create_pools, deploy_all

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONUNBUFFERED": "1",
           "PREFECT_UI_ENABLED": "true" if ui else "false", **(extra_env or {})}
    env.pop("EDITFORGE_HOME", None)  # the deployments find the code where the worker runs (flows/deploy_steps.py)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)]
    cluster = Cluster(env, logs, url=f"http://127.0.0.1:{port}")
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        create_pools(env, gpus=gpu_limit, echo=False)  # a single box: process pools (docs/cluster.md)
        for pool, count, prefix in ((DRIVER_POOL, driver_workers, "driver"), (CPU_POOL, workers, "worker"),
                                    (GPU_POOL, gpu_workers, "gpu-worker")):
            for i in range(count):
                cluster.workers.append(subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{prefix}-{i}",
                     "--limit", "1"], env=env, cwd=home, stdout=open(logs / f"{prefix}-{i}.log", "w"),
                    stderr=subprocess.STDOUT))
        procs += cluster.workers
        deploy_all(env, echo=False)
        yield cluster
    finally:  # the workers first, then the server; a Prefect worker takes its time to shut down: 15 s in all
        for group in (procs[1:], procs[:1]):
            for p in group:
                p.terminate()
            deadline = time.monotonic() + 15
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
