#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): the official step, then the trainer's step at ZeRO 1, 2, 3 and
# ZeRO-3 under DeepCompile, MD4-S and GenMD4-S at batch 16, in one command.
set -u
export TORCH_EXTENSIONS_DIR=/tmp/ext  # one folder for every call on the same warm machine
source "$(dirname "$0")/env.sh"
python3 -c "import torch, deepspeed; print(torch.__version__, deepspeed.__version__)" 2>&1 | tail -1
T="python3 benchmarks/throughput.py --paths trainer --steps 30 --warmup 8 --out $R"
timeout 420 $T --official --models md4-s genmd4-s --zero 1 2 3 --compile reduce-overhead 2>&1 | tee $OUT/a_base.log
timeout 150 $T --models md4-s genmd4-s --zero 3 --compile default --set deepspeed.deepcompile=true --tag deepcompile 2>&1 | tee $OUT/a_deepcompile.log
