#!/usr/bin/env bash
# The README's test command (and CI's): set up .venv, then run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
