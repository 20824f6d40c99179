#!/usr/bin/env bash
# The README's main command: set up .venv, then run the offline quick-start demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python examples/quickstart.py "$@"
