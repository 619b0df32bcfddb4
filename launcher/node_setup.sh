#!/usr/bin/env bash
# Install md4_dist on a cluster node; the launcher YAMLs run it after copying the project to
# ~/md4-dist. Idempotent (pip skips what is there), so `ray up` may run it again.
#   bash ~/md4-dist/launcher/node_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# -L lists GPUs: GPU images ship nvidia-smi on CPU instances too, where it fails.
if nvidia-smi -L >/dev/null 2>&1; then
  # GPU node: the same pinned set as the CPU set-up (scripts/constraints.txt), torch as PyPI's
  # CUDA build of the pinned version. Ray, the launcher and the job client agree on one version.
  if ! python3 -m venv .venv; then  # Ubuntu keeps venv in a package of its own
    sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv .venv
  fi
  pins=scripts/constraints.txt
  .venv/bin/pip install -q -c "$pins" --upgrade pip setuptools wheel ninja  # ninja: DeepSpeed JIT-builds ops
  .venv/bin/pip install -q -c "$pins" torch
  .venv/bin/pip install -q -c "$pins" --no-build-isolation deepspeed  # its setup.py imports torch
  .venv/bin/pip install -q -c "$pins" -e .
else
  bash scripts/setup.sh  # CPU node: the pinned CPU torch, exactly as on the laptop
fi
# Cluster commands run in a login shell: `ray start` and the job's `python` come from this venv.
line="source $PWD/.venv/bin/activate"
grep -qxF "$line" ~/.bashrc || echo "$line" >> ~/.bashrc
