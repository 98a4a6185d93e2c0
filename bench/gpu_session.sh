#!/usr/bin/env bash
# One GPU session: build the CUDA extension in place, run the test suite on the GPU, run the
# GPU benchmarks. Usage: bash bench/gpu_session.sh [build|test|bench|all|emu|capture] ...
# The tests run the real CUDA kernels (-m cuda tests included) and leave out the emulated ones
# (-m "not cuda_emu": the same kernels on the CPU through HIP-CPU, docs/cuda-emulation.md; they
# are CI's and only cost GPU time here); `emu` runs those alone (needs HIP-CPU and TBB).
# `capture` (about 2 min after the build): the device-flag mode and capturable-step tests alone
# (tests/test_cuda_capture.py: CUDA-graph replay vs eager, sync debug mode "error"; the CPU
# device-mode tests on the GPU machine too).
# Logs and results go to $OUT (the device tool's result folder) or bench/results/gpu/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FINAL="${OUT:-bench/results/gpu}"   # the device tool brings back at most 8 files: tar it all
OUT="$(mktemp -d)/gpu"
mkdir -p "$OUT" "$FINAL"
pack() { tar czf "$FINAL/gpu_results.tgz" -C "$(dirname "$OUT")" gpu; cp "$OUT"/*.log "$FINAL"/ 2>/dev/null || true; }
trap pack EXIT
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for packages the image lacks
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site"
fi
export PATH="/usr/local/cuda/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PY:-python3}"

env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    "$PY" - <<'EOF'
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable", e)
print("python", platform.python_version())
EOF
    nvcc --version | tail -2
}

build() {
    local t0=$SECONDS rc=0
    if ls .gpu_build/*.so >/dev/null 2>&1; then  # libraries built by an earlier call, carried back
        cp .gpu_build/*.so lookahead_ext/ && echo "using prebuilt $(ls .gpu_build)"
    else
        timeout "${BUILD_TIMEOUT:-420}" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
        rc=$?
        mkdir -p "$FINAL/so" && cp lookahead_ext/*.so "$FINAL/so/" 2>/dev/null
    fi
    tail -5 "$OUT/build.log"
    echo "build rc=$rc in $((SECONDS - t0)) s"
    "$PY" -c "import lookahead_ext as la; print(la.ops.available_backends())"
    return $rc
}

run_tests() {
    local t0=$SECONDS
    local par=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n "${XDIST:-8}")
    timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest tests -q -p no:cacheprovider -rfE -m "not cuda_emu" "${par[@]}" \
        "$@" > "$OUT/tests.log" 2>&1
    echo "tests rc=$? in $((SECONDS - t0)) s"
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
}

bench() {
    local t0=$SECONDS
    "$PY" bench/bench_native.py --device cuda --out "$OUT" > "$OUT/bench_native.log" 2>&1; echo "bench_native rc=$?"
    tail -25 "$OUT/bench_native.log"
    "$PY" bench/bench_triton.py --out "$OUT" > "$OUT/bench_triton.log" 2>&1; echo "bench_triton rc=$?"
    tail -25 "$OUT/bench_triton.log"
    "$PY" bench/host_overhead.py --device cuda --out "$OUT" > "$OUT/host_overhead.log" 2>&1; echo "host_overhead rc=$?"
    tail -22 "$OUT/host_overhead.log"
    "$PY" bench/paired.py --device cuda --out "$OUT" > "$OUT/paired.log" 2>&1; echo "paired rc=$?"; tail -20 "$OUT/paired.log"
    "$PY" -m bench.run_all --device cuda --out "$OUT/suite" > "$OUT/bench_suite.log" 2>&1; echo "bench suite rc=$?"
    tail -30 "$OUT/bench_suite.log"
    echo "bench in $((SECONDS - t0)) s"
}

what="${1:-all}"; shift || true
env_info
case "$what" in
    build) build ;;
    test) build && run_tests "$@" ;;
    bench) build && bench ;;
    all) build && run_tests "$@"; bench ;;
    capture) build; t0=$SECONDS   # run_tests always takes the whole tests/ folder: these files alone
        timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests/test_cuda_capture.py tests/test_device_skip.py \
            tests/test_host_reads.py -q -p no:cacheprovider -rfE -m "not cuda_emu" > "$OUT/capture.log" 2>&1
        echo "capture tests rc=$? in $((SECONDS - t0)) s"; grep -E "passed|failed|error" "$OUT/capture.log" | tail -3
        grep -E "^(FAILED|ERROR)" "$OUT/capture.log" | head -30 ;;
    emu) t0=$SECONDS; "$PY" scripts/build_cuda_emu.py > "$OUT/emu.log" 2>&1
        "$PY" -m pytest tests -m cuda_emu -q -p no:cacheprovider -rfE >> "$OUT/emu.log" 2>&1
        echo "emu rc=$? in $((SECONDS - t0)) s"; tail -3 "$OUT/emu.log" ;;
    triton) build; run_tests tests/test_op_conformance.py tests/test_optim_parity.py tests/test_triton_ops.py tests/test_triton_compile.py
        "$PY" bench/bench_triton.py --out "$OUT" > "$OUT/bench_triton.log" 2>&1; echo "bench_triton rc=$?"
        tail -40 "$OUT/bench_triton.log"
        timeout 200 "$PY" bench/bench_triton.py --cases 64M --dtypes fp32 --sweep --backends triton \
            --out "$OUT/sweep" > "$OUT/bench_triton_sweep.log" 2>&1; echo "sweep rc=$?"
        tail -30 "$OUT/bench_triton_sweep.log" ;;
esac
