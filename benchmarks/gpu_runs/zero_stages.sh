#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): the official step, then the trainer's step at ZeRO 1, 2, 3 and
# ZeRO-3 under DeepCompile, MD4-S and GenMD4-S at batch 16, in one command.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MD4_SRC=$PWD/.peer TORCH_EXTENSIONS_DIR=/tmp/ext
R=$OUT/results; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, deepspeed; print(torch.__version__, deepspeed.__version__)" 2>&1 | tail -1
T="python3 benchmarks/throughput.py --paths trainer --steps 30 --warmup 8 --out $R"
timeout 420 $T --official --models md4-s genmd4-s --zero 1 2 3 --compile reduce-overhead 2>&1 | tee $OUT/a_base.log
timeout 150 $T --models md4-s genmd4-s --zero 3 --compile default --set deepspeed.deepcompile=true --tag deepcompile 2>&1 | tee $OUT/a_deepcompile.log
