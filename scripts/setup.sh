#!/usr/bin/env bash
# Create .venv/ with torch 2.13.0 (CPU) and md4_dist with its test extra. Idempotent: a stamp
# of pyproject.toml skips the install when nothing changed.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.md4_dist-installed
want=$(sha256sum pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -c scripts/constraints.txt --upgrade pip setuptools wheel ninja
  # torch first, pinned: the CPU build on this machine's disk. The constraints file keeps every
  # later resolver step from replacing it with a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c scripts/constraints.txt torch==2.13.0
  # DeepSpeed's setup.py imports torch: build it against the torch just installed.
  .venv/bin/python -m pip install -q -c scripts/constraints.txt --no-build-isolation deepspeed
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi
