#!/usr/bin/env bash
# The README's test command (and CI's): set up .venv, build the DCNv3 kernel variants (CPU, and CUDA compiled
# without a GPU), lint and check the formatting (ruff), then run the whole test suite offline with the newest
# transformers, and a subset with the lowest supported one (scripts/test_lowest_transformers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/build_kernels.sh cpu cuda
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest tests hub_kernels/dcnv3/tests -q -p no:cacheprovider --durations=15 "$@"
bash scripts/test_lowest_transformers.sh
