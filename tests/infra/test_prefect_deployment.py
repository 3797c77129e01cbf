"""Integration tier: the cluster of docs/cluster.md, built by its own script (infra/walkthrough.sh up: a
real `prefect server` on a free port through `make server`, `make deploy`, and `make worker` for a driver,
two GPU-pool and two CPU-pool workers), then `prefect deployment run` against it.

Deploys from `infra/prefect.yaml` (so the shipped deployment file is what is tested), runs the whole
DAG through a deployment, then two render runs on different partitions at once — split between the
GPU workers — and checks their outputs; then the walkthrough's own fan-out runs (`infra/walkthrough.sh
run`) on local disk and on S3 (moto on loopback), a worker lost mid-render, and the fan-out bench.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.local_cluster import BIN, ROOT, STAGES, free_port
from tasks.common.config import load_config
from tasks.registry import stage_hash

pytestmark = pytest.mark.integration

SMALL = [
    "captions.num_captions=6",
    "text.finetune_steps=150",
    "text.batch_size=3",
    "render.samples_per_triplet=2",
    "render.batch_samples=2",
    "render.steps=2",
    "render.keep.clip_image_threshold=-1",
    "render.keep.clip_direction_threshold=-1",
    "render.keep.clip_caption_threshold=-1",
]


WORKERS: dict[str, int] = {}  # worker name -> its process group (infra/walkthrough.sh's pid files)
URL: list[str] = []


ALERTS: list[dict] = []  # what the alert automation's webhook received


@pytest.fixture(scope="module")
def webhook():
    """A webhook on 127.0.0.1 standing in for Slack & co: the alert automation's notifications land here."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            ALERTS.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/alerts"
    httpd.shutdown()


def _walk(env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """infra/walkthrough.sh as docs/cluster.md shows it."""
    return subprocess.run(
        ["bash", str(ROOT / "infra" / "walkthrough.sh"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, webhook, s3):
    """`infra/walkthrough.sh up` on a free port, with the S3 credentials and endpoint exported (moto's) as the
    walkthrough says, so the workers and their flow runs have them; `down` at the end."""
    home = tmp_path_factory.mktemp("walkthrough")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_HOME": str(home / "server"),
        "WALKTHROUGH_DIR": str(home / "logs"),
        "GPU_WORKERS": "2",
        "CPU_WORKERS": "2",
        "EDITFORGE_ALERT_WEBHOOK_URL": webhook,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    for key in ("PREFECT_UI_API_URL", "EDITFORGE_HOME", "GPUS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(key, None)
    try:
        up = _walk(env, "up", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        logs = home / "logs"
        WORKERS.update({p.stem: int(p.read_text()) for p in logs.glob("*.pid") if p.stem != "server"})
        URL[:] = [url.removesuffix("/api")]
        yield env, logs
    finally:
        _walk(env, "down", timeout=120)


def _run(env, deployment: str, params: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            deployment,
            "--params",
            json.dumps(params),
            "--watch",
            "--watch-interval",
            "3",
            "--watch-timeout",
            str(timeout),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )


def test_deployment_runs_dag_and_workers_split_partitions(server, tmp_path):
    env, logs = server
    overrides = [f"output_root={tmp_path}", "name=itest", *SMALL]
    out = _run(env, "editforge-generate/demo", {"preset": "demo", "overrides": overrides})
    assert out.returncode == 0 and "Completed" in out.stdout, (
        out.stdout + out.stderr + "".join(p.read_text()[-3000:] for p in logs.iterdir())
    )
    assert list(tmp_path.glob("pack/*/index.json"))

    _check_dashboard(env, load_config("demo", overrides), tmp_path)

    # two render runs with a new setting, one partition each, submitted together; the threshold makes almost
    # every sample fail: each partition's pass rate is under run.alert_min_pass_rate, so the alert fires
    changed = [*overrides, "render.steps=3", "render.keep.clip_direction_threshold=0.9"]
    runs = [
        subprocess.Popen(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "editforge-render/paper-render",
                "--params",
                json.dumps({"preset": "demo", "overrides": changed, "partitions": [pid]}),
                "--watch",
                "--watch-interval",
                "3",
                "--watch-timeout",
                "500",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert all(r.returncode == 0 and "Completed" in o for r, o in zip(runs, outputs)), outputs
    from tasks.common.contract import read_success
    from tasks.registry import partition_url

    cfg = load_config("demo", changed)
    want = stage_hash(cfg, "render")
    assert [read_success(partition_url(cfg, "render", pid))["config_hash"] for pid in (0, 1)] == [want] * 2
    # every worker of the walkthrough is registered with its pool and polling
    workers = subprocess.run(
        [str(BIN / "python"), "-c", WORKERS_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(workers.stdout) == {
        "editforge-driver": ["driver-0"],
        "editforge-cpu": ["cpu-0", "cpu-1"],
        "editforge-gpu": ["gpu-0", "gpu-1"],
    }, workers.stderr
    # everything in infra/prefect.yaml was deployed by `make deploy`, each on its pool, with no path in its pull
    # step, and the GPU tag limited to the GPUs (GPUS = the walkthrough's two GPU workers)
    listed = subprocess.run(
        [str(BIN / "python"), "-c", DEPLOYMENTS_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    seen = json.loads(listed.stdout)
    pools = seen["pools"]
    assert pools["editforge-generate/paper"] == pools["editforge-generate/demo"] == "editforge-driver"
    assert pools["editforge-render/paper-render"] == pools["editforge-render/demo-render"] == "editforge-gpu"
    assert pools["editforge-text/demo-text"] == pools["editforge-finetune/demo-finetune"] == "editforge-gpu"
    assert pools["editforge-filter/paper-filter"] == pools["editforge-judge/demo-judge"] == "editforge-cpu"
    assert len(pools) == 18, pools
    assert seen["pull_steps"] == [[{"flows.deploy_steps.set_code_directory": {}}]], seen["pull_steps"]
    assert seen["gpu_limit"] == 2
    # the deploy step's automation that crashes flow runs whose heartbeats stopped (a lost worker)
    zombie = subprocess.run(
        [str(BIN / "python"), "-c", AUTOMATIONS_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(zombie.stdout) == {
        "posture": "Proactive",
        "after": ["prefect.flow-run.heartbeat"],
        "action": "CRASHED",
        "enabled": True,
    }, zombie.stderr
    # the alert automation (infra/automations/) notified the webhook of each low pass rate
    deadline = time.time() + 90
    while time.time() < deadline and len([a for a in ALERTS if "low-pass-rate" in a["subject"]]) < 2:
        time.sleep(1)
    low = [a for a in ALERTS if "low-pass-rate" in a["subject"]]
    assert len(low) >= 2 and "render partition" in low[0]["body"] and "itest" in low[0]["subject"], ALERTS


DASHBOARD_SCRIPT = """
import json, sys, time
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from flows.dashboard import read_events
render_key, progress_key, report_key = sys.argv[1:4]
WANTED = [["editforge.partition.completed", "render", 0], ["editforge.partition.completed", "render", 1],
          ["editforge.run.completed", None, None]]
with get_client(sync_client=True) as c:
    # the server stores events in batches, after the run that sent them ended: wait for the last ones
    deadline = time.time() + 120
    while True:
        events = [[e["event"], e["payload"].get("stage"), e["payload"].get("partition")] for e in read_events(c, "itest")]
        if all(w in events for w in WANTED) or time.time() > deadline:
            break
        time.sleep(1)
    versions = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[render_key])),
                                sort=ArtifactSort.CREATED_DESC)[::-1]
    first_run = c.read_flow_run(versions[0].flow_run_id)
    latest = lambda key: c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    print(json.dumps({
        "tables": [{"created": v.created.timestamp(), "rows": len(json.loads(v.data) if isinstance(v.data, str) else v.data),
                    "flow_run": str(v.flow_run_id)} for v in versions],
        "render_flow_end": first_run.end_time.timestamp(), "render_flow": first_run.name,
        "progress": latest(progress_key)[0].data, "report": str(latest(report_key)[0].latest_id),
        "events": events,
        "alert": Automation.read(name="editforge: render partition failed or pass rate low").actions[0].type,
    }))
"""


def _check_dashboard(env, cfg, tmp_path):
    """The dashboard of the deployment run: rows per partition while render ran, progress 100%, the events, the
    alert automation, and the report artifact rendered by the Prefect UI (plots and pair grids) in Chromium."""
    from flows.browser import look
    from tasks.common.layout import artifact_key

    keys = [
        artifact_key("itest", "render", stage_hash(cfg, "render")),
        artifact_key("itest", "progress", stage_hash(cfg, "pack")),
        artifact_key("itest", "report", stage_hash(cfg, "pack")),
    ]
    out = subprocess.run(
        [str(BIN / "python"), "-c", DASHBOARD_SCRIPT, *keys],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    tables = seen["tables"]
    # partition 0's row was on the dashboard before the render flow run ended (both rows came in its own run)
    assert [t["rows"] for t in tables][:2] == [1, 2] and tables[0]["created"] < seen["render_flow_end"], seen
    assert seen["progress"] == 100.0
    events = seen["events"]
    assert (
        ["editforge.partition.completed", "render", 0] in events
        and ["editforge.partition.completed", "render", 1] in events
        and ["editforge.run.completed", None, None] in events
    ), events
    assert seen["alert"] == "send-notification"
    shot = tmp_path / "prefect-ui-report.png"
    page = look(
        f"{URL[0]}/artifacts/artifact/{seen['report']}", shot, wait_for="text=Survival funnel", timeout_s=120
    )
    drawn = {i["alt"] for i in page["images"] if i["width"] > 100 and i["src"].startswith("data:image/")}
    assert {"funnel", "metrics", "pass_rate", "best", "worst", "loss"} <= drawn, page["images"]
    assert shot.stat().st_size > 20_000


DEPLOYMENTS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows(limit=200)}
    deployments = c.read_deployments(limit=200)
    print(json.dumps({"pools": {f"{flows[d.flow_id]}/{d.name}": d.work_pool_name for d in deployments},
                      "pull_steps": list({json.dumps(d.pull_steps): d.pull_steps for d in deployments}.values()),
                      "gpu_limit": c.read_concurrency_limit_by_tag("editforge-gpu").concurrency_limit}))
"""


AUTOMATIONS_SCRIPT = """
import json
from prefect.automations import Automation
from flows.automations import ZOMBIE
a = Automation.read(name=ZOMBIE)
print(json.dumps({"posture": a.trigger.posture.value, "after": sorted(a.trigger.after),
                  "action": a.actions[0].state.value, "enabled": a.enabled}))
"""


WORKERS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(json.dumps({pool: sorted(w.name for w in c.read_workers_for_work_pool(pool) if w.status.value == "ONLINE")
                      for pool in ("editforge-driver", "editforge-cpu", "editforge-gpu")}))
"""


def test_every_work_pool_template_is_created_on_the_server(server):
    env, _ = server
    for path in sorted((ROOT / "infra" / "work-pools").glob("*.json")):
        kind = "kubernetes" if "kubernetes" in path.name else "process"
        out = subprocess.run(
            [
                str(BIN / "prefect"),
                "work-pool",
                "create",
                f"template-{path.stem}",
                "--type",
                kind,
                "--base-job-template",
                str(path),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, path.name + out.stdout + out.stderr
        shown = subprocess.run(
            [str(BIN / "prefect"), "work-pool", "inspect", f"template-{path.stem}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0 and kind in shown.stdout


FLOW_RUNS_SCRIPT = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs(limit=200)
    flows = {f.id: f.name for f in c.read_flows(limit=200)}
print(json.dumps([{"id": str(r.id), "flow": flows.get(r.flow_id), "parameters": r.parameters, "state": r.state_type.value,
                   "start": r.start_time.timestamp() if r.start_time else None,
                   "end": r.end_time.timestamp() if r.end_time else None} for r in runs]))
"""


FOUR = ["captions.num_partitions=4", "captions.num_captions=12"]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict[str, bytes]:
    """The shards of an in-process run of the fan-out tests' config: what every fan-out must end with."""
    root = tmp_path_factory.mktemp("in-process")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.generate",
            "--set",
            f"output_root={root}",
            *[a for item in [*SMALL, *FOUR] for a in ("--set", item)],
        ],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(root / "home")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return _shards(root)


def _shards(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def _fan_out_args(root: Path, name: str) -> dict:
    overrides = [
        f"output_root={root}",
        f"name={name}",
        *SMALL,
        *FOUR,
        "run.mode=fan-out",
        "run.block_size=2",
        "run.poll_s=1",
    ]
    return {"preset": "demo", "overrides": overrides}


def _child_runs(env, name: str) -> list[dict]:
    listed = subprocess.run(
        [str(BIN / "python"), "-c", FLOW_RUNS_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    return [
        r
        for r in json.loads(listed.stdout)
        if f"name={name}" in (r["parameters"].get("overrides") or []) and r["flow"] != "editforge-generate"
    ]


SUBMITTED_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:  # which worker submitted each flow run: the workers' own events
    body = {"filter": {"event": {"name": ["prefect.worker.submitted-flow-run"]}}, "limit": 50}
    page = c.request("POST", "/events/filter", json=body).json()
    events = list(page["events"])
    while page.get("next_page"):
        page = c._client.get(page["next_page"]).json()
        events += page["events"]
print(json.dumps({r["prefect.resource.id"].removeprefix("prefect.flow-run."):
                  e["resource"]["prefect.resource.id"].removeprefix("prefect.worker.process.")
                  for e in events for r in e["related"] if r["prefect.resource.role"] == "flow-run"}))
"""


def _walk_sets(name: str, block_size: int) -> list[str]:
    return [
        a
        for item in [f"name={name}", *SMALL, *FOUR, f"run.block_size={block_size}", "run.poll_s=1"]
        for a in ("--set", item)
    ]


def _s3_snippet() -> str:
    """docs/cluster.md's snippet that reads the shards from S3 (webdataset through fsspec)."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (snippet,) = [b for b in blocks if "s3://" in b and "WebDataset" in b]
    return snippet


def test_the_walkthrough_fans_out_over_both_gpu_workers_on_disk_and_on_s3(server, tmp_path, in_process, s3):
    """`infra/walkthrough.sh run` as docs/cluster.md shows it: 4 partitions in blocks of 2, so the two render
    blocks run on the two GPU-pool workers; the shards equal the in-process run's, on local disk and on
    S3 (moto, blocks of 4: the fewest child runs), and the docs' S3 snippet reads them."""
    env, logs = server
    out = _walk(env, "run", str(tmp_path / "fan"), *_walk_sets("walk", 2))
    assert out.returncode == 0 and "Completed" in out.stdout, (
        out.stdout[-3000:] + out.stderr[-2000:] + "".join(p.read_text()[-3000:] for p in logs.glob("*.log"))
    )

    runs = _child_runs(env, "walk")
    by_stage = {s: [r for r in runs if r["flow"] == f"editforge-{s}"] for s in STAGES}
    assert all(r["state"] == "COMPLETED" for r in runs), runs
    assert len(by_stage["finetune"]) == 1  # the LM is fine-tuned once
    for stage in (
        "captions",
        "text",
        "render",
        "filter",
        "pack",
    ):  # every partition exactly once, in 2 blocks
        blocks = sorted(sorted(r["parameters"]["partitions"]) for r in by_stage[stage])
        assert blocks == [[0, 1], [2, 3]], (stage, blocks)
    listed = subprocess.run(
        [str(BIN / "python"), "-c", SUBMITTED_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    ran_on = json.loads(listed.stdout)
    pools = {"gpu": ("finetune", "text", "render"), "cpu": ("captions", "judge", "filter", "pack")}
    for prefix, stages in pools.items():  # each child on a worker of its deployment's pool
        assert all(ran_on[r["id"]].startswith(f"{prefix}-") for st in stages for r in by_stage[st]), (
            prefix,
            ran_on,
        )
    renders = by_stage["render"]
    # both GPU workers rendered (a worker holds one run at a time: --limit 1). Whether the two blocks also
    # overlapped in time depends on how busy the machine is, so it is not asserted
    assert sorted(ran_on[r["id"]] for r in renders) == ["gpu-0", "gpu-1"], ran_on
    assert _shards(tmp_path / "fan") == in_process != {}
    assert list((tmp_path / "fan").glob("pack/*/index.json"))
    # the dashboard stays right when the work is split over child runs: one render table of all 4 partitions
    # (published by two blocks' runs), and the run-wide progress at 100%
    from tasks.common.layout import artifact_key

    cfg = load_config("demo", [f"output_root={tmp_path / 'fan'}", "name=walk", *SMALL, *FOUR])
    listed = subprocess.run(
        [
            str(BIN / "python"),
            "-c",
            LATEST_SCRIPT,
            artifact_key("walk", "render", stage_hash(cfg, "render")),
            artifact_key("walk", "progress", stage_hash(cfg, "pack")),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    latest = json.loads(listed.stdout)
    assert [len(latest[0]), latest[1]] == [4, 100.0] and [r["partition"] for r in latest[0]] == [
        0,
        1,
        2,
        3,
    ], latest

    # the same walkthrough run on S3: the workers got the AWS_* variables the walkthrough exports
    root = "s3://editforge-test/walk"
    out = _walk(env, "run", root, *_walk_sets("walk-s3", 4))
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    on_s3 = {
        k.removeprefix("editforge-test/walk/"): s3.cat_file(k)
        for k in s3.find("editforge-test/walk")
        if k.endswith(".tar")
    }
    assert on_s3 == in_process
    cfg = load_config("demo", [f"output_root={root}", *SMALL, *FOUR])
    from tasks import registry

    index_url = registry.index_url(cfg)
    snippet = _s3_snippet()
    namespace: dict = {}
    exec(re.sub(r"(?m)^INDEX = .*$", f"INDEX = {index_url!r}", snippet), namespace)
    assert namespace["n"] == json.loads(s3.cat_file(index_url))["splits"]["train"]["samples"] > 0


LATEST_SCRIPT = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
with get_client(sync_client=True) as c:
    data = [c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[k])))[0].data
            for k in sys.argv[1:]]
print(json.dumps([json.loads(d) if isinstance(d, str) else d for d in data]))
"""


def test_fanout_bench_smoke_measures_blocks_and_overhead(server, tmp_path):
    """`bench/fanout.py` at its smoke size on this cluster (so it cannot rot): the no-op re-run skips every block."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fanout_bench", ROOT / "bench" / "fanout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    env, _ = server
    report = bench.measure(env, tmp_path, "smoke", one_worker=False)
    assert report["two_workers"]["states"] == report["noop_rerun"]["states"] == ["COMPLETED"]
    assert report["noop_rerun"]["child_runs"] == report["two_workers"]["child_runs"] > 0
    assert report["overhead_per_block_s"] > 0
    assert bench.summary(report).startswith("fanout: smoke: two workers ")


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def test_a_worker_lost_mid_render_has_its_block_run_elsewhere_with_the_same_output(
    server, tmp_path, in_process
):
    import signal

    env, logs = server
    root = tmp_path / "lost"
    watch = subprocess.Popen(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "editforge-generate/demo",
            "--params",
            json.dumps(_fan_out_args(root, "lostworker")),
            "--watch",
            "--watch-interval",
            "3",
            "--watch-timeout",
            "900",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline, lease, held = time.time() + 600, None, None
    while time.time() < deadline and lease is None:
        for path in root.glob("render/*/_leases/part-*.json"):
            try:
                lease, held = json.loads(path.read_text()), int(path.stem.removeprefix("part-"))
            except ValueError:
                continue
        time.sleep(0.2)
    assert lease, "no render partition started"
    owner = lease["pid"]
    (worker,) = [name for name, group in WORKERS.items() if group in _ancestors(owner)]
    assert worker.startswith("gpu-"), worker  # render runs on the GPU pool
    os.kill(owner, signal.SIGKILL)  # the machine is gone: the flow run's process and its worker
    os.killpg(WORKERS.pop(worker), signal.SIGKILL)
    output = watch.communicate(timeout=1200)[0]
    assert watch.returncode == 0 and "Completed" in output, output[-3000:]
    renders = [r for r in _child_runs(env, "lostworker") if r["flow"] == "editforge-render"]
    blocks = {(0, 1), (2, 3)}
    assert {
        tuple(sorted(r["parameters"]["partitions"])) for r in renders if r["state"] == "COMPLETED"
    } == blocks
    lost = next(b for b in blocks if held in b)
    assert len([r for r in renders if tuple(sorted(r["parameters"]["partitions"])) == lost]) >= 2, (
        renders
    )  # ran again
    assert _shards(root) == in_process


POOLS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(json.dumps({p.name: p.type for p in c.read_work_pools()}))
"""


def test_the_kubernetes_deploy_has_pools_of_its_own(server):
    """docs/cluster.md's `make deploy POOL_TYPE=kubernetes` on the same server: Kubernetes pools beside the
    process pools (no name collides), every deployment pointed at them. Last: it re-points the deployments."""
    env, _ = server
    out = subprocess.run(
        ["make", "deploy", "POOL_TYPE=kubernetes", "GPUS=4"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pools = json.loads(
        subprocess.run(
            [str(BIN / "python"), "-c", POOLS_SCRIPT], env=env, capture_output=True, text=True, timeout=60
        ).stdout
    )
    for role in ("driver", "cpu", "gpu"):
        assert pools[f"editforge-{role}"] == "process" and pools[f"editforge-k8s-{role}"] == "kubernetes", (
            pools
        )
    seen = json.loads(
        subprocess.run(
            [str(BIN / "python"), "-c", DEPLOYMENTS_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert seen["pools"]["editforge-render/paper-render"] == "editforge-k8s-gpu"
    assert seen["pools"]["editforge-generate/paper"] == "editforge-k8s-driver"
    assert all(p.startswith("editforge-k8s-") for p in seen["pools"].values()) and len(seen["pools"]) == 18
    assert seen["gpu_limit"] == 4
