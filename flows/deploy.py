"""`make deploy`: the work pools, the GPU concurrency limit, every deployment and the automations.

Three pools, so that no flow run holds a slot another one waits for: ``editforge-driver`` (the
`editforge-generate` flow, which in fan-out mode only submits and waits), ``editforge-cpu`` and
``editforge-gpu`` (the stages). Process pools from `infra/work-pools/process.json` for a box of
workers; with ``kubernetes`` the pools are named ``editforge-k8s-*`` (they never collide with the
process pools of a trial on the same server) from `infra/work-pools/kubernetes-{cpu,gpu}.json`, and
the deployments of `infra/prefect.yaml` are pointed at them. The task-run tag ``editforge-gpu`` (every
partition that holds a GPU) is limited to ``gpus`` at once across the server. Every command is the
plain `prefect` CLI, printed before it runs; ``$PREFECT_API_URL`` names the server.

    python -m flows.deploy [--gpus N] [--kubernetes]         # = make deploy [GPUS=N] [POOL_TYPE=kubernetes]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
ROLES = ("driver", "cpu", "gpu")
GPU_TAG = "editforge-gpu"


def pool_name(role: str, kubernetes: bool = False) -> str:
    return f"editforge-{'k8s-' if kubernetes else ''}{role}"


def pool_template(role: str, kubernetes: bool = False) -> Path:
    if not kubernetes:
        return ROOT / "infra" / "work-pools" / "process.json"
    return ROOT / "infra" / "work-pools" / f"kubernetes-{'gpu' if role == 'gpu' else 'cpu'}.json"


def _run(args: list[str], env: dict[str, str] | None, echo: bool) -> None:
    if echo:
        print("+ " + " ".join(str(a) for a in args), flush=True)
    out = subprocess.run([str(a) for a in args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(str(a) for a in args[:4])} ... failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    if echo and out.stdout.strip():
        print(out.stdout.rstrip()[-2000:], flush=True)


def create_pools(env: dict[str, str] | None = None, kubernetes: bool = False, gpus: int = 1, echo: bool = True) -> None:
    """The three pools (replacing their job templates when they exist) and the GPU tag's limit."""
    kind = "kubernetes" if kubernetes else "process"
    for role in ROLES:
        _run([BIN / "prefect", "work-pool", "create", pool_name(role, kubernetes), "--type", kind,
              "--base-job-template", pool_template(role, kubernetes), "--overwrite"], env, echo)
    if gpus:
        _run([BIN / "prefect", "concurrency-limit", "create", GPU_TAG, str(gpus)], env, echo)


def prefect_file_for(kubernetes: bool, source: Path = PREFECT_FILE) -> str:
    """`infra/prefect.yaml` as it is, or with its pools renamed to the Kubernetes ones."""
    text = source.read_text()
    if kubernetes:
        for role in ROLES:
            text = text.replace(f"name: {pool_name(role)}\n", f"name: {pool_name(role, True)}\n")
    return text


def deploy_all(env: dict[str, str] | None = None, kubernetes: bool = False, echo: bool = True) -> None:
    """Every deployment of infra/prefect.yaml in one `prefect deploy --all`, then the automations."""
    with tempfile.TemporaryDirectory(prefix="editforge-deploy-") as tmp:
        prefect_file = PREFECT_FILE
        if kubernetes:
            prefect_file = Path(tmp) / "prefect-kubernetes.yaml"
            prefect_file.write_text(prefect_file_for(True))
        _run([BIN / "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", prefect_file], env, echo)
    _run([BIN / "python", "-m", "flows.automations"], env, echo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create EditForge's pools and deployments on $PREFECT_API_URL.")
    parser.add_argument("--gpus", type=int, default=int(os.environ.get("GPUS", "1")),
                        help="GPU partitions at once across the server (the cluster's GPUs; 0: no limit)")
    parser.add_argument("--kubernetes", action="store_true", help="Kubernetes pools editforge-k8s-* (see docs)")
    args = parser.parse_args(argv)
    if args.gpus < 0:
        print(f"error: --gpus {args.gpus}: must be >= 0 (GPUS=N, the number of GPUs of the cluster)", file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: export it (e.g. http://127.0.0.1:4200/api), the server's API",
              file=sys.stderr)
        return 2
    try:
        create_pools(None, args.kubernetes, args.gpus)
        deploy_all(None, args.kubernetes)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
