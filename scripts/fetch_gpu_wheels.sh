#!/usr/bin/env bash
# Wheels the GPU image lacks (Python 3.12 there), for scripts/gpu_check.sh: kernels and tomlkit, into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl kernels==0.17.2 tomlkit==0.15.2
ls .whl
