"""Integration tier: a real `prefect server`, a process work pool, two workers, `prefect deployment run`.

Deploys from `infra/prefect.yaml` (so the shipped deployment file is what is tested), runs the whole
DAG through a deployment, then two render runs on different partitions at once — split between the
two workers — and checks their outputs. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.registry import stage_hash

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["captions.num_captions=6", "text.finetune_steps=150", "text.batch_size=3", "render.samples_per_triplet=2",
         "render.batch_samples=2", "render.steps=2", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "EDITFORGE_HOME": str(ROOT), "PYTHONUNBUFFERED": "1",
           "PREFECT_UI_ENABLED": "false"}
    logs = home / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)]
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "editforge-cpu", "--type", "process",
                        "--base-job-template", str(ROOT / "infra/work-pools/process.json")],
                       env=env, check=True, capture_output=True, timeout=120)
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "editforge-cpu", "--name", f"worker-{i}"],
                env=env, cwd=ROOT, stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT))
        for name in ("demo", "paper-render"):
            out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                                  str(ROOT / "infra/prefect.yaml"), "--name", name, "--pool", "editforge-cpu"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stdout + out.stderr
        yield env, logs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _run(env, deployment: str, params: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params),
                           "--watch", "--watch-interval", "3", "--watch-timeout", str(timeout)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 60)


def test_deployment_runs_dag_and_workers_split_partitions(server, tmp_path):
    env, logs = server
    overrides = [f"output_root={tmp_path}", "name=itest", *SMALL]
    out = _run(env, "editforge-generate/demo", {"preset": "demo", "overrides": overrides})
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout + out.stderr + \
        "".join(p.read_text()[-3000:] for p in logs.iterdir())
    assert (tmp_path / "pack" / "index.json").exists()

    # two render runs with a new setting, one partition each, submitted together
    changed = [*overrides, "render.steps=3"]
    runs = [subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "editforge-render/paper-render", "--params",
                              json.dumps({"preset": "demo", "overrides": changed, "partitions": [pid]}),
                              "--watch", "--watch-interval", "3", "--watch-timeout", "500"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in (0, 1)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert all(r.returncode == 0 and "Completed" in o for r, o in zip(runs, outputs)), outputs
    from tasks.common.config import load_config
    from tasks.common.contract import partition_dir, read_success

    want = stage_hash(load_config("demo", changed), "render")
    assert [read_success(partition_dir(str(tmp_path), "render", pid))["config_hash"] for pid in (0, 1)] == [want] * 2
    # both workers are registered with the pool and polling (either may pick up either run)
    listing = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", "editforge-cpu"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    workers = subprocess.run([str(BIN / "python"), "-c", WORKERS_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=60)
    assert sorted(json.loads(workers.stdout)) == ["worker-0", "worker-1"], workers.stderr


WORKERS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(json.dumps([w.name for w in c.read_workers_for_work_pool("editforge-cpu") if w.status.value == "ONLINE"]))
"""


def test_every_work_pool_template_is_created_on_the_server(server):
    env, _ = server
    for path in sorted((ROOT / "infra" / "work-pools").glob("*.json")):
        kind = "kubernetes" if "kubernetes" in path.name else "process"
        out = subprocess.run([str(BIN / "prefect"), "work-pool", "create", f"template-{path.stem}", "--type", kind,
                              "--base-job-template", str(path)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, path.name + out.stdout + out.stderr
        shown = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", f"template-{path.stem}"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and kind in shown.stdout
