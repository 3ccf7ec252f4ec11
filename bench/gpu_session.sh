#!/usr/bin/env bash
# One call on a lent GPU machine (see README "GPU checks"): build, GPU test suite, benchmarks, results to $OUT.
#   run: bash bench/gpu_session.sh        (the image has torch + triton + nvcc and no network)
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
{ nvidia-smi; python -m pip install --no-build-isolation -e . ; python -m mvloss info; } > "$OUT/build.log" 2>&1
tail -n 5 "$OUT/build.log"
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -m gpu -x --durations=15 > "$OUT/gpu_tests.log" 2>&1
tail -n 15 "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-240}" python -m mvloss.bench --loss mv_arc normface --dtype bf16 --B 1024 --D 512 \
  --C 100000 1000000 --budget 1 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
tail -n 30 "$OUT/bench.log"
[ -f bench/triton_gpu_timings.py ] && timeout 120 python bench/triton_gpu_timings.py > "$OUT/triton_timings.log" 2>&1
exit 0
