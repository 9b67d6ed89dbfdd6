#!/usr/bin/env bash
# The one prepared script for a lent GPU (an H200 with torch and triton, no network, no peers).
#
#   bash bench/gpu_check.sh [--quick] [more python -m bench options]
#
# Fits in 10 minutes of GPU time: correctness at most 3 minutes
# (it also fills Triton's kernel cache for the suite), the suite at most about 6.
# 1. bench.correctness: every public op on the Triton backend against the float64 reference,
#    in fp32, bf16 and fp16 (the CPU tests cannot check bf16: the interpreter gets it wrong).
# 2. python -m bench: the suite (about 6 minutes; --quick about 2), results under bench/results/.
# Peers: run bench/peer_wheels.sh on a machine with registry access first and carry ".whl"; the
# wheels are installed into a temporary folder here. The copy of the tree on the GPU machine has
# no .git: set OPD_BENCH_COMMIT=<the commit you ran from> so the results are named after it.
# Everything written is also copied to $OUT when that is set (a folder collected after the run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results=bench/results
mkdir -p "$results"
if compgen -G ".whl/*.whl" >/dev/null; then
  peers=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$peers" .whl/*.whl && export PYTHONPATH=$peers${PYTHONPATH:+:$PYTHONPATH}
fi
commit=${OPD_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export OPD_BENCH_COMMIT=$commit
log=$results/gpu_check_${commit}.log
: > "$log"
step() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

step nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
step python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step timeout 180 python3 -m bench.correctness; correctness=$?
step timeout 400 python3 -m bench "$@"; suite=$?
echo "== correctness exit $correctness, suite exit $suite" | tee -a "$log"

if [ -n "${OUT:-}" ]; then
  cp "$log" "$OUT"/
  for f in "$results"/*_"$commit"_*.{json,md,png}; do [ -e "$f" ] && cp "$f" "$OUT"/; done
fi
[ "$correctness" -eq 0 ] && [ "$suite" -eq 0 ]
