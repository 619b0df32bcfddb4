#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): ZeRO-3's host-side settings for MD4-S
# beside ZeRO-1 (issue 19). The first row also builds FusedAdam (about a minute on a bare machine),
# so it has the longest limit; a limit that ends a build leaves its lock behind, so each row gets
# room to finish.
set -u
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R --steps 30 --warmup 8 --compile reduce-overhead"
PA='--set deepspeed.persistence_threshold=1000000000'
BIG='"reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 500000000'
timeout 180 $T --models md4-s --zero 1 2>&1 | tail -6 | tee -a $OUT/b_zero3.log
timeout 90 $T --models md4-s --zero 3 --tag persist-all $PA --set "deepspeed.extra={\"zero_optimization\": {$BIG}}" 2>&1 | tail -3 | tee -a $OUT/b_zero3.log
timeout 90 $T --models md4-s --zero 3 --tag persist-all-no-overlap $PA --set "deepspeed.extra={\"zero_optimization\": {$BIG, \"overlap_comm\": false}}" 2>&1 | tail -3 | tee -a $OUT/b_zero3.log
