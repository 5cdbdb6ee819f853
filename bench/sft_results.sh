#!/usr/bin/env bash
# The SFT results of README: pretrain the quickstart base model, instruction-tune it on the built-in tasks, and
# evaluate both on every built-in task's test split (base: 3-shot plain prompts; SFT model: 0-shot chat).
# Usage: bench/sft_results.sh [OUT_DIR]   (about 35 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/sft-results}
LMFORGE=${LMFORGE:-lmforge}
mkdir -p "$OUT"
[ -f "$OUT/quickstart/summary.json" ] || $LMFORGE quickstart --out_dir "$OUT/quickstart"
BASE="$OUT/quickstart/run/final"
[ -f "$OUT/sft/summary.json" ] || $LMFORGE sft "$BASE" --data.train builtin --out_dir "$OUT/sft" \
    --train.max_steps 0 --train.time_budget_s 600 --train.lr 2e-3 --train.min_lr 2e-4 --train.warmup_steps 50 \
    --train.batch_size 16 --train.eval_interval 250 --train.checkpoint_interval 1000
$LMFORGE eval "$BASE" --shots 3 --chat false --batch_size 32 --out "$OUT/eval-base-3shot.json"
$LMFORGE eval "$OUT/sft/final" --shots 0 --batch_size 32 --out "$OUT/eval-sft-0shot.json"
