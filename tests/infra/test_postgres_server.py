"""Integration tier: the fan-out deployment run against a Prefect server on a real PostgreSQL.

A temporary PostgreSQL cluster (Debian's `postgresql` binaries, run as the `postgres` user, listening
on 127.0.0.1 only, password authentication) backs `prefect server start`, which gets the database as
infra/docker-compose.yml gives it: Prefect's separate settings, the password (with every character
that breaks a URL) in its own, never pasted into a URL. A CPU and a GPU worker and one `prefect
deployment run editforge-generate/demo` with `run.mode=fan-out` must end with every partition done.
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


PASSWORD = "p@ss:w/rd%#?&="  # what an unescaped URL would break on


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder, owned by the `postgres` user, password authentication;
    yields Prefect's database settings for it (the compose file's)."""
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
    pwfile = base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    shutil.chown(pwfile, "postgres")
    subprocess.run([*as_pg, initdb, "-D", str(data), "-A", "scram-sha-256", "--pwfile", str(pwfile), "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        subprocess.run([*as_pg, "env", f"PGPASSWORD={PASSWORD}", _pg_bin("createdb") or "createdb", "-h", "127.0.0.1",
                        "-p", str(port), "-U", "postgres", "prefect"], check=True, capture_output=True, timeout=60)
        yield {"PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg", "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
               "PREFECT_SERVER_DATABASE_PORT": str(port), "PREFECT_SERVER_DATABASE_USER": "postgres",
               "PREFECT_SERVER_DATABASE_NAME": "prefect", "PREFECT_SERVER_DATABASE_PASSWORD": PASSWORD}
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_the_fan_out_run_on_a_postgresql_backed_server(postgres, tmp_path):
    with prefect_cluster(tmp_path / "prefect-home", workers=1, gpu_workers=1, extra_env=postgres) as cluster:
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
    # the runs are in PostgreSQL (through the password), not in a SQLite file of the server's home
    assert not list((tmp_path / "prefect-home").glob("*.db"))
    counted = subprocess.run(["runuser", "-u", "postgres", "--", "env", f"PGPASSWORD={PASSWORD}", _pg_bin("psql") or "psql",
                              "-h", "127.0.0.1", "-p", postgres["PREFECT_SERVER_DATABASE_PORT"], "-U", "postgres", "-d",
                              "prefect", "-tAc", "select count(*) from flow_run"], capture_output=True, text=True,
                             timeout=60)
    assert counted.returncode == 0 and int(counted.stdout) > 7, counted.stdout + counted.stderr
