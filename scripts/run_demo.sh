#!/usr/bin/env bash
# The README's main command: set up .venv, then fine-tune a small InternImage on the embedded digits (offline),
# evaluate it, save it, reload it through AutoModelForImageClassification and print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python examples/run_image_classification.py "$@"
