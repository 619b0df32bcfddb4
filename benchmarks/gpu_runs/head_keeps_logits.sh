#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): the trainer's step with the output
# layer's backward recomputing the masked rows' logits (the default) against reading the forward's
# (train.head_keeps_logits=true), MD4-S and GenMD4-S at ZeRO-1 and ZeRO-2, batch 16 (issue 19).
# The first command also runs the official step (its ratio holds only within one command) and
# builds FusedAdam (about a minute on a bare machine), so it has the longest limit; a limit that
# ends a build leaves its lock behind, hence the fresh extensions folder. Each row records its
# peak memory (the kept logits: N_masked x V x 2 bytes a micro-batch). The last command profiles
# GenMD4-S's ZeRO-1 step with the option, beside results/genmd4-s-trainer-zero1-profile.txt.
set -u
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R --steps 30 --warmup 8 --compile reduce-overhead"
timeout 330 $T --official --models md4-s genmd4-s --zero 1 2 --tag recompute 2>&1 | tail -8 | tee $OUT/a_head.log
timeout 170 $T --models md4-s genmd4-s --zero 1 2 --tag keeps-logits --set train.head_keeps_logits=true 2>&1 | tail -6 | tee -a $OUT/a_head.log
timeout 80 $T --models genmd4-s --zero 1 --steps 6 --warmup 4 --profile --tag keeps-logits --set train.head_keeps_logits=true 2>&1 | tail -45 | tee $OUT/b_profile.log
