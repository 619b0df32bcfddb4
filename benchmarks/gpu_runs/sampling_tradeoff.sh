#!/usr/bin/env bash
# On one H200, from the project root (carry .whl): issue 21 item 4's GPU rows, every sampler of
# benchmarks/sampling.py at MD4-S's shape (random weights: speed only), batch 64 at L = 1024, bf16,
# the trunk compiled, at 64, 256 and 1024 steps (threshold: 0.9, with L as its cap). Two commands
# under the 10-minute limit: `bash sampling_tradeoff.sh 1` (ancestral, topp, threshold; about
# 5 minutes), then `... 2` (confidence, margin, entropy; about 8). Each writes its JSON as it ends.
set -u
source "$(dirname "$0")/env.sh"
case "${1:-1}" in
  1) S="ancestral topp threshold"; LIMIT=420 ;;
  2) S="confidence margin entropy"; LIMIT=560 ;;
  *) echo "usage: $0 1|2" >&2; exit 2 ;;
esac
mkdir -p $OUT/results
timeout $LIMIT python3 benchmarks/sampling.py --device cuda --shape md4-s --compile --samplers $S \
  --steps 64 256 1024 --thresholds 0.9 --out $OUT/results 2>&1 | grep -v -i warn | tail -15
