#!/usr/bin/env bash
# The cluster walkthrough of docs/cluster.md on one box, the same commands in the same order (a test runs
# this script as written). Each step prints the command it runs; long-running ones go to the background
# with their output in $WALKTHROUGH_DIR/<name>.log.
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api     # any free port: every step below reads it
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... [AWS_ENDPOINT_URL=...]   # for s3:// (the workers
#                                                         # pass their environment on to every flow run)
#   infra/walkthrough.sh up                               # server, pools + deployments, workers
#   infra/walkthrough.sh run s3://bucket/runs/demo [--set KEY=VALUE ...]   # one fan-out run, watched
#   infra/walkthrough.sh down                             # stops what `up` started
#
# Settings: GPU_WORKERS (2: one per GPU, CUDA_VISIBLE_DEVICES=i each), CPU_WORKERS (1), GPUS (GPU partitions
# at once across the server: GPU_WORKERS), PREFECT_SERVER_HOME (the server's state: .prefect-server),
# WALKTHROUGH_DIR (pids and logs: .walkthrough).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PREFECT_API_URL:?export PREFECT_API_URL first, e.g. http://127.0.0.1:4200/api}"
export PREFECT_API_URL
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-$PREFECT_API_URL}"   # before the server starts (the UI's calls)
DIR="${WALKTHROUGH_DIR:-$PWD/.walkthrough}"
GPU_WORKERS="${GPU_WORKERS:-2}"
CPU_WORKERS="${CPU_WORKERS:-1}"
GPUS="${GPUS:-$GPU_WORKERS}"
PY=.venv/bin/python

# start "$@" in its own process group, in the background; its pid (= the group) in $DIR/<name>.pid
background() {
  local name=$1
  shift
  echo "+ $* &    # log: $DIR/$name.log"
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

wait_for_server() {  # the server's health endpoint, at most 300 tries a second apart
  "$PY" - "$PREFECT_API_URL" <<'EOF'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(sys.argv[1].rstrip("/") + "/health", timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(f"error: no Prefect server answers on {sys.argv[1]}")
EOF
}

up() {
  mkdir -p "$DIR"
  # 1. the server (SQLite in $PREFECT_SERVER_HOME; PostgreSQL for a team: infra/docker-compose.yml)
  background server make server
  wait_for_server
  # 2. the pools (editforge-driver, -cpu, -gpu), the editforge-gpu limit, every deployment, the automations
  echo "+ make deploy GPUS=$GPUS"
  make deploy GPUS="$GPUS"
  # 3. workers: the driver's (the editforge-generate runs), one per GPU, and CPU ones
  background driver-0 make worker POOL=editforge-driver NAME=driver-0
  for ((i = 0; i < GPU_WORKERS; i++)); do
    background "gpu-$i" env CUDA_VISIBLE_DEVICES="$i" make worker POOL=editforge-gpu NAME="gpu-$i"
  done
  for ((i = 0; i < CPU_WORKERS; i++)); do
    background "cpu-$i" make worker POOL=editforge-cpu NAME="cpu-$i"
  done
}

run() {
  local root=${1:?usage: infra/walkthrough.sh run OUTPUT_ROOT [--set KEY=VALUE ...]}
  shift
  local params
  params=$("$PY" - "$root" "$@" <<'EOF'
import json, sys
root, rest = sys.argv[1], sys.argv[2:]
if len(rest) % 2 or any(flag != "--set" for flag in rest[::2]):
    sys.exit("error: after OUTPUT_ROOT only --set KEY=VALUE pairs")
print(json.dumps({"preset": "demo", "overrides": ["run.mode=fan-out", f"output_root={root}", *rest[1::2]]}))
EOF
)
  # 4. one run for the whole DAG; watch it in the UI too (the editforge-<name>-progress artifact)
  echo "+ .venv/bin/prefect deployment run editforge-generate/demo --params '$params' --watch"
  .venv/bin/prefect deployment run editforge-generate/demo --params "$params" --watch --watch-interval 3
}

# stop the process groups of the given pid files: SIGTERM, at most 15 s for them all to exit (a Prefect worker
# takes its time to shut down), then SIGKILL
stop() {
  local pidfile group tries alive
  for pidfile in "$@"; do
    [[ -e $pidfile ]] && { kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true; }
  done
  for ((tries = 0; tries < 15; tries++)); do
    alive=0
    for pidfile in "$@"; do
      [[ -e $pidfile ]] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 1
  done
  for pidfile in "$@"; do
    [[ -e $pidfile ]] || continue
    group=$(cat "$pidfile")
    kill -KILL -- "-$group" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

down() {  # the workers first (they deregister from the server), then the server
  local workers=()
  local pidfile
  for pidfile in "$DIR"/*.pid; do
    [[ -e $pidfile && $(basename "$pidfile") != server.pid ]] && workers+=("$pidfile")
  done
  stop "${workers[@]}"
  stop "$DIR/server.pid"
}

case "${1:-}" in
  up) up ;;
  run) shift; run "$@" ;;
  down) down ;;
  *) echo "usage: infra/walkthrough.sh up | run OUTPUT_ROOT [--set KEY=VALUE ...] | down" >&2; exit 2 ;;
esac
