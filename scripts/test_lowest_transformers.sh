#!/usr/bin/env bash
# The lowest transformers release the package supports (pyproject's lower bound), in .venv-lowest, on a subset of
# the suite: the model against the original's outputs and transformers' common tests, the configuration and other
# bad input, and the kernel inside the model (including transformers' use_kernels integration, which the newest
# releases turn off with kernels 0.17.2).
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if ! .venv-lowest/bin/python -c "import sys, transformers; sys.exit(transformers.__version__ != '$lowest')" 2>/dev/null; then
    python3 -m venv .venv-lowest
    .venv-lowest/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
    .venv-lowest/bin/pip install --quiet --disable-pip-version-check -e ".[test]" "transformers==$lowest"
fi
echo "transformers $lowest (the lowest supported release):"
HF_HUB_OFFLINE=1 exec .venv-lowest/bin/python -m pytest tests/test_reference_fixtures.py \
    tests/test_modeling_common_mixins.py tests/test_hub_kernel.py tests/test_bad_input.py -q -p no:cacheprovider \
    -k "not every_instant and not concurrent" "$@"
