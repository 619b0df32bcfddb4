#!/usr/bin/env bash
# Set up .venv/ (scripts/setup.sh) and run the test suite; extra arguments go to pytest.
#   bash scripts/test.sh
#   bash scripts/test.sh tests/test_losses.py -k genmd4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed compiles a small C++ op on first use (about a minute here): cache it in the build tree.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.build/torch_extensions}"
exec .venv/bin/python -m pytest "$@"
