#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): train.compile_unit "trunk" (the
# whole trunk one compiled graph and, at ZeRO-3, one gathered unit) against "block", with each
# block's weights in one tensor (model.Block.params; before 2026-12-07, six), issue 19, batch 16,
# reduce-overhead. Commands under the 10-minute limit, a pair on the same warm machine:
#   1   GenMD4-S (the configs' model), the block at ZeRO-3 and ZeRO-1, the trunk at ZeRO-3, then
#       gpu_check.py at the configs' stages (ZeRO-2, owt_small; ZeRO-3, owt_large): about 7 min
#   1q  gpu_check.py for GenMD4-S at ZeRO-3, then its block rows: about 5 min
#   1t  GenMD4-S's block rows alone, 12 steps after 5: the least device time
#   1m  both models: the trunk at ZeRO-3, the block at ZeRO-3 and ZeRO-1
#   1s  GenMD4-S's ZeRO-3 pair (trunk, block), 12 steps after 5: about 4 min
#   1n  MD4-S's trunk with DeepSpeed's NVTX ranges on
#   1h  benchmarks/head_kernels.py
#   1o  the official step first, then both units at ZeRO-1 and ZeRO-3 (the full table)
#   2   gpu_check.py with the trunk, both models at ZeRO-1 and ZeRO-3
#   3   the 1.3B preset at ZeRO-3, batch 16, block then trunk (its MFU; the trunk holds 2.6 GB
#       more of whole parameters)
#   5   what one call owes first, in order of value: GenMD4-S's trunk at ZeRO-3 with torch's
#       attention kernels and with cuDNN's alone (train.attention_kernels), its block at ZeRO-1
#       likewise, gpu_check at ZeRO-3 with the trunk and cuDNN, then the 1.3B preset's trunk
#       with cuDNN at ZeRO-3: about 9.5 min
#   6   the rest: the official step, then MD4-S's rows as in 5, gpu_check at ZeRO-2 (owt_small's)
#       with the block and cuDNN, the 1.3B preset's block with cuDNN
#   7   the goals' table at the configs' settings (block, torch's attention): the official step,
#       then MD4-S and GenMD4-S at ZeRO-1, 2 and 3: about 9 min
#   7c  gpu_check at the configs' settings for GenMD4-S: ZeRO-3 (owt_large's stage), ZeRO-2 with
#       the kept logits (owt_small's), then the 1.3B preset at ZeRO-3, batch 16: about 9 min
#   8   the goals' table from the files: configs/owt_small.json's own settings (GenMD4-S, kept
#       logits) at ZeRO-2 (its stage), 3 and 1, then the same with MD4's objective, each after its
#       official step: about 8 min
#   8c  gpu_check of configs/owt_small.json at ZeRO-2 and 3, then configs/owt_large.json's
#       settings at batch 16 (the 1.3B preset's MFU): about 7 min
#   8r  ZeRO-3 against ZeRO-1 at owt_small's other settings, both objectives, 3 rounds each
#       (--repeats: the share by the medians and round by round): about 9 min
#   9   gpu_check of configs/owt_small.json at ZeRO-2 and 3 (8c without the 1.3B row, which does
#       not fit an H100 at batch 16), then MD4's trunk at owt_small's settings, ZeRO-1 against
#       ZeRO-3 for 2 rounds: about 7 min
#   10  DeepSpeed's optimizer-step waits at owt_small's ZeRO-2: the file as md4_dist now runs it
#       (bf16's overflow check and the every-step gradient norm off) against WAITS (both back
#       on, as before the sixth session of 2026-12-07), alternated, 3 rounds, both objectives,
#       after the official step: about 8 min
#   10p owt_small's ZeRO-2 step profiled, both objectives (compare 8p, which had the waits)
#   12  10 in 2 rounds, then 11, in one call (the rows that would pass the call's limit skipped)
#   11  how much of one GPU's ZeRO-3 gap is DeepSpeed's no-gather fetch draining the stream
#       (throughput.py --unsynced-fetch, an experiment): MD4 at owt_small's settings, ZeRO-1, 3
#       and 3 unsynced, 2 rounds, then GenMD4-S's ZeRO-3 unsynced: about 6 min
#   8p  where owt_small's step goes at its stage, for both objectives: --profile (top kernels,
#       the GPU's busy share, the host's waits; in c_full.log): about 4 min
#   13  MD4's step at owt_small's ZeRO-2 profiled, with what the host ran in its longest gaps
#       (since 2026-12-08), then gpu_check of configs/owt_small.json at ZeRO-2 and 3 with the
#       defaults of the sixth session of 2026-12-07 (DeepSpeed's per-step waits off): about 5 min
#   14  one call for the goals on an H200 when only one fits the budget: the official step and
#       owt_small at its ZeRO-2, both objectives, then 13's profile and its check at ZeRO-2, as far
#       as the call's time goes
#   15  MD4's trunk at owt_small's settings: ZeRO-1 and ZeRO-3, then ZeRO-3 without the host's read
#       of the gradient norm's finiteness in DeepSpeed's ZeRO-3 step (throughput.py
#       --unsynced-norm, an experiment), 2 rounds: about 8 min
#   16  what one short call on an H100 owes: gpu_check of configs/owt_small.json at its ZeRO-2
#       with the current defaults, MD4's ZeRO-2 step profiled with the host's work in its gaps,
#       then 15's rows once: about 8 min, its tail skipped under END_S
set -u
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R --steps 20 --warmup 6 --compile reduce-overhead"
# The call's own limit is 600 s: a row gets what is left of END_S (seconds since the script
# began) if that is less than its limit, and a row with under 30 s left is skipped, so that the
# command ends, and its results come back, before the call is cut off.
END_S=${END_S:-585}
left() {  # left LIMIT_S: the limit, or what is left of END_S if less ("" under 30 s)
  local limit=$(( $1 < END_S - SECONDS ? $1 : END_S - SECONDS ))
  [ $limit -ge 30 ] && echo $limit
}
row() {  # row LIMIT_S THROUGHPUT_ARGS...: the whole log kept, the result lines shown
  unlock_builds
  local limit=$(left "$1")
  if [ -z "$limit" ]; then echo "skipped, under 30 s left: ${*:2}" | tee -a $OUT/c_unit.log; return; fi
  timeout "$limit" $T "${@:2}" 2>&1 | tee -a $OUT/c_full.log | grep -a "tok/s\|official\|failed\|gap" | tee -a $OUT/c_unit.log
}
check() {  # check LIMIT_S GPU_CHECK_ARGS...: likewise for benchmarks/gpu_check.py
  unlock_builds
  local limit=$(left "$1")
  if [ -z "$limit" ]; then echo "skipped, under 30 s left: ${*:2}" | tee -a $OUT/c_check.log; return; fi
  timeout "$limit" python3 benchmarks/gpu_check.py --compile reduce-overhead --out $R "${@:2}" 2>&1 \
    | tee -a $OUT/c_full.log | grep -a "pass\|FAIL\|Error" | tee -a $OUT/c_check.log
}
set -f  # the JSON lists below are words, not patterns
TRUNK="--set train.compile_unit=trunk"
CUDNN='--set train.attention_kernels=["cudnn"]'  # cuDNN's kernels or an error, no other
# DeepSpeed's host waits in its ZeRO-1/2 optimizer step: the bf16 overflow check and the global
# gradient norm (each a .item(); neither needed without clipping: the norm is only recorded).
# Both are off in md4_dist's defaults since the sixth session of 2026-12-07 (modes 10 and 12 ran
# before that, with them off by deepspeed.extra); WAITS puts them back.
WAITS='--set deepspeed.extra={"bf16":{"check_grad_overflow":true},"zero_optimization":{"compute_grad_norm":true}}'
MD4="--set diffusion.kind=md4 --set diffusion.schedule=linear"  # MD4's objective in a GenMD4 file
waits() {  # modes 10 and 12: the file against WAITS, alternated, for $1 rounds, both objectives
  for round in $(seq "$1"); do
    for objective in "" "$MD4"; do
      tag=file${objective:+-md4}
      first=; [ $round = 1 ] && first=--official  # the anchor once, in the same command
      row 170 --models configs/owt_small.json $first $objective --tag $tag-r$round
      row 75 --models configs/owt_small.json $objective --tag $tag-waits-r$round $WAITS
    done
  done
}
gaps() {  # modes 13, 14, 16: MD4's owt_small step profiled, with the host's work in its gaps
  row 120 --models configs/owt_small.json --steps 6 --warmup 4 --profile --tag file-md4-gaps $MD4
}
norm_rows() {  # modes 15, 16: MD4's trunk at ZeRO-1 and 3, then ZeRO-3 with --unsynced-norm; $1 tags
  row 150 --models configs/owt_small.json --zero 1 3 --tag file-md4-trunk$1 $MD4 $TRUNK
  row 90 --models configs/owt_small.json --zero 3 --unsynced-norm --tag file-md4-trunk-unsynced-norm$1 $MD4 $TRUNK
}
unsynced() {  # mode 11
  for round in 1 2; do
    row 100 --models configs/owt_small.json --zero 1 3 $MD4 --tag file-md4-r$round
    row 75 --models configs/owt_small.json --zero 3 $MD4 --unsynced-fetch --tag file-md4-unsynced-r$round
  done
  row 75 --models configs/owt_small.json --zero 3 --unsynced-fetch --tag file-unsynced
}
mode=${1:-1}
case $mode in
  1) row 150 --models genmd4-s --zero 3 1 --tag block
     row 120 --models genmd4-s --zero 3 --tag trunk $TRUNK
     check 240 --models genmd4-s --zero 2 3 --tag flat-blocks ;;
  1q) check 150 --models genmd4-s --zero 3 --tag flat-blocks
     row 150 --models genmd4-s --zero 3 1 --tag block ;;
  1t) row 150 --models genmd4-s --zero 3 1 --steps 12 --warmup 5 --tag block ;;
  1m) for m in md4-s genmd4-s; do
       row 150 --models $m --zero 3 --tag trunk $TRUNK
       row 150 --models $m --zero 3 1 --tag block
     done ;;
  1s) for unit in trunk block; do
       row 150 --models genmd4-s --zero 3 --steps 12 --warmup 5 --tag $unit --set train.compile_unit=$unit
     done ;;
  1h) timeout 60 python3 benchmarks/head_kernels.py --genmd4 2>&1 | tail -4 | tee $OUT/c_head.log ;;
  1n) row 120 --models md4-s --zero 3 --tag trunk-nvtx $TRUNK --set deepspeed.nvtx_ranges=true ;;
  1o) row 330 --official --models md4-s genmd4-s --zero 1 3 --tag block
      row 200 --models md4-s genmd4-s --zero 1 3 --tag trunk $TRUNK ;;
  2) check 560 --models md4-s genmd4-s --zero 1 3 $TRUNK --tag trunk ;;
  3) for unit in block trunk; do
       row 260 --models genmd4-1.3b --zero 3 --batch 16 --steps 10 --warmup 4 --tag $unit --set train.compile_unit=$unit
     done ;;
  5) row 130 --models genmd4-s --zero 3 --tag trunk $TRUNK
     row 70 --models genmd4-s --zero 3 --tag trunk-cudnn $TRUNK $CUDNN
     row 100 --models genmd4-s --zero 1 --tag block
     row 70 --models genmd4-s --zero 1 --tag block-cudnn $CUDNN
     check 120 --models genmd4-s --zero 3 --tag trunk-cudnn $TRUNK $CUDNN
     row 100 --models genmd4-1.3b --zero 3 --batch 16 --steps 10 --warmup 4 --tag trunk-cudnn $TRUNK $CUDNN ;;
  6) row 200 --official --models md4-s --zero 3 --tag trunk $TRUNK
     row 70 --models md4-s --zero 3 --tag trunk-cudnn $TRUNK $CUDNN
     row 100 --models md4-s --zero 1 --tag block
     row 70 --models md4-s --zero 1 --tag block-cudnn $CUDNN
     check 120 --models genmd4-s --zero 2 --tag block-cudnn $CUDNN
     row 100 --models genmd4-1.3b --zero 3 --batch 16 --steps 10 --warmup 4 --tag block-cudnn $CUDNN ;;
  7) row 570 --official --models md4-s genmd4-s --zero 1 2 3 --tag block ;;
  7c) check 150 --models genmd4-s --zero 3 --tag block
     check 150 --models genmd4-s --zero 2 --tag block-kept --set train.head_keeps_logits=true
     row 250 --models genmd4-1.3b --zero 3 --batch 16 --steps 10 --warmup 4 --tag block ;;
  8) row 300 --official --models configs/owt_small.json --zero 2 3 1 --tag file
     row 240 --official --models configs/owt_small.json --zero 2 3 1 --tag file-md4 $MD4 ;;
  8c) check 200 --models configs/owt_small.json --zero 2 3 --tag file
     row 250 --models configs/owt_large.json --batch 16 --steps 10 --warmup 4 --tag file ;;
  8r) row 280 --models configs/owt_small.json --zero 1 3 --repeats 3 --tag file
     row 260 --models configs/owt_small.json --zero 1 3 --repeats 3 --tag file-md4 $MD4 ;;
  8p) row 120 --models configs/owt_small.json --steps 6 --warmup 4 --profile --tag file-profile
     row 120 --models configs/owt_small.json --steps 6 --warmup 4 --profile --tag file-md4-profile $MD4 ;;
  9) check 200 --models configs/owt_small.json --zero 2 3 --tag file
     row 260 --models configs/owt_small.json --zero 1 3 --repeats 2 --tag file-md4-trunk $MD4 $TRUNK ;;
  10) waits 3 ;;
  12) waits 2
      unsynced ;;
  11) unsynced ;;
  14) row 200 --official --models configs/owt_small.json --tag file
      row 170 --official --models configs/owt_small.json --tag file-md4 $MD4
      gaps
      check 200 --models configs/owt_small.json --zero 2 --tag file-nowaits ;;
  15) norm_rows -r1
      norm_rows -r2 ;;
  16) check 150 --models configs/owt_small.json --zero 2 --tag file-nowaits
      gaps
      norm_rows "" ;;
  13) gaps
      check 200 --models configs/owt_small.json --zero 2 3 --tag file-nowaits ;;
  10p) row 120 --models configs/owt_small.json --steps 6 --warmup 4 --profile --tag file-nosync-profile
      row 120 --models configs/owt_small.json --steps 6 --warmup 4 --profile --tag file-md4-nosync-profile $MD4 ;;
  *) echo "usage: $0 1|1q|1t|1m|1s|1n|1h|1o|2|3|5|6|7|7c|8|8c|8r|8p|9|10|10p|11|12|13|14|15|16" >&2; exit 2 ;;
esac
