#!/usr/bin/env bash
# The one command of a GPU session for issue 4 (see bench/gpu/README.md): device tool `run` with
#   command: "bash bench/gpu/run.sh", carry: [".whl"], timeout_s: 600
# Installs the carried wheels (bench/gpu/wheels.sh) offline, prints nvidia-smi, runs bench/gpu/checks.py,
# then bench/render_throughput.py --preset sd15-arch --size 512 --device cuda (float32, the script's
# defaults: 20 steps, 8 reference / 24 batched samples, auto batch) and, if time is left, the same in
# float16. Results and the log go to $OUT (bench/results when OUT is unset):
#   gpu_checks.json, gpu_render_throughput.json, gpu_render_throughput_float16.json, gpu_run.log
# Every part has its own time limit so the whole run ends inside ~9.5 minutes (LIMIT_S).
#
# CPU smoke here:  DEVICE=cpu PRESET=tiny SIZE=64 bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-sd15-arch}
SIZE=${SIZE:-512}
LIMIT_S=${LIMIT_S:-570}          # whole script; the device tool's command limit is 600 s
CHECKS_LIMIT_S=${CHECKS_LIMIT_S:-380}
CHECKS_BUDGET_S=${CHECKS_BUDGET_S:-200}   # checks.py starts no new check after this (compile is last)
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_run.log"
if [ -z "${OUT:-}" ] && exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
  grep -qxF '/bench/results/*.log' "$exclude" 2>/dev/null || echo '/bench/results/*.log' >> "$exclude"
fi

main() {
  PY=${PYTHON:-}                   # default: the project's .venv when present (here), else python3 (device)
  if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
  SITE=${SITE:-/tmp/site}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export EDITFORGE_CACHE=${EDITFORGE_CACHE:-/tmp/editforge-cache}
  export HF_HOME=${HF_HOME:-/tmp/hf-home}
  if [ "$DEVICE" = cpu ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TP_ARGS=${TP_ARGS:---steps 4 --ref-samples 2 --batched-samples 4 --sim-triplets 40}
    CHECK_ARGS=${CHECK_ARGS:---steps 4 --samples 2}
  else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    TP_ARGS=${TP_ARGS:-}
    CHECK_ARGS=${CHECK_ARGS:-}
  fi

  echo "== run.sh: device=$DEVICE preset=$PRESET size=$SIZE python=$PY out=$RESULTS $(date -u +%FT%TZ)"

  # wheels (carried as .whl/, cp312): only for a Python 3.12 that is not the project's .venv
  if compgen -G ".whl/*.whl" > /dev/null && [ "$PY" != .venv/bin/python ] && [ "${INSTALL_WHEELS:-1}" = 1 ] \
     && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "run.sh: wheel install failed"; return 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "run.sh: installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
  else
    echo "run.sh: no wheel install (no .whl/*.whl, or $PY is the .venv or not Python 3.12)"
  fi

  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "run.sh: nvidia-smi not available"; fi
  "$PY" -c 'import torch, diffusers, open_clip, pydantic, transformers, huggingface_hub as h; print("run.sh: torch", torch.__version__, "cuda", torch.cuda.is_available(), "| diffusers", diffusers.__version__, "| open_clip", open_clip.__version__, "| transformers", transformers.__version__, "| hf_hub", h.__version__, "| pydantic", pydantic.VERSION)' \
    || { echo "run.sh: imports failed"; return 1; }

  status=0
  left() { local l=$(( LIMIT_S - SECONDS )); echo $(( l < 30 ? 30 : l )); }  # timeout 0 would mean none

  echo "== checks ($(left) s left)"
  limit=$(( CHECKS_LIMIT_S < $(left) ? CHECKS_LIMIT_S : $(left) ))
  # shellcheck disable=SC2086
  timeout -k 10 "$limit" "$PY" bench/gpu/checks.py --device "$DEVICE" --preset "$PRESET" --size "$SIZE" \
    --budget-s "$CHECKS_BUDGET_S" --out "$RESULTS/gpu_checks.json" $CHECK_ARGS || { rc=$?; status=1; echo "run.sh: checks.py exit $rc (124: time limit)"; }

  echo "== render throughput float32 ($(left) s left)"
  # shellcheck disable=SC2086
  timeout -k 10 "$(left)" "$PY" bench/render_throughput.py --preset "$PRESET" --size "$SIZE" --device "$DEVICE" \
    $TP_ARGS --out "$RESULTS/gpu_render_throughput.json" || { rc=$?; status=1; echo "run.sh: render_throughput.py (float32) exit $rc"; }

  if [ "$DEVICE" != cpu ] && [ "$(left)" -gt "${FP16_MIN_LEFT_S:-120}" ]; then
    echo "== render throughput float16 ($(left) s left)"
    # shellcheck disable=SC2086
    timeout -k 10 "$(left)" "$PY" bench/render_throughput.py --preset "$PRESET" --size "$SIZE" --device "$DEVICE" \
      --dtype float16 --sim-triplets 40 $TP_ARGS --out "$RESULTS/gpu_render_throughput_float16.json" \
      || { rc=$?; status=1; echo "run.sh: render_throughput.py (float16) exit $rc"; }
  else
    echo "== render throughput float16 skipped (cpu, or $(left) s left)"
  fi

  echo "== run.sh: done in ${SECONDS} s, status $status; results in $RESULTS:"
  ls -l "$RESULTS"/gpu_* 2>/dev/null
  return $status
}

main 2>&1 | tee "$LOG"
