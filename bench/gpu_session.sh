#!/usr/bin/env bash
# One call on a lent GPU machine (see README "GPU checks"): build, GPU tests, timings, results to $OUT.
#   bash bench/gpu_session.sh                 # everything: tests, timings, kernel sweep, bench grid
#   STAGES="tests timings" bash bench/gpu_session.sh
# The image has torch + triton + nvcc and no network.  The C++/CUDA extension builds in the background while the
# Triton tests (which need no extension) run; each stage has its own time limit and writes into $OUT as it goes.
set -uo pipefail
OUT="${OUT:-gpu_out}"
STAGES="${STAGES:-tests other timings sweep tune bench largest demo}"   # also: subset (a few GPU tests; SUBSET_K), ncu, cudaws, tritonws, dwstream, dwfused, profile, hostcalls, fp32seeds (also the lse rounding and a fuzz run)
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-10}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
has() { [[ " $STAGES " == *" $1 "* ]]; }
T0=$(date +%s)
stamp() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*"; }

{ nvidia-smi; "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
head -c 600 "$OUT/env.txt" | tail -n 4

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short --durations=10)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "${PYTEST_WORKERS:-6}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 150)

# only these stages use the C++/CUDA extension (the Triton tests, sweep, tune and ncu do not): without them, no build
BUILD=""
if has other || has timings || has bench || has largest || has demo || has cudaws; then
  stamp "build (background)"
  ( time "$PY" setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 &
  BUILD=$!
fi

if has tests; then
  stamp "Triton tests"
  MVLOSS_FAILURE_LOG="$OUT/failures.log" timeout "${TRITON_TEST_TIMEOUT:-240}" "${PYTEST[@]}" tests/test_triton.py \
    > "$OUT/tests_triton.log" 2>&1
  tail -n 25 "$OUT/tests_triton.log"
  grep -h "^=== " "$OUT/failures.log" 2>/dev/null | head -n 30
fi
# before the build wait: these Triton tests need no extension, so they run while it builds
if has subset; then
  stamp "GPU test subset"
  MVLOSS_FAILURE_LOG="$OUT/failures.log" timeout "${SUBSET_TIMEOUT:-90}" "${PYTEST[@]}" tests/test_triton.py \
    -k "${SUBSET_K:-peak_memory or one_million or deterministic or compile_fullgraph or backward_modes or bf16 or capture or opcheck or loop_forms or falls_back or other_tiles}" \
    > "$OUT/tests_subset.log" 2>&1
  tail -n 4 "$OUT/tests_subset.log"
fi
if [ -n "$BUILD" ]; then
  wait $BUILD
  stamp "build rc=$? (tail below)"
  tail -n 4 "$OUT/build.log"
fi
"$PY" -m mvloss info >> "$OUT/build.log" 2>&1
if has other; then
  stamp "other GPU tests"
  MVLOSS_FAILURE_LOG="$OUT/failures.log" timeout "${OTHER_TEST_TIMEOUT:-120}" "${PYTEST[@]}" -m gpu tests \
    --ignore=tests/test_triton.py \
    > "$OUT/tests_other.log" 2>&1
  tail -n 25 "$OUT/tests_other.log"
  # on CUDA tensors, tests that are not gpu-marked (they run on the CPU too): the target side's kernels against
  # their PyTorch path, the mask-free tiles against every mask kept (compiled, bf16 too), the optional logit sum,
  # the recompute kernels' dc alone against their full form, the compiled step through the opaque ops (bf16), the
  # fused dW GEMM (bf16 without the interpreter's upcast), the O(B) kernels' exp / log and the stores' rounding
  MVLOSS_FAILURE_LOG="$OUT/failures.log" timeout "${TARGET_TEST_TIMEOUT:-180}" "${PYTEST[@]}" tests/test_target_loss.py \
    tests/test_mask_free_tiles.py tests/test_optional_logit_sum.py tests/test_dc_alone.py tests/test_triton_opaque_ops.py \
    tests/test_dw_fused.py tests/test_ieee_math.py tests/test_lse_precision.py \
    > "$OUT/tests_target_loss.log" 2>&1
  tail -n 4 "$OUT/tests_target_loss.log"
fi
if has timings; then
  stamp "timings"
  # TIMINGS_TRACED=1 (passed through): the compiled step also with every op traced, the forward's cap dropped
  timeout "${TIMINGS_TIMEOUT:-240}" "$PY" bench/triton_gpu_timings.py --B 1024 --D 512 --C 100000 1000000 \
    --out "$OUT/timings.json" > "$OUT/timings.log" 2>&1
  cat "$OUT/timings.log" | tail -n 8
fi
if has sweep; then
  stamp "kernel sweep"
  timeout "${SWEEP_TIMEOUT:-240}" "$PY" bench/triton_sweep.py --B 1024 --C "${SWEEP_C:-100000}" --D 512 --modes ${SWEEP_MODES:-tiles alt} --out "$OUT/sweep.json" \
    > /dev/null 2> "$OUT/sweep.err"
  "$PY" - "$OUT/sweep.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    cfg = {k: v for k, v in r.items() if k.startswith(("BLOCK", "num_")) or k == "mode"}
    print(r["kernel"], f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s" if "ms" in r else r.get("error"), cfg)
EOF
fi
if has tune; then
  # candidate tiles timed in the whole step beside the table's (eager and graphed), each alone, then the table again
  # (the run's spread): the evidence for changing the table in mvloss/triton/_config.py. Candidates: the sweep's
  # fastest (SWEEP_JSON: this call's sweep.json or an earlier call's, carried in the working tree -- $OUT starts
  # empty on every call) and the files TUNE_TILES names (each MVLOSS_TRITON_TILES's JSON, e.g. bench/tiles/*.json)
  SWEEP_JSON="${SWEEP_JSON:-$OUT/sweep.json}"
  CANDIDATES=()
  if [ -s "$SWEEP_JSON" ]; then
    "$PY" bench/triton_sweep.py --best "$SWEEP_JSON" > "$OUT/best_tiles.json"
    stamp "tune: the sweep's fastest $(cat "$OUT/best_tiles.json")"
    CANDIDATES+=("$OUT/best_tiles.json")
  fi
  for f in ${TUNE_TILES:-}; do CANDIDATES+=("$f"); done
  if [ ${#CANDIDATES[@]} -gt 0 ]; then
    stamp "tune: ${CANDIDATES[*]}"
    timeout "${TUNE_TIMEOUT:-150}" "$PY" bench/triton_gpu_timings.py --step-only --B 1024 --D 512 \
      --C ${TUNE_C:-100000 1000000} --tiles "${CANDIDATES[@]}" --out "$OUT/timings_tuned.json" \
      > "$OUT/timings_tuned.log" 2>&1 || tail -n 5 "$OUT/timings_tuned.log"
    grep "triton step" "$OUT/timings_tuned.log"  # per shape: the table's, each candidate's, the table's again
  else
    stamp "tune: no candidates (run the sweep stage first, or name files in TUNE_TILES)"
  fi
fi
if has ncu; then
  # Nsight Compute on one step's Triton kernels (speed of light, memory, warp stalls): what limits them
  NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
  if [ -n "$NCU" ]; then
    stamp "ncu ($NCU) on one step, C = ${NCU_C:-1000000}"
    timeout "${NCU_TIMEOUT:-180}" "$NCU" --profile-from-start off -k "regex:neg_lse|neg_dlogits|norm_backward" \
      -c "${NCU_KERNELS:-6}" --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section LaunchStats --section Occupancy \
      "$PY" bench/ncu_step.py --C "${NCU_C:-1000000}" > "$OUT/ncu.txt" 2>&1
    grep -E "neg_lse|neg_dlogits|norm_backward|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput" \
      "$OUT/ncu.txt" | head -n 40
  else
    stamp "ncu: not found" | tee "$OUT/ncu.txt"
  fi
fi
if has bench; then
  stamp "bench grid"
  # optional comparators (Cut Cross-Entropy, Liger) travel as wheels in .whl (no network on the GPU machine)
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  mkdir -p bench_out
  timeout "${BENCH_TIMEOUT:-200}" "$PY" -m mvloss.bench --loss mv_arc normface --dtype bf16 --B 1024 --D 512 \
    --C 100000 1000000 --passes fwd+bwd --budget 1 --no-plots --out bench_out \
    ${BENCH_METHODS:+--methods $BENCH_METHODS} > "$OUT/bench.log" 2>&1
  grep "^row " "$OUT/bench.log" | tail -n 30
  tar czf "$OUT/bench_out.tgz" bench_out
fi
if has cudaws; then
  # the CUDA backend's class chunk: B x n fp32 cosines per chunk, n = MVLOSS_CUDA_WORKSPACE_ELEMS / B (default 4M:
  # 4096 classes at B = 1024, a chunk that stays in L2; larger: fewer launches per step)
  for elems in ${CUDA_WS:-4194304 16777216 33554432}; do
    stamp "cuda backend, MVLOSS_CUDA_WORKSPACE_ELEMS=$elems"
    MVLOSS_CUDA_WORKSPACE_ELEMS=$elems timeout "${CUDAWS_TIMEOUT:-120}" "$PY" -m mvloss.bench --loss mv_arc \
      --dtype bf16 --B 1024 --D 512 --C 100000 1000000 --passes fwd+bwd --budget 0.5 --no-plots \
      --out "cudaws_out_$elems" --methods mvloss:cuda > "$OUT/cudaws_$elems.log" 2>&1
    grep "^row " "$OUT/cudaws_$elems.log" | tail -n 2
  done
fi
if has tritonws; then
  # the Triton backward's class chunk: B x n bf16 dc tiles per chunk, n = MVLOSS_TRITON_WORKSPACE_ELEMS / B (default
  # 32M: 32768 classes at B = 1024, 64 MB, more than the H100's 50 MB L2; smaller chunks may keep the workspace in L2
  # between the recompute kernel and its two GEMMs, at the price of more launches a step)
  for elems in ${TRITON_WS:-8388608 16777216 33554432 67108864}; do
    stamp "triton backward, MVLOSS_TRITON_WORKSPACE_ELEMS=$elems"
    MVLOSS_TRITON_WORKSPACE_ELEMS=$elems timeout "${TRITONWS_TIMEOUT:-120}" "$PY" bench/triton_gpu_timings.py \
      --step-only --B 1024 --D 512 --C ${TRITONWS_C:-1000000} --out "$OUT/tritonws_$elems.json" \
      > "$OUT/tritonws_$elems.log" 2>&1
    tail -n 1 "$OUT/tritonws_$elems.log"
  done
fi
if has dwstream; then
  # each class chunk's dW normalisation backward on a second stream (MVLOSS_TRITON_DW_STREAM=1, a candidate: it is
  # bandwidth-bound and may overlap the next chunk's latency-bound recompute kernel), alternated with the default
  for run in 0a 1a 0b 1b; do
    stamp "triton step, MVLOSS_TRITON_DW_STREAM=${run:0:1} ($run)"
    MVLOSS_TRITON_DW_STREAM=${run:0:1} timeout "${DWSTREAM_TIMEOUT:-120}" "$PY" bench/triton_gpu_timings.py \
      --step-only --B 1024 --D 512 --C ${DWSTREAM_C:-1000000} --out "$OUT/dwstream_$run.json" \
      > "$OUT/dwstream_$run.log" 2>&1
    tail -n 1 "$OUT/dwstream_$run.log"
  done
fi
if has dwfused; then
  # the fused dW GEMM (MVLOSS_TRITON_DW_GEMM=fused / fused_tma, candidates): one class chunk alone against cuBLAS's
  # GEMM + the normalisation backward, each candidate tile; then whole steps with the table's fused tile and the
  # chunk's fastest beside the default (the table's again after them)
  stamp "dW chunk, fused against the default"
  timeout "${DWFUSED_TIMEOUT:-120}" "$PY" bench/dw_fused_timing.py --B 1024 --n 32768 --D 512 \
    --tiles bench/tiles/dw_fused_2stages.json bench/tiles/dw_fused_64x128.json bench/tiles/dw_fused_accdot_128x64.json \
    bench/tiles/dw_fused_tma.json bench/tiles/dw_fused_tma_2stages.json bench/tiles/dw_fused_tma_accdot_128x64.json \
    --out "$OUT/dw_fused_chunk.json" > "$OUT/dw_fused_chunk.log" 2>&1
  cat "$OUT/dw_fused_chunk.log" | tail -n 9
  BEST=$("$PY" -c 'import json, sys; f = json.load(open(sys.argv[1]))[0]["fused"]; t = min(f, key=lambda r: r["ms"])["tiles"]
print("" if t in ("table", "bench/tiles/dw_fused.json") else t)' "$OUT/dw_fused_chunk.json" 2>/dev/null)
  stamp "triton step with the fused dW GEMM: bench/tiles/dw_fused.json $BEST"
  timeout "${DWFUSED_STEP_TIMEOUT:-200}" "$PY" bench/triton_gpu_timings.py --step-only --B 1024 --D 512 \
    --C ${DWFUSED_C:-100000 1000000} --tiles bench/tiles/dw_fused.json $BEST \
    --out "$OUT/dw_fused_step.json" > "$OUT/dw_fused_step.log" 2>&1
  grep "triton step" "$OUT/dw_fused_step.log"
fi
if has profile; then
  # torch.profiler tables of three Triton training steps (host and device time per op) at PROFILE_C: where an eager
  # step's host time goes (at 1M its host issue time was nearly its GPU time, NOTES.md, thirteenth session)
  stamp "profile, C = ${PROFILE_C:-1000000}"
  timeout "${PROFILE_TIMEOUT:-120}" "$PY" bench/triton_gpu_timings.py --step-only --B 1024 --D 512 \
    --C ${PROFILE_C:-1000000} --profile "$OUT/profile.txt" --out "$OUT/timings_profiled.json" \
    > "$OUT/profile.log" 2>&1
  tail -n 1 "$OUT/profile.log"
  head -n 30 "$OUT/profile.txt" 2>/dev/null | cut -c1-160
  sed -n '/^Host calls that can wait/,/^cProfile of/p' "$OUT/profile.txt" 2>/dev/null | head -n 40 | cut -c1-160
  sed -n '/^cProfile of/,$p' "$OUT/profile.txt" 2>/dev/null | head -n 45 | cut -c1-160
fi
if has hostcalls; then
  # the host time of each call of an eager step (launches by kernel, the backward's per-chunk GEMMs), at HOSTCALLS_C
  stamp "host time by call, C = ${HOSTCALLS_C:-1000000}"
  timeout "${HOSTCALLS_TIMEOUT:-60}" "$PY" bench/host_call_times.py --C "${HOSTCALLS_C:-1000000}" \
    --json "$OUT/host_calls.json" > "$OUT/host_calls.log" 2>&1
  head -n 12 "$OUT/host_calls.log"
fi
if has fp32seeds; then
  # the fp32 error rule over seeds of the edge shape that fails on the GPU, target side's kernels against its ops
  stamp "fp32 error over seeds"
  timeout "${FP32SEEDS_TIMEOUT:-90}" "$PY" bench/fp32_error_seeds.py --seeds "${FP32SEEDS_N:-12}" \
    --json "$OUT/fp32_error_seeds.json" > "$OUT/fp32_error_seeds.log" 2>&1
  cat "$OUT/fp32_error_seeds.log"
  # the fp64 lse's effect with the GPU's ex2.approx and contractions (interpreter numbers: NOTES.md, nineteenth
  # session), then random option combinations against the fp64 reference
  timeout 60 "$PY" bench/lse_rounding.py --seed 1025 > "$OUT/lse_rounding.log" 2>&1
  cat "$OUT/lse_rounding.log"
  timeout "${FUZZ_TIMEOUT:-150}" "$PY" bench/fuzz_backends.py --backends triton chunked --cases "${FUZZ_CASES:-100}" \
    --seed 0 > "$OUT/fuzz_backends.log" 2>&1
  tail -n 6 "$OUT/fuzz_backends.log"
fi
if has largest; then
  stamp "largest C that fits (B = 1024, D = 512, bf16, MV-Arc)"
  timeout "${LARGEST_TIMEOUT:-240}" "$PY" -m mvloss.bench --largest-c --loss mv_arc --dtype bf16 --B 1024 --D 512 \
    --C 100000 --passes fwd+bwd --budget 0.5 --no-plots --out largest_out \
    --methods ${LARGEST_METHODS:-mvloss:triton mvloss:cuda eager_head} > "$OUT/largest.log" 2>&1
  grep "^largest " "$OUT/largest.log"
fi
if has demo; then
  stamp "demo (1M-class scale step on the GPU)"
  timeout "${DEMO_TIMEOUT:-300}" "$PY" -m mvloss demo --out demo_out > "$OUT/demo.log" 2>&1
  cp demo_out/results.md "$OUT/demo_results.md" 2>/dev/null
  tail -n 12 "$OUT/demo.log" | tr '\r' '\n' | grep -v "it/s" | tail -n 10
fi
stamp "done"
# at most 8 files come back from a device call: everything in one archive, timings.json beside it
ARCHIVE="$(mktemp /tmp/gpu_session.XXXXXX)"  # outside $OUT: tar must not read the archive it writes
tar czf "$ARCHIVE" -C "$OUT" . && find "$OUT" -maxdepth 1 -type f ! -name timings.json -delete \
  && mv "$ARCHIVE" "$OUT/gpu_session.tgz"
exit 0
