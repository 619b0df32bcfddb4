#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): the official step, then ZeRO-1 and
# ZeRO-3 with every parameter kept whole (persistence_threshold 1e9) and 5e8-element buckets, in
# one command.
set -u
export TORCH_EXTENSIONS_DIR=/tmp/ext  # one folder for every call on the same warm machine
source "$(dirname "$0")/env.sh"
mkdir -p $OUT/results
timeout 400 python3 benchmarks/throughput.py --paths trainer --out $OUT/results --official --models md4-s genmd4-s \
  --zero 1 3 --steps 30 --warmup 8 --compile reduce-overhead --tag persist-all \
  --set deepspeed.persistence_threshold=1000000000 \
  --set 'deepspeed.extra={"zero_optimization": {"reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 500000000}}' 2>&1 | tee $OUT/c.log
