#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): ZeRO-3 under DeepSpeed's DeepCompile
# with the output layer's static rows (every position projected: no host-read count in the graph,
# which stalled DeepCompile's profiler before), beside ZeRO-1 and ZeRO-3 as the configs run them,
# MD4-S at batch 16 (issue 19). Each DeepCompile row gets a long limit and aborts with Python's
# stack dump (faulthandler) if it stalls; the fresh extensions folder is for FusedAdam's build.
set -u
source "$(dirname "$0")/env.sh"
export PYTHONFAULTHANDLER=1
T="python3 benchmarks/throughput.py --paths trainer --out $R --models md4-s --steps 20 --warmup 6"
# the baselines profiled first (3 steps each, then timed apart from it), with where the host waits
timeout 170 $T --zero 1 3 --compile reduce-overhead --tag baseline --profile --sync-stacks > $OUT/e_baseline.log 2>&1
grep -a "tok/s\|^profile:" $OUT/e_baseline.log | tee $OUT/e_deepcompile.log
# one process, its output kept whole: where it stops if it stalls
timeout -s ABRT 380 python3 benchmarks/throughput.py --one md4-s trainer 3 --batch 16 --steps 20 --warmup 6 \
  --compile default --set deepspeed.deepcompile=true > $OUT/e_deepcompile_one.log 2>&1
echo "deepcompile rc $?" | tee -a $OUT/e_deepcompile.log; tail -5 $OUT/e_deepcompile_one.log | tee -a $OUT/e_deepcompile.log
