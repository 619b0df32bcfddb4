#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): benchmarks/gpu_check.py for the
# configurations the configs use (ZeRO-2 and ZeRO-3, bf16, compile reduce-overhead), then the real
# training command at owt_small's shape (12 layers, width 768, L = 1024; V = 2048 so that the
# synthetic Markov corpus can be made there) with compile, evaluation, samples and checkpoints.
set -u
# cluster.check_pins=false: the GPU machine runs its own torch build with the wheels on PYTHONPATH,
# not a node set up from scripts/constraints.txt.
export TORCH_EXTENSIONS_DIR=/tmp/ext  # one folder for every call on the same warm machine
source "$(dirname "$0")/env.sh"
timeout 300 python3 benchmarks/gpu_check.py --models md4-s genmd4-s --zero 2 3 --compile reduce-overhead \
  --out $R 2>&1 | tail -40 | tee $OUT/check.log
timeout --foreground 230 python3 -m md4_dist.train configs/owt_small.json --set cluster.check_pins=false --set cluster.num_workers=1 \
  --set model.vocab_size=2048 --set data.manifest=/tmp/owt_syn \
  --set 'data.synthetic={"num_sequences": 16384, "seed": 0, "val_fraction": 0.03}' \
  --set train.steps=200 --set train.global_batch=64 --set train.compile=reduce-overhead \
  --set train.run_dir=/tmp/run_s --set logging.every=25 --set eval.every=100 --set eval.sequences=256 \
  --set logging.sample_every=100 --set checkpoint.every=100 2>&1 | tail -30 | tee $OUT/real_run.log
echo "train exit ${PIPESTATUS[0]}" | tee -a $OUT/real_run.log
cp /tmp/run_s/metrics.jsonl $OUT/real_metrics.jsonl 2>/dev/null
