"""Integration tier: the fan-out deployment run on a PostgreSQL-backed Prefect server whose database is
restarted mid-run (`pg_ctl restart -m immediate`: the server process killed, no clean shutdown, then crash
recovery), the restart placed by a count — once 3 of its 7 partitions are finished, never after a delay.
The run must complete, and its data must be the bytes of an uninterrupted run.

The temporary PostgreSQL cluster is test_postgres_server.py's (its `postgres` fixture, unchanged); its data
folder is asked of the server itself (`SHOW data_directory`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_postgres_server import SMALL, _pg_bin, postgres  # noqa: F401  (that module's cluster fixture, reused)

from flows.local_cluster import BIN, ROOT, prefect_cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `fakes`

from fakes.faults import wait_until

pytestmark = pytest.mark.integration
ONE = [*SMALL, "captions.num_partitions=1"]  # one partition a stage: 7 child flow runs, each a process
STAGES = ("captions", "finetune", "text", "render", "judge", "filter", "pack")
RESTART_AFTER = 3  # finished partitions: captions, finetune, text; then render is under way


def _restart(url: str) -> str:
    """Restart the database behind ``url`` as a crash would (immediate stop, recovery on start); its log line."""
    port = urlsplit(url.replace("+asyncpg", "")).port
    query = [_pg_bin("psql") or "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "prefect", "-tAc"]
    data = subprocess.run([*query, "SHOW data_directory"], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()
    before = subprocess.run([*query, "SELECT pg_postmaster_start_time()"], check=True, capture_output=True, text=True,
                            timeout=60).stdout.strip()
    subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "-l",
                    f"{data}/server.log", "restart"], check=True, capture_output=True, timeout=120)
    after = subprocess.run([*query, "SELECT pg_postmaster_start_time()"], check=True, capture_output=True, text=True,
                           timeout=60).stdout.strip()
    assert after != before, "the database did not restart"
    return after


def _data_digests(root: Path) -> dict[str, str]:
    """Every data file of the stages (parquet, shards, images, the shard index) by path, with its sha256 (the
    run's report, which only the flow draws, left out)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix in (".parquet", ".tar", ".png") or p.name == "index.json")
            and p.relative_to(root).parts[0] in STAGES and "_progress" not in p.parts}


def _clean_run(root: Path) -> None:
    from tasks import registry
    from tasks.common.config import load_config

    cfg = load_config("demo", [f"output_root={root}", "name=pg", *ONE])
    for name in STAGES:
        registry.prepare(cfg, name)
        done = [registry.entry(name)(cfg, pid) for pid in registry.get(name).partition_ids(cfg)]
        registry.finalize(cfg, name, done)


def test_a_database_restart_mid_run_ends_with_the_bytes_of_a_clean_run(postgres, tmp_path):  # noqa: F811
    clean = tmp_path / "clean"
    _clean_run(clean)
    with prefect_cluster(tmp_path / "prefect-home", workers=2,
                         extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": postgres}) as cluster:
        root = tmp_path / "run"
        params = {"preset": "demo", "overrides": [f"output_root={root}", "name=pg", *ONE, "run.mode=fan-out",
                                                  "run.block_size=1", "run.poll_s=1"]}
        watch = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "editforge-generate/demo", "--params",
                                  json.dumps(params), "--watch", "--watch-interval", "3", "--watch-timeout", "900"],
                                 env=cluster.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: len(list(root.rglob("_SUCCESS.json"))) >= RESTART_AFTER or watch.poll() is not None,
                       f"{RESTART_AFTER} finished partitions", deadline_s=900)
            finished_at_restart = len(list(root.rglob("_SUCCESS.json")))
            assert watch.poll() is None and finished_at_restart < len(STAGES), "the run ended before the restart"
            _restart(postgres)
            out = watch.communicate(timeout=960)[0]
        finally:
            if watch.poll() is None:
                watch.kill()
        logs = "".join(p.read_text()[-2000:] for p in cluster.logs.iterdir())
        assert watch.returncode == 0 and "Completed" in out, out[-3000:] + logs
    assert len(list(root.rglob("_SUCCESS.json"))) == len(STAGES)
    got, want = _data_digests(root), _data_digests(clean)
    assert want and got == want, sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:20]
