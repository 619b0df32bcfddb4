#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): the 1.3B preset's MFU by batch, a ZeRO-3 candidate, and the real
# training command with MFU and peak memory in its records.
set -u
export TORCH_EXTENSIONS_DIR=/tmp/ext  # one folder for every call on the same warm machine
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R"
timeout 200 python3 -m md4_dist.train configs/tiny.json --set cluster.check_pins=false --set cluster.use_gpu=true --set cluster.num_workers=1 \
  --set deepspeed.precision=bf16 --set train.steps=200 --set train.run_dir=/tmp/gpu_run --set data.manifest=/tmp/gpu_data \
  --set logging.every=50 2>&1 | tail -15 | tee $OUT/b_train.log
cp /tmp/gpu_run/metrics.jsonl $OUT/b_metrics.jsonl 2>/dev/null
for b in 8 16; do
  timeout 130 $T --models genmd4-1.3b --zero 3 --batch $b --steps 10 --warmup 4 --compile reduce-overhead 2>&1 | tee -a $OUT/b_13b.log
done
timeout 150 $T --models md4-s genmd4-s --zero 3 --steps 30 --warmup 8 --compile reduce-overhead --tag persist-all \
  --set deepspeed.persistence_threshold=1000000000 \
  --set 'deepspeed.extra={"zero_optimization": {"reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 500000000}}' 2>&1 | tee $OUT/b_z3knobs.log
