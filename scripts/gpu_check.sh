#!/usr/bin/env bash
# The prepared GPU check (device tool, one H100/H200): build the CUDA variant there for its torch and sm_90, then
# check it against the PyTorch operator and time it. Under 8 minutes on an H100.
#   device run: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
time python3 hub_kernels/build_local.py dcnv3 --backend cuda --cuda-archs 9.0
python3 hub_kernels/dcnv3/benchmarks/gpu_check.py --build hub_kernels/dcnv3/build 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
