#!/usr/bin/env bash
# Build the DCNv3 hub kernel locally: the CPU variant for the project's torch (.venv), and the CUDA variant, compiled
# with nvcc for sm_80 and sm_90 against a CUDA build of torch in .venv-cuda (no GPU needed to compile).
# Usage: bash scripts/build_kernels.sh [cpu] [cuda]   (default: both)
# Without nvcc the CUDA build is skipped with one line saying so, unless INTERNIMAGE_REQUIRE_CUDA_BUILD=1 (CI sets
# it), which makes a missing nvcc an error.
set -euo pipefail
cd "$(dirname "$0")/.."
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(cpu cuda)
for backend in "${backends[@]}"; do
    case "$backend" in
    cpu)
        .venv/bin/python hub_kernels/build_local.py dcnv3 --backend cpu
        ;;
    cuda)
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
        if ! command -v "$CUDA_HOME/bin/nvcc" >/dev/null; then
            if [ "${INTERNIMAGE_REQUIRE_CUDA_BUILD:-0}" = 1 ]; then
                echo "error: nvcc not found under $CUDA_HOME (INTERNIMAGE_REQUIRE_CUDA_BUILD=1)" >&2
                exit 1
            fi
            echo "skipping the CUDA kernel build: no nvcc under $CUDA_HOME (set CUDA_HOME, or INTERNIMAGE_REQUIRE_CUDA_BUILD=1 to fail)"
            continue
        fi
        if ! .venv-cuda/bin/python -c "import torch, ninja, setuptools; assert torch.version.cuda" >/dev/null 2>&1; then
            python3 -m venv .venv-cuda
            .venv-cuda/bin/pip install --quiet --disable-pip-version-check "torch==2.14.1" ninja setuptools numpy
        fi
        .venv-cuda/bin/python hub_kernels/build_local.py dcnv3 --backend cuda --cuda-archs 8.0 9.0
        ;;
    *) echo "error: unknown backend $backend (cpu or cuda)" >&2; exit 2 ;;
    esac
done
