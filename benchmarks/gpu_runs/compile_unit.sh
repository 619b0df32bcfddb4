#!/usr/bin/env bash
# On one H200, from the project root (carry .whl and .peer): train.compile_unit "trunk" (the
# whole trunk one compiled graph and, at ZeRO-3, one gathered unit) against "block", and each
# block's parameters as one tensor (--flat-blocks, benchmarks/flat_blocks.py: ZeRO-3's host work
# is per parameter tensor) (issue 19), batch 16, reduce-overhead. Commands under the 10-minute
# limit, the second of a pair on the same warm machine:
# `bash compile_unit.sh 1` MD4-S at ZeRO-3: the trunk with flat blocks, the trunk, the block with
# flat blocks, then the block at ZeRO-3 and ZeRO-1 (the baselines) (about 5-6 minutes);
# `... 1g` the same rows for GenMD4-S, then benchmarks/head_kernels.py;
# `... 1s` MD4-S's ZeRO-3 trunk with and without flat blocks, and the block, 12 steps after 5
# (about 4 minutes, for a short budget); `... 1n` MD4-S's trunk with DeepSpeed's NVTX ranges on;
# `... 1o` the official step first and both units at ZeRO-1 and ZeRO-3 (the full table, when
# device time allows); `... 2` runs gpu_check.py with the trunk (bf16 against fp32, compiled
# against eager at ZeRO-1 and ZeRO-3); `... 3` the 1.3B preset at ZeRO-3, batch 16, block then
# trunk (its MFU; the trunk holds 2.6 GB more of whole parameters).
set -u
source "$(dirname "$0")/env.sh"
T="python3 benchmarks/throughput.py --paths trainer --out $R --steps 20 --warmup 6 --compile reduce-overhead"
row() {  # row LIMIT_S THROUGHPUT_ARGS...: the whole log kept, the result lines shown
  timeout "$1" $T "${@:2}" 2>&1 | tee -a $OUT/c_full.log | grep -a "tok/s\|official\|failed" | tee -a $OUT/c_unit.log
}
mode=${1:-1}
case $mode in
  1|1g) m=$([ $mode = 1g ] && echo genmd4-s || echo md4-s)
     row 150 --models $m --zero 3 --tag trunk-flat --set train.compile_unit=trunk --flat-blocks
     row 120 --models $m --zero 3 --tag trunk --set train.compile_unit=trunk
     row 120 --models $m --zero 3 --tag block-flat --flat-blocks
     row 150 --models $m --zero 3 1 --tag block
     [ $mode = 1g ] && timeout 60 python3 benchmarks/head_kernels.py --genmd4 2>&1 | tail -4 | tee $OUT/c_head.log ;;
  1s) for tag in trunk-flat trunk block; do  # MD4-S's ZeRO-3 rows alone, for a device budget of about 5 minutes
       flat=$([ $tag = trunk-flat ] && echo --flat-blocks); unit=${tag%-flat}
       row 150 --models md4-s --zero 3 --steps 12 --warmup 5 --tag $tag --set train.compile_unit=$unit $flat
     done ;;
  1n) row 120 --models md4-s --zero 3 --tag trunk-nvtx --set train.compile_unit=trunk --set deepspeed.nvtx_ranges=true ;;
  1o) row 330 --official --models md4-s genmd4-s --zero 1 3 --tag block
      row 200 --models md4-s genmd4-s --zero 1 3 --tag trunk --set train.compile_unit=trunk ;;
  2) timeout 560 python3 benchmarks/gpu_check.py --models md4-s genmd4-s --zero 1 3 --compile reduce-overhead \
       --set train.compile_unit=trunk --tag trunk --out $R 2>&1 | grep -a "pass\|FAIL\|Error" | tee $OUT/c_check.log ;;
  3) for unit in block trunk; do
       row 260 --models genmd4-1.3b --zero 3 --batch 16 --steps 10 --warmup 4 --tag $unit --set train.compile_unit=$unit
     done ;;
  *) echo "usage: $0 1|1g|1s|1n|1o|2|3" >&2; exit 2 ;;
esac
