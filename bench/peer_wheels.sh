#!/usr/bin/env bash
# Downloads the peers' wheels into .whl/ (kept out of git) for a GPU machine that has no registry
# access: carry ".whl" with the device call and bench/gpu_check.sh installs them there.
# The peers are pure-Python wheels; their needs (torch, triton) are on that machine already, except
# TRL's own (accelerate here; datasets and the rest, if missing there, leave the TRL peer listed
# as unusable in the report rather than failing the run).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 accelerate
ls -l .whl
