#!/usr/bin/env bash
# Download, here (with network), the wheels that the GPU device image lacks and that bench/gpu/checks.py
# and bench/render_throughput.py import, into .whl/ at the repo root (git-ignored through
# .git/info/exclude). The device then installs them offline (bench/gpu/run.sh) — see bench/gpu/README.md.
#
#   bash bench/gpu/wheels.sh                              # the pinned set below
#   EXTRA="transformers==5.24.0" bash bench/gpu/wheels.sh  # plus more NAME==VERSION specs
#
# Which: every distribution whose modules a CPU run of both scripts imports, minus the device image's
# "Python packages already there" (/work/.library/device/KINDS.md), which has torch, transformers,
# huggingface-hub, tokenizers, safetensors, timm, numpy, pandas, pyarrow, fsspec, pyyaml, regex,
# requests, pillow, tqdm, filelock, packaging, accelerate, peft ... Missing there:
#   diffusers, open_clip_torch (+ ftfy, wcwidth), pydantic (+ pydantic-core, annotated-types,
#   typing-inspection) and typing_extensions (pydantic 2.14 needs >= 4.16; the image's version is unknown,
#   a newer one is backward compatible). braceexpand/webdataset are not imported by these scripts.
# Versions: those of the project's .venv (all support Python 3.12); pydantic-core is a cp312 manylinux
# wheel, the rest are py3-none-any.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(
  diffusers==0.42.1
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.4
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0
)
# shellcheck disable=SC2206
WHEELS+=(${EXTRA:-})
PY=${PYTHON:-python3}

# keep .whl/ out of git (and so out of the working tree's size unless carried)
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
if [ -d "$(dirname "$exclude")" ] || mkdir -p "$(dirname "$exclude")" 2>/dev/null; then
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

# the pins should match the project's .venv (warn, do not fail, when they drift)
if [ -x .venv/bin/python ]; then
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}; want=${spec#*==}
    have=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || echo "-")
    [ "$have" = "$want" ] || echo "wheels.sh: note: $name pinned $want, .venv has $have"
  done
fi

# one version of each: stale wheels would make the offline install fail
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" \
  2> >(grep -v 'is neither a file nor a directory' >&2)

ls -l .whl | tail -n +2 | awk '{printf "  %8.1f KiB  %s\n", $5/1024, $9}'
echo "wheels.sh: $(find .whl -type f -name '*.whl' | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
tracked=$(git ls-files -z 2>/dev/null | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1 || true)
untracked=$(git ls-files -z --others --exclude-standard 2>/dev/null | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1 || true)
echo "wheels.sh: tracked files ${tracked:-?}, untracked-not-ignored ${untracked:-?} (all of it travels; limit 64 MiB)"
