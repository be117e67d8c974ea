#!/usr/bin/env bash
# Every check of the GPU path in one run, on a CUDA machine that has torch, Triton, transformers, safetensors and
# pytest but neither vLLM nor network (issue 21), in under 8 minutes (81-89 s on an H200):
#   1. the package from this working tree, laid out as installed (kernels/ and patches/ inside vllm_dar/) in a
#      temporary folder put first on PYTHONPATH: no pip, no build, no network; tests/no_vllm hides vLLM as well,
#      so a machine that has vLLM runs the same checks as one without;
#   2. pytest tests/kernels (natively on the GPU: kernels against the reference, the CUDA-graph capture and
#      replay, the sm_80 compile) and tests/convert/test_device.py (convert and heal with --device cuda on a tiny model);
#   3. benchmarks/kernels.py over its grid (decode 4K/16K/32K x 1/16/64, two shapes, prefill/extend rows).
# Writes into OUTDIR: env.txt (GPU, versions), pytest.txt (the whole log), pytest-summary.txt (its last line),
# pytest.xml (JUnit), kernels.json (rows + targets), kernels.log, summary.json (exit codes, seconds).
# Without a CUDA device (a dry run) the same steps run: the kernel tests in Triton's interpreter, the CUDA tests
# skip, the benchmark says so and exits 0.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # PYTHON=... picks the interpreter (default python3)
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
START=$(date +%s)

# 1. The package as installed, from the working tree (setuptools' package-dir mapping, done by hand).
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cp -r "$REPO/vllm_dar" "$STAGE/vllm_dar"
cp -r "$REPO/kernels" "$STAGE/vllm_dar/kernels"
cp -r "$REPO/patches" "$STAGE/vllm_dar/patches"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$STAGE:$REPO/tests/no_vllm${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # `python -m` must not put the working directory (the uninstalled vllm_dar/) first
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$REPO" || exit 2

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || exit 2
{
    echo "date: $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import importlib.util, sys
import torch, triton, transformers, vllm_dar
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("vllm_dar from", vllm_dar.__file__, "| vllm importable:", importlib.util.find_spec("vllm") is not None)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Time limits on the GPU (5.5 minutes in all); a dry run in the interpreter takes what it takes.
if [ "$CUDA" = 1 ]; then LIMIT_TESTS="timeout 180"; LIMIT_BENCH="timeout 150"; else LIMIT_TESTS=""; LIMIT_BENCH=""; fi
PARALLEL=()
if [ "$CUDA" = 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    PARALLEL=(-n 8)  # Triton compiles each kernel variant once per process; 8 processes share the work
fi

# 2. The tests.
$LIMIT_TESTS "$PY" -m pytest tests/kernels tests/convert/test_device.py -q -p no:cacheprovider "${PARALLEL[@]}" \
    --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.txt"
TESTS_RC=${PIPESTATUS[0]}
grep -E "(passed|failed|error|skipped)" "$OUT/pytest.txt" | tail -n 1 > "$OUT/pytest-summary.txt"

# 3. The benchmark grid.
$LIMIT_BENCH "$PY" benchmarks/kernels.py --json --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
BENCH_RC=${PIPESTATUS[0]}

SECONDS_ALL=$(( $(date +%s) - START ))
printf '{"cuda": %s, "pytest_rc": %s, "pytest": "%s", "bench_rc": %s, "seconds": %s}\n' \
    "$CUDA" "$TESTS_RC" "$(tr -d '"=' < "$OUT/pytest-summary.txt" | xargs)" "$BENCH_RC" "$SECONDS_ALL" \
    | tee "$OUT/summary.json"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
