#!/usr/bin/env bash
# On the GPU machine (16 cores), from the project root (carry .whl and .peer): data_tools.shard's
# start-up at 1, 2 and 14 workers (issue 18), then ZeRO-3's host-side settings for MD4-S beside
# ZeRO-1 in one command (issue 19), and a kernel profile of GenMD4-S at ZeRO-1 (what the
# step's own GPU work is made of).
set -u
source "$(dirname "$0")/env.sh"
nproc | tee $OUT/a_startup.log
timeout 250 python3 benchmarks/shard_startup.py --text-mb 46 --workers 1 2 14 --repeats 2 \
  --json $R/shard-startup-16cores.json 2>&1 | tail -8 | tee -a $OUT/a_startup.log
# ZeRO-3's settings: zero3_settings.sh's rows (a fresh extensions folder, room for FusedAdam's
# build; this script's own shorter limits once ended the build and hung every later row).
bash benchmarks/gpu_runs/zero3_settings.sh
T="python3 benchmarks/throughput.py --paths trainer --out $R --compile reduce-overhead"
timeout 150 $T --models genmd4-s --zero 1 --steps 6 --warmup 4 --profile 2>&1 | tail -45 | tee $OUT/c_profile.log
