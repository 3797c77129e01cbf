"""Paper-size rehearsal of the orchestration: 455 (and 1,000) partitions per stage through the fan-out
driver, the dashboard, the contract and the shard index, on local disk and on moto's S3 server, against a
real `prefect server` (SQLite) — with each stage's work replaced by a stand-in.

Real: the Prefect server (its own process, its own SQLite database), the stage registry and hashes, the
captions ledger (`prepare` over a LAION-shaped source of 2 rows per partition), the stage flows of
flows/stages.py run by Prefect's engine, the contract (leases, input checks, `_SUCCESS.json`), the
dashboard (rows, artifacts, events), the driver (flows/fanout.py `FanOut`, polled as `fan_out` polls it, in
a flow run of its own as in `editforge-generate`: each child a subflow) and the shard index; the runs log to
the API at `--log-level` (INFO, Prefect's default); S3 is moto's server (its own process) on 127.0.0.1.
Bench-only stand-ins (this file; never a product mode or a setting): each stage's partition work
(`STANDINS`: real-shaped outputs and manifest figures, milliseconds each) and the workers (`--worker`
subprocesses that claim the scheduled child runs and run them in-process with Prefect's engine, instead
of a process per flow run).

Measured, per store and size (JSON, and one summary line):
- storage requests: on S3 every HTTP request the client sends (aiobotocore, retries included); on local
  disk every call into tasks.common.storage (outermost) and lease reads. Per partition completion: the
  child's dashboard work (its row; live figures and events go to the Prefect API), the partition's whole
  life (contract + stand-in), and the parent's share (its requests over the run / partitions). Per poll:
  the driver's requests (max and median over the run, and per stage phase) and seconds;
- the Prefect database: SQLite growth over the run (file + WAL, checkpointed), per partition, by table;
- peak RSS of the driver's process as each stage's last block finishes, and of the worker processes.

    python bench/scale.py [--smoke] [--sizes 50,455,1000] [--stores local,s3] [--log-level INFO]
        [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.local_cluster import BIN, free_port, wait_http  # noqa: E402

POOL = "bench-pool"
DEPLOYMENTS = "bench-{stage}"
ROWS_PER_PARTITION = 2  # captions per partition in the bench's ledger
BLOCK = 8  # the paper's run.block_size
WORKERS = 2
POLL_S = 0.5
HEARTBEATS_KEPT = '{"prefect.flow-run.heartbeat": 3600}'  # the servers of infra/ and the Makefile
LOG_LEVEL = ["INFO"]  # what the runs log to the Prefect API (--log-level; INFO: Prefect's default)
RENDER_S = float(
    os.environ.get("EDITFORGE_BENCH_RENDER_S", "0")
)  # --screenshots: render partitions that take time
log = logging.getLogger("editforge.bench")


# -- the stand-ins: real-shaped outputs and figures through the real contract ---------------------------


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _quantiles(base: float) -> dict:
    return {
        "q05": base - 0.1,
        "q25": base - 0.05,
        "q50": base,
        "q75": base + 0.05,
        "q95": base + 0.1,
        "mean": base,
        "n": 40,
    }


def _standin_work(stage: str, cfg, pid: int):
    """The work of one partition of ``stage``: writes its files and figures as the real stage would."""
    import pandas as pd

    from tasks.common import layout, storage

    k = ROWS_PER_PARTITION

    def work(run) -> None:
        ids = [f"{pid:05d}{i:011d}" for i in range(k)]
        if stage == "captions":
            storage.write_parquet_atomic(
                run.output(layout.CAPTIONS_FILE),
                pd.DataFrame(
                    {
                        "caption_id": ids,
                        "caption": [f"a photo of lighthouse {i}" for i in ids],
                        "url": [f"https://example.com/{i}.jpg" for i in ids],
                    }
                ),
            )
            run.stats.add("out", k)
        elif stage == "finetune":
            storage.write_json_atomic(run.output("model/config.json"), {"model_type": "stand-in"})
            run.stats.add("finetune_examples", 160)
            run.stats.add("out", 1)
            run.figures["finetune"] = {
                "backend": "local",
                "base_model": "stand-in",
                "train_examples": 160,
                "val_examples": 18,
                "train_loss_first10": 6.5,
                "train_loss_last10": 2.1,
                "val_loss": 2.4,
                "loss_curve": [{"step": i, "loss": 7 - i / 40} for i in range(200)],
            }
        elif stage == "text":
            storage.write_parquet_atomic(
                run.output(layout.TRIPLETS_FILE),
                pd.DataFrame(
                    {
                        "caption_id": ids,
                        "input": ["a lighthouse"] * k,
                        "edit": ["make it night"] * k,
                        "output": ["a lighthouse at night"] * k,
                        "status": ["ok"] * (k - 1) + ["unparseable"],
                    }
                ),
            )
            run.stats.add("in", k)
            run.stats.add("out", k - 1)
            run.stats.add("batches_generated", 1)
            run.stats.reject("unparseable", 1)
        elif stage == "render":
            samples, passed, kept = 40 * k, 22 * k, 2 * k
            for step in (1, 2, 3):  # the live figures, as the renderer reports them at checkpoints
                time.sleep(RENDER_S / 3)
                f = step / 4
                run.report_progress(
                    f,
                    {
                        "triplets_done": int(f * k),
                        "triplets": k,
                        "samples": int(f * samples),
                        "passed": int(f * passed),
                        "pass_rate": round(passed / samples, 4),
                        "kept_so_far": int(f * kept),
                        "unet_calls": int(f * samples * 20),
                        "unet_calls_per_kept_pair": 400.0,
                        "samples_per_s": 2.5,
                    },
                )
            storage.write_parquet_atomic(
                run.output(layout.SAMPLES_FILE),
                pd.DataFrame(
                    {
                        "caption_id": [ids[i % k] for i in range(samples)],
                        "sample_index": list(range(samples)),
                        **{
                            m: [0.2] * samples
                            for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
                        },
                        "passed": [i < passed for i in range(samples)],
                    }
                ),
            )
            png = _png()
            for i in range(kept):
                for side in ("input", "edited"):
                    storage.write_bytes_atomic(run.output(f"images/{ids[i % k]}_{i}_{side}.png"), png)
            counts = {
                "in": k,
                "samples": samples,
                "passed": passed,
                "out": kept,
                "early_rejected": 4 * k,
                "images_stored": kept,
                "unet_calls": samples * 20,
                "unet_calls_reference": samples * 25,
                "unet_images": samples * 80,
                "triplets_with_kept_pair": k,
                "triplets_satisfied": k,
                "triplets_exhausted": 0,
                "triplets_gave_up": 0,
                "ladder_clip_in": samples,
                "ladder_clip_passed": passed + 6,
                "ladder_dino_in": passed + 6,
                "ladder_dino_passed": passed + 3,
                "ladder_ssim_in": passed + 3,
                "ladder_ssim_passed": passed,
            }
            for name, n in counts.items():
                run.stats.add(name, n)
            run.stats.reject("clip_direction", samples - passed)
            run.figures.update(
                {
                    "pass_rate": round(passed / samples, 4),
                    "samples_per_s": 2.5,
                    "batch_samples": 4,
                    "cohorts": 14,
                    "oom_halvings": 0,
                    "unet_calls_per_kept_pair": 400.0,
                    **{
                        f"pass_rate_{m}": 0.9
                        for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
                    },
                    "judges": {"dino": "stand-in", "ssim": "stand-in"},
                }
            )
            for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"):
                run.stats.observe(m, [0.1, 0.2, 0.3])
        elif stage == "judge":
            storage.write_parquet_atomic(run.output(layout.JUDGMENTS_FILE), pd.DataFrame({"sample_key": ids}))
            run.stats.add("in", 2 * k)
            run.stats.add("out", 2 * k)
            run.figures["vlm"] = "off"
        elif stage == "filter":
            storage.write_parquet_atomic(
                run.output(layout.KEPT_FILE),
                pd.DataFrame(
                    {
                        "caption_id": ids * 2,
                        "sample_index": list(range(2 * k)),
                        "clip_sim_dir": [0.2] * (2 * k),
                    }
                ),
            )
            for name, n in {
                "in": 40 * k,
                "out": 2 * k,
                "triplets_in": k,
                "triplets_kept": k,
                "ladder_clip_in": 40 * k,
                "ladder_clip_passed": 28 * k,
                "ladder_dino_in": 28 * k,
                "ladder_dino_passed": 25 * k,
                "ladder_ssim_in": 25 * k,
                "ladder_ssim_passed": 22 * k,
            }.items():
                run.stats.add(name, n)
            run.stats.reject("clip_direction", 12 * k)
            run.stats.reject("not_in_top_k", 20 * k)
            run.stats.observe("kept_clip_sim_dir", [0.2, 0.3])
        elif stage == "pack":
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name, blob in (
                    (f"{ids[0]}.instruction.txt", b"make it night"),
                    (f"{ids[0]}.input.png", _png()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(blob), 0
                    tar.addfile(info, io.BytesIO(blob))
            storage.write_bytes_atomic(run.output("train-000000.tar"), buf.getvalue())
            run.stats.add("in", 2 * k)
            run.stats.add("out", 2 * k)
            run.stats.add("train_samples", 2 * k)
            run.stats.add("shards", 1)
            run.figures["shards"] = [{"name": "train-000000.tar", "split": "train", "samples": 2 * k}]

    return work


PARTITION_REQUESTS: dict[tuple[str, int], int] = {}


def standin(stage: str):
    """The stand-in for ``registry.entry(stage)``: the real contract around :func:`_standin_work`."""

    def run(cfg, partition_id: int, *, logger=None) -> dict:
        from tasks import registry

        before = REQUESTS.total
        manifest = registry.execute(cfg, stage, partition_id, _standin_work(stage, cfg, partition_id), logger)
        PARTITION_REQUESTS[(stage, partition_id)] = REQUESTS.total - before
        return manifest

    return run


def install_standins(record: Path | None = None) -> None:
    """Every stage's entry replaced by its stand-in (this process only), and each completion's dashboard
    requests recorded (JSON lines in ``record``)."""
    import dataclasses

    from flows import dashboard
    from tasks import registry

    registry.entry = standin
    for name, stage in registry.STAGES.items():  # one partition at a time: each one's requests are its own
        registry.STAGES[name] = dataclasses.replace(stage, one_at_a_time=True)
    original = dashboard.partition_completed

    def completed(cfg, stage, manifest):
        before = REQUESTS.total
        original(cfg, stage, manifest)
        if record is not None:
            with open(record, "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "stage": stage,
                            "partition": manifest["partition_id"],
                            "skipped": bool(manifest.get("skipped")),
                            "dashboard": REQUESTS.total - before,
                            "requests": PARTITION_REQUESTS.pop((stage, manifest["partition_id"]), None),
                            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                        }
                    )
                    + "\n"
                )

    dashboard.partition_completed = completed


# -- counting storage requests ------------------------------------------------------------------------


class Requests:
    """Storage requests this process made (see module doc for what one is on each store)."""

    def __init__(self):
        self.total = 0
        self.by_kind: dict[str, int] = {}
        self.store: str | None = None  # what is counted: "s3" (HTTP requests) or "local" (storage calls)
        self._depth = threading.local()  # calls inside a counted call are not counted again
        self._installed = False

    def add(self, kind: str, store: str) -> None:
        if store != self.store:
            return
        self.total += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def install(self, store: str) -> None:
        """Count ``store``'s requests from now on (the hooks go in once per process)."""
        self.store = store
        if self._installed:
            return
        self._installed = True
        from aiobotocore.endpoint import AioEndpoint

        send = AioEndpoint._send

        async def counted(endpoint, request):
            query = request.url.split("?", 1)[1] if "?" in request.url else ""
            self.add(
                "LIST"
                if request.method == "GET" and ("list-type" in query or "prefix=" in query)
                else request.method,
                "s3",
            )
            return await send(endpoint, request)

        AioEndpoint._send = counted
        from flows import fanout
        from tasks.common import lease, storage

        for name in (
            "exists",
            "read_bytes",
            "write_bytes_atomic",
            "list_files",
            "listing",
            "move",
            "remove",
            "file_sizes",
            "create_exclusive",
            "read_parquet",
            "sha256_of",
            "remove_temp_files",
        ):
            setattr(storage, name, self._wrap(name, getattr(storage, name)))
        lease.read_lease = fanout.read_lease = self._wrap("read_lease", lease.read_lease)

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                self.add(name, "local")
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return call


REQUESTS = Requests()


# -- the bench's workers ------------------------------------------------------------------------------


def worker_main(args) -> int:
    """Claim scheduled child runs of this run (Pending, as a worker does) and run each with Prefect's engine
    in this process, until the stop file appears."""
    REQUESTS.install(args.store)
    install_standins(Path(args.record))
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    from flows.stages import FLOWS

    wanted = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"])))
    ours = DeploymentFilter(id=DeploymentFilterId(any_=args.deployments.split(",")))
    stop = Path(args.stop)
    stages = dict(pair.split("=") for pair in args.stages.split(","))  # deployment id -> stage
    ran = 0
    with get_client(sync_client=True) as client:
        while not stop.exists():
            claimed = None
            try:
                for run in client.read_flow_runs(
                    flow_run_filter=wanted,
                    deployment_filter=ours,
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=4,
                ):
                    if client.set_flow_run_state(run.id, Pending()).status.value == "ACCEPT":
                        claimed = run
                        break
            except httpx.HTTPError as err:  # a busy server (SQLite): as a real worker, try again
                print(f"worker: {err}", file=sys.stderr)
            if claimed is None:
                time.sleep(0.1)
                continue
            stage = stages[str(claimed.deployment_id)]
            run_flow(
                FLOWS[stage],
                flow_run=client.read_flow_run(claimed.id),
                parameters=claimed.parameters,
                return_type="state",
            )
            ran += 1
    print(json.dumps({"child_runs": ran, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


# -- servers --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_server(home: Path, ui: bool = False) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",  # SQLite on a loaded 2-core box: wait, don't answer 503
        "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": HEARTBEATS_KEPT,  # as `make server`
        "PREFECT_UI_ENABLED": str(ui).lower(),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(home / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 300)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextlib.contextmanager
def moto_server() -> Iterator[dict]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 120)
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def db_bytes(home: Path) -> int:
    """The SQLite database's size, its WAL checkpointed into it first."""
    db = home / "prefect.db"
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in home.glob("prefect.db*"))


def db_tables(home: Path) -> dict[str, dict]:
    """Bytes per table and index (SQLite's dbstat) and rows per table, largest first; the events by type."""
    with contextlib.closing(
        sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True, timeout=60)
    ) as con:
        try:
            sizes = dict(con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        except sqlite3.OperationalError:
            sizes = {}
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = {n: con.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0] for n in tables}
        events = con.execute(
            "SELECT event, COUNT(*), SUM(LENGTH(payload) + LENGTH(resource) + LENGTH(related)) "
            "FROM events GROUP BY event ORDER BY 3 DESC LIMIT 12"
        ).fetchall()
    top = sorted(sizes, key=lambda n: -sizes[n])[:14]
    return {
        "objects": {n: {"bytes": sizes[n], **({"rows": rows[n]} if n in rows else {})} for n in top},
        "events_by_type": {e: {"rows": c, "json_bytes": b} for e, c, b in events},
    }


def db_shares(db: Path, partitions: int) -> dict[str, float]:
    """KB per partition of what each kind of record costs in the database (a copy, each kind deleted in turn,
    VACUUMed): Prefect's task-run and flow-run state events, EditForge's events, artifacts."""
    import shutil

    def size(path: Path) -> int:
        with contextlib.closing(sqlite3.connect(path)) as con:
            con.execute("VACUUM")
        return path.stat().st_size

    work = db.with_name("shares.db")
    shutil.copy(db, work)
    full = size(work)
    kinds = {
        "prefect task-run events": ("event LIKE 'prefect.task-run.%'", ()),
        "prefect flow-run events": ("event LIKE 'prefect.flow-run.%'", ()),
        "editforge events": ("event LIKE 'editforge.%'", ()),
        "artifact events": ("event LIKE 'prefect.artifact%'", ()),
        "task runs and their states": ("0", ("task_run_state", "task_run")),
        "artifacts": ("0", ("artifact", "artifact_collection")),
        "logs": ("0", ("log",)),
        "flow runs and their states": ("0", ("flow_run_state", "flow_run")),
    }
    shares = {}
    for name, (where, tables) in kinds.items():
        shutil.copy(db, work)
        with contextlib.closing(sqlite3.connect(work)) as con:
            ids = [(r[0],) for r in con.execute(f"SELECT id FROM events WHERE {where}")]
            con.executemany("DELETE FROM event_resources WHERE event_id = ?", ids)
            con.execute(f"DELETE FROM events WHERE {where}")
            for t in tables:
                con.execute(f'DELETE FROM "{t}"')
            con.commit()
        shares[name] = round((full - size(work)) / partitions / 1024, 1)
    work.unlink()
    return {"whole_db_kb": round(full / partitions / 1024, 1), **shares}


def rss_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# -- one scenario: a whole run version at one size on one store -----------------------------------------------


def _source(path: Path, rows: int) -> None:
    import pandas as pd

    pd.DataFrame(
        {
            "URL": [f"https://example.com/{i}.jpg" for i in range(rows)],
            "TEXT": [f"a watercolor painting of a lighthouse number {i}" for i in range(rows)],
            "AESTHETIC_SCORE": [7.0] * rows,
        }
    ).to_parquet(path)


def scenario(
    n: int,
    store: str,
    workdir: Path,
    workers: int = WORKERS,
    ui: bool = False,
    block: int = BLOCK,
    render_s: float = 0.0,
    watch=None,
) -> dict:
    """One fan-out run over ``n`` partitions per stage on ``store``; its figures (``watch(driver, api)``:
    called after every poll)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        extra = stack.enter_context(moto_server()) if store == "s3" else {}
        extra = {**extra, **({"EDITFORGE_BENCH_RENDER_S": str(render_s)} if render_s else {})}
        home = workdir / "prefect-home"
        api = stack.enter_context(prefect_server(home, ui))
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        stack.callback(
            lambda: [
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v) for k, v in saved.items()
            ]
        )
        return _run(n, store, workdir, home, api, extra, workers, block, watch)


def _run(
    n: int, store: str, workdir: Path, home: Path, api: str, extra: dict, workers: int, block: int, watch
) -> dict:
    import fsspec
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.fanout import FanOut
    from flows.local_cluster import deploy_chain
    from tasks import registry
    from tasks.common import storage
    from tasks.common.config import load_config

    if store == "s3":
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    root = "s3://bench/runs" if store == "s3" else str(workdir / "runs")
    _source(workdir / "source.parquet", n * ROWS_PER_PARTITION)
    overrides = [
        f"output_root={root}",
        "name=scale",
        f"captions.source={workdir / 'source.parquet'}",
        f"captions.num_captions={n * ROWS_PER_PARTITION}",
        f"captions.num_partitions={n}",
        "run.mode=fan-out",
        f"run.block_size={block}",
        f"run.deployments={DEPLOYMENTS}",
        f"run.poll_s={POLL_S}",
    ]
    cfg = load_config("demo", overrides)
    stop, records = workdir / "stop", workdir / "completions.jsonl"
    stop.unlink(missing_ok=True)
    records.unlink(missing_ok=True)
    logger = logging.getLogger("editforge.bench.driver")
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # the parent's run loggers, as the workers'
        logging.getLogger(name).setLevel(LOG_LEVEL[0])
    polls, phases, stage_rss = [], {}, {}
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployments = {
            str(client.read_deployment_by_name(name).id): name.split("/")[0].removeprefix("editforge-")
            for name in deploy_chain(client, POOL, DEPLOYMENTS)
        }
        inprocess = _inprocess(root, n, overrides, logger)
        db_before = db_bytes(home)
        before = REQUESTS.total
        registry.prepare(cfg, "captions", logger)
        ledger_requests = REQUESTS.total - before
        env = {
            **os.environ,
            **extra,
            "PREFECT_API_URL": api,
            "PREFECT_LOGGING_LEVEL": LOG_LEVEL[0],
            "EDITFORGE_LEASE_TTL_S": "3600",
        }
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--store",
                    store,
                    "--deployments",
                    ",".join(deployments),
                    "--stages",
                    ",".join(f"{k}={v}" for k, v in deployments.items()),
                    "--stop",
                    str(stop),
                    "--record",
                    str(records),
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=open(workdir / f"worker-{i}.log", "w"),
                text=True,
            )
            for i in range(workers)
        ]
        t0 = time.perf_counter()
        parent: dict = {}

        def drive() -> dict:  # the parent's loop, as `fan_out` runs it in `editforge-generate`'s flow run
            driver = FanOut(cfg, "demo", overrides, get_run_logger(), client)
            before = REQUESTS.total
            driver.start()
            parent["start"] = REQUESTS.total - before
            while True:
                before = REQUESTS.total
                done = driver.poll()
                phase = next((b.stage for b in driver.blocks if not b.done), "end")
                polls.append({**driver.stats, "requests": REQUESTS.total - before, "phase": phase})
                for stage in driver.hashes:
                    if stage not in stage_rss and all(b.done for b in driver.blocks if b.stage == stage):
                        stage_rss[stage] = {
                            "rss_mb": round(rss_kb() / 1024, 1),
                            "peak_rss_mb": round(
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                            ),
                        }
                if watch is not None:
                    watch(driver, api)
                if done:
                    break
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a bench worker died: see {workdir}/worker-*.log")
                time.sleep(POLL_S)
            before, kinds = REQUESTS.total, dict(REQUESTS.by_kind)
            manifests = driver.finish()
            parent["finish"] = REQUESTS.total - before
            parent["finish_kinds"] = {
                k: v - kinds.get(k, 0) for k, v in REQUESTS.by_kind.items() if v != kinds.get(k, 0)
            }
            return manifests

        try:  # in a flow run: each child run is submitted as its subflow (a task run of the parent's each)
            manifests = flow(name="bench-parent", validate_parameters=False)(drive)()
            start_requests, finish_requests = parent["start"], parent["finish"]
            finish_kinds = parent["finish_kinds"]
        finally:
            stop.touch()
            outs = [p.communicate(timeout=600)[0] for p in procs]
        wall = time.perf_counter() - t0
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all()  # this process's events reach this server (the next scenario has its own)
        db_after = db_bytes(home)
    workers_out = [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip()]
    done_rows = [json.loads(line) for line in records.read_text().splitlines()]
    partitions = sum(len(v) for v in manifests.values())
    assert partitions == 6 * n + 1, (partitions, n)
    assert storage.exists(registry.index_url(cfg)), "no shard index"
    for p in polls:
        phases.setdefault(p["phase"], []).append(p["requests"])
    dash = [r["dashboard"] for r in done_rows if not r["skipped"]]
    life = [r["requests"] for r in done_rows if r["requests"] is not None]
    parent_total = start_requests + sum(p["requests"] for p in polls) + finish_requests
    return {
        "partitions_per_stage": n,
        "store": store,
        "partitions": partitions,
        "child_runs": sum(w["child_runs"] for w in workers_out),
        "wall_s": round(wall, 1),
        "workers": workers,
        "block_size": block,
        "requests_per_completion": {
            "child_dashboard_mean": round(statistics.mean(dash), 2),
            "child_dashboard_max": max(dash),
            "parent_mean": round(parent_total / partitions, 2),
            "dashboard_and_driver_mean": round(statistics.mean(dash) + parent_total / partitions, 2),
            "partition_whole_life_mean": round(statistics.mean(life), 2) if life else None,
        },
        "requests_per_completion_in_process": inprocess,
        "requests_parent": {
            "start_listing": start_requests,
            "polls": sum(p["requests"] for p in polls),
            "finish": finish_requests,
            "finish_by_kind": finish_kinds,
            "captions_ledger": ledger_requests,
        },
        "poll": {
            "count": len(polls),
            "requests_max": max(p["requests"] for p in polls),
            "requests_median": statistics.median(p["requests"] for p in polls),
            "requests_max_by_phase": {k: max(v) for k, v in phases.items()},
            "seconds_median": round(statistics.median(p["seconds"] for p in polls), 4),
            "seconds_max": round(max(p["seconds"] for p in polls), 4),
            "slowest": sorted(polls, key=lambda p: -p["seconds"])[:3],
            "api_calls_max": max(p["api"] for p in polls),
        },
        "prefect_db": {
            "growth_bytes": db_after - db_before,
            "bytes_per_partition": round((db_after - db_before) / partitions),
            "tables": db_tables(home),
        },
        "rss": {
            "driver_by_stage": stage_rss,
            "workers_peak_mb": [round(w["maxrss_kb"] / 1024, 1) for w in workers_out],
        },
        "requests_by_kind_parent": dict(REQUESTS.by_kind),
    }


def _inprocess(root: str, n: int, overrides: list[str], logger) -> dict:
    """The dashboard's requests per completion in a process that publishes itself (in-process mode: the demo,
    a stage deployment run by hand): ``n`` captions partitions one after another, in an output root of
    their own. The first completion also lists every stage once."""
    from flows import dashboard
    from tasks import registry
    from tasks.common.config import load_config

    cfg = load_config(
        "demo", [*overrides, f"output_root={root}-in-process", "name=scale-in-process", "run.mode=in-process"]
    )
    registry.prepare(cfg, "captions", logger)
    counts = []
    for pid in range(n):
        manifest = standin("captions")(cfg, pid)
        before = REQUESTS.total
        dashboard.partition_completed(cfg, "captions", manifest)
        counts.append(REQUESTS.total - before)
    return {
        "first": counts[0],
        "mean_after_first": round(statistics.mean(counts[1:]), 2),
        "max_after_first": max(counts[1:]),
    }


# -- screenshots for docs/monitoring.md ----------------------------------------------------------------------


def screenshots(folder: Path, workdir: Path) -> list[str]:
    """A small fan-out run (16 partitions, blocks of 4, render partitions of ~12 s) against a server with its
    UI; mid-render, with two render partitions in flight, the status artifact, the render table and the
    child runs as the Prefect UI shows them, taken with flows/browser.py (Chromium)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.browser import look
    from tasks.common.layout import artifact_key

    taken: list[str] = []

    def watch(driver, api: str) -> None:
        render_done = len(driver.board.rows["render"])
        if taken or len([k for k in driver.board.live if k[0] == "render"]) < 2 or not 4 <= render_done < 12:
            return
        ui = api.removesuffix("/api")
        keys = {
            "status": artifact_key("scale", "status", driver.hashes["pack"]),
            "render-table": artifact_key("scale", "render", driver.hashes["render"]),
        }
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            ids = {
                name: client.read_latest_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
                )[0].latest_id
                for name, key in keys.items()
            }
        folder.mkdir(parents=True, exist_ok=True)
        for name, artifact_id in ids.items():
            shot = folder / f"monitoring-{name}.jpg"
            look(
                f"{ui}/artifacts/artifact/{artifact_id}",
                shot,
                wait_for="text=partition",
                timeout_s=120,
                width=1720,
                scale=0.6,
            )
            taken.append(str(shot))
        shot = folder / "monitoring-runs.jpg"
        look(f"{ui}/runs", shot, wait_for="text=render[", timeout_s=120, width=1280, scale=0.7)
        taken.append(str(shot))

    scenario(16, "local", workdir, ui=True, block=4, render_s=12.0, watch=watch)
    return taken


# -- main -------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="40 partitions per stage, local disk and S3")
    parser.add_argument("--sizes", default="50,455,1000", help="partitions per stage, comma-separated")
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    parser.add_argument(
        "--log-level", default="INFO", help="the runs' log level (PREFECT_LOGGING_LEVEL); INFO as deployed"
    )
    parser.add_argument("--keep", help="keep the runs, servers' databases and logs in this folder")
    parser.add_argument(
        "--screenshots", help="take the README's screenshots of the UI mid-render into this folder"
    )
    parser.add_argument(
        "--shares",
        nargs=2,
        metavar=("DB", "PARTITIONS"),
        help="what each kind of record costs per partition in a kept run's prefect.db",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--deployments", help=argparse.SUPPRESS)
    parser.add_argument("--stages", help=argparse.SUPPRESS)
    parser.add_argument("--stop", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    warnings.filterwarnings("ignore", category=FutureWarning, module="prefect.artifacts")  # no flow run here
    if args.shares:
        print(json.dumps(db_shares(Path(args.shares[0]), int(args.shares[1])), indent=1))
        return 0
    if args.screenshots:
        with tempfile.TemporaryDirectory(prefix="editforge-shots-") as tmp:
            print("\n".join(screenshots(Path(args.screenshots), Path(tmp))))
        return 0
    LOG_LEVEL[0] = args.log_level.upper()
    sizes = [40] if args.smoke else [int(s) for s in args.sizes.split(",")]
    stores = args.stores.split(",")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the runs' INFO lines go to the API only
    report = {"smoke": args.smoke, "runs": []}
    with (
        contextlib.nullcontext(args.keep)
        if args.keep
        else tempfile.TemporaryDirectory(prefix="editforge-scale-")
    ) as tmp:
        for store in stores:
            REQUESTS.install(store)
            for n in sizes:
                REQUESTS.by_kind.clear()
                report["runs"].append(scenario(n, store, Path(tmp) / f"{store}-{n}"))
                print(line(report["runs"][-1]), flush=True)
    report["goals"] = {
        "requests_per_completion_s3": "<= 10, flat from 50 to 1,000",
        "poll_requests": "<= 200",
        "prefect_db_455": "<= 50 MB, linear in N",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0


def line(r: dict) -> str:
    c = r["requests_per_completion"]
    return (
        f"  {r['store']} N={r['partitions_per_stage']}: {c['dashboard_and_driver_mean']} requests per completion "
        f"(child dashboard {c['child_dashboard_mean']}, parent {c['parent_mean']}; in-process "
        f"{r['requests_per_completion_in_process']['mean_after_first']}); poll max {r['poll']['requests_max']} "
        f"requests, median {r['poll']['seconds_median']} s; Prefect DB {r['prefect_db']['growth_bytes'] / 1e6:.1f} MB "
        f"({r['prefect_db']['bytes_per_partition']} B/partition); {r['wall_s']} s"
    )


def summary(report: dict) -> str:
    runs = report["runs"]
    worst = max(r["requests_per_completion"]["dashboard_and_driver_mean"] for r in runs)
    poll = max(r["poll"]["requests_max"] for r in runs)
    per = [r["prefect_db"]["bytes_per_partition"] for r in runs]
    return (
        f"scale: {len(runs)} run(s) up to {max(r['partitions_per_stage'] for r in runs)} partitions/stage: "
        f"<= {worst} storage requests per completion, poll <= {poll} requests, Prefect DB {min(per)}-{max(per)} "
        "B/partition"
    )


if __name__ == "__main__":
    sys.exit(main())
