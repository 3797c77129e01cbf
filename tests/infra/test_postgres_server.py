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
from pathlib import Path

import pytest

from flows.local_cluster import BIN, ROOT, STAGES, free_port, prefect_cluster

pytestmark = pytest.mark.integration

SMALL = ["captions.num_captions=6", "text.finetune_steps=150", "text.batch_size=3", "render.samples_per_triplet=2",
         "render.batch_samples=2", "render.steps=2", "render.keep.clip_image_threshold=-1",
         "render.keep.clip_direction_threshold=-1", "render.keep.clip_caption_threshold=-1"]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    return found[-1] if found else None


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
    port = free_port()
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
    with prefect_cluster(tmp_path / "prefect-home", workers=2,
                         extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": postgres}) as cluster:
        root = tmp_path / "run"
        params = {"preset": "demo", "overrides": [f"output_root={root}", "name=pg", *SMALL, "run.mode=fan-out",
                                                  "run.block_size=1", "run.poll_s=1"]}
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "editforge-generate/demo", "--params",
                              json.dumps(params), "--watch", "--watch-interval", "3", "--watch-timeout", "900"],
                             env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=960)
        assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + \
            "".join(p.read_text()[-2000:] for p in cluster.logs.iterdir())
        for stage in STAGES:
            ids = [0] if stage == "finetune" else [0, 1]
            assert all(list(root.glob(f"{stage}/*/part-{i:05d}/_SUCCESS.json")) for i in ids), stage
        assert list(root.glob("pack/*/index.json"))
