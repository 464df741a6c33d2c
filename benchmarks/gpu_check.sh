#!/usr/bin/env bash
# Everything that needs CUDA, in one go (about 6-10 minutes on one H200), for a session lent a GPU:
#   1. correctness: the fast nearest-code search (TF32 / bf16 scores + exact fp32 re-rank) gives the exact
#      fp32 search's ids on the real presets (benchmarks/search_check.py), plus the CPU-forced tests;
#   2. benchmarks/quantizer.py --device cuda (residual and VQGAN search vs vector-quantize-pytorch);
#   3. benchmarks/dualtoken_throughput.py --device cuda: defaults, then checkpointing (tower + decoder) with
#      channels-last, then the same with torch.compile; then the TokLIP-L-384 and MAR KL-16 training steps.
# Each step's output goes to $OUT_DIR/<step>.txt (default: ./gpu_check_out); the last line of each benchmark
# file is its JSON. Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]     (run from the repository root)
set -u
OUT_DIR=${1:-gpu_check_out}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
status=0
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*" >&2
  if "$@" > "$OUT_DIR/$name.txt" 2> "$OUT_DIR/$name.err"; then
    tail -n 1 "$OUT_DIR/$name.txt" | cut -c1-400
  else
    echo "!! $name failed (exit $?): see $OUT_DIR/$name.err" >&2; status=1
  fi
}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
run search_check $PY benchmarks/search_check.py --device cuda
run search_tests $PY -m pytest -q tests/test_search.py
run quantizer_cuda $PY benchmarks/quantizer.py --device cuda --repeats 5 --warmup 2
run throughput $PY benchmarks/dualtoken_throughput.py --device cuda --repeats 5 --warmup 2
run throughput_ckpt $PY benchmarks/dualtoken_throughput.py --device cuda --repeats 5 --warmup 2 \
  --grad-checkpointing --channels-last
run throughput_compile $PY benchmarks/dualtoken_throughput.py --device cuda --repeats 5 --warmup 3 \
  --grad-checkpointing --channels-last --compile
run train_toklip $PY benchmarks/dualtoken_throughput.py --device cuda --preset toklip-l-384 --repeats 3 --warmup 2 \
  --grad-checkpointing --channels-last
run train_mar_kl16 $PY benchmarks/dualtoken_throughput.py --device cuda --preset mar-kl16 --repeats 3 --warmup 2 \
  --channels-last
exit $status
