#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (device tool, one H100/H200), under 8 minutes: builds the CUDA
# variant of the kernel there for its torch and sm_90, runs the kernel's tests on the GPU, then its benchmarks with
# kernels' runner, and writes the tables under $OUT.
#   here, once:   bash scripts/fetch_gpu_wheels.sh          (kernels is not in the GPU image: its wheels go in .whl)
#   device run:   bash scripts/gpu_check.sh                 (carry .whl)
#   CPU dry run:  GPU_CHECK_DRY_RUN=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    build=(--backend cpu); tests=(-k "cpu and not cuda")
else
    build=(--backend cuda --cuda-archs 9.0); tests=(-k cuda)
fi
$PYTHON -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
time $PYTHON hub_kernels/build_local.py dcnv3 "${build[@]}"
# The CUDA variant registers CUDA implementations only, so only the tests parametrized on cuda run against it.
$PYTHON -m pytest hub_kernels/dcnv3/tests -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/kernel_tests.log"
$PYTHON benchmarks/kernel_benchmark_tables.py --output-dir "$OUT" 2>&1 | tee "$OUT/kernel_benchmarks.log"
