"""Integration tier: the fan-out deployment run against a Prefect server on a real PostgreSQL.

A temporary PostgreSQL cluster (Debian's `postgresql` binaries, run as the `postgres` user, listening
on 127.0.0.1 only) backs `prefect server start`; two workers and one `prefect deployment run
editforge-generate/demo` with `run.mode=fan-out` must end with every partition of every stage done.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["captions.num_captions=6", "text.finetune_steps=150", "text.batch_size=3", "render.samples_per_triplet=2",
         "render.batch_samples=2", "render.steps=2", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1"]
STAGES = ("captions", "finetune", "text", "render", "filter", "pack")


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    return found[-1] if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} not ready within {timeout}s")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder, owned by the `postgres` user; yields its URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("runuser")):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    import tempfile

    # outside pytest's own temp tree: its folders are private to root, and the server runs as `postgres`
    base = Path(tempfile.mkdtemp(prefix="editforge-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    shutil.chown(data, "postgres")
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        subprocess.run([*as_pg, _pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "prefect"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_the_fan_out_run_on_a_postgresql_backed_server(postgres, tmp_path):
    import httpx

    port = _free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5", "EDITFORGE_HOME": str(ROOT),
           "PYTHONUNBUFFERED": "1", "PREFECT_UI_ENABLED": "false"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)]

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, 180, "the Prefect server on PostgreSQL")
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "editforge-cpu", "--type", "process",
                        "--base-job-template", str(ROOT / "infra/work-pools/process.json")],
                       env=env, check=True, capture_output=True, timeout=120)
        for i in range(2):
            procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "editforge-cpu",
                                           "--name", f"pg-worker-{i}", "--limit", "1"], env=env, cwd=ROOT,
                                          stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT))
        for name in ("demo", *(f"demo-{s}" for s in STAGES)):
            out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                                  str(ROOT / "infra/prefect.yaml"), "--name", name, "--pool", "editforge-cpu"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stdout + out.stderr
        root = tmp_path / "run"
        params = {"preset": "demo", "overrides": [f"output_root={root}", "name=pg", *SMALL, "run.mode=fan-out",
                                                  "run.block_size=1", "run.poll_s=1"]}
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "editforge-generate/demo", "--params",
                              json.dumps(params), "--watch", "--watch-interval", "3", "--watch-timeout", "900"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=960)
        assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + \
            "".join(p.read_text()[-2000:] for p in logs.iterdir())
        for stage in STAGES:
            ids = [0] if stage == "finetune" else [0, 1]
            assert all((root / stage / f"part-{i:05d}" / "_SUCCESS.json").exists() for i in ids), stage
        assert (root / "pack" / "index.json").exists()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
