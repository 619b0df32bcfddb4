#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): ZeRO-3 under DeepCompile with room to
# compile, the 1.3B preset at batches above 16, and a profile of ZeRO-3's step (every parameter
# persistent), in one command.
set -u
export TORCH_EXTENSIONS_DIR=/tmp/ext  # one folder for every call on the same warm machine
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R"
timeout 260 $T --models md4-s --zero 3 --steps 20 --warmup 6 --compile default --set deepspeed.deepcompile=true --tag deepcompile 2>&1 | tail -30 | tee $OUT/d_deepcompile.log
for b in 24 32; do
  timeout 110 $T --models genmd4-1.3b --zero 3 --batch $b --steps 10 --warmup 4 --compile reduce-overhead 2>&1 | tail -8 | tee -a $OUT/d_13b.log
done
timeout 90 $T --models md4-s --zero 3 --steps 6 --warmup 4 --compile reduce-overhead --profile --tag persist-all \
  --set deepspeed.persistence_threshold=1000000000 \
  --set 'deepspeed.extra={"zero_optimization": {"reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 500000000}}' 2>&1 | tail -60 | tee $OUT/d_profile.log
