#!/usr/bin/env bash
# The SFT results of README: pretrain a base model, instruction-tune it on the built-in tasks (each task capped at
# 20,000 training conversations), and evaluate both on every built-in task's test split (base: 3-shot plain
# prompts; SFT model: 0-shot chat).
#   bench/sft_results.sh [OUT_DIR]             the quickstart model (10 min) + 15 min of SFT: about 30 minutes
#   LARGER=1 bench/sft_results.sh [OUT_DIR]    also a 6-layer, 256-wide model: 20 min + 20 min more
set -euo pipefail
OUT=${1:-runs/sft-results}
LMFORGE=${LMFORGE:-lmforge}
SFT_ARGS=(--data.train builtin --data.per_task_limit 20000 --train.max_steps 0 --train.lr 2e-3 --train.min_lr 2e-4
          --train.warmup_steps 50 --train.batch_size 16 --train.eval_interval 500 --train.checkpoint_interval 2000)
mkdir -p "$OUT"

evaluate() {  # base model dir, sft model dir, name
    [ -f "$OUT/eval-$3-base-3shot.json" ] || $LMFORGE eval "$1" --shots 3 --chat false --batch_size 32 \
        --out "$OUT/eval-$3-base-3shot.json"
    [ -f "$OUT/eval-$3-sft-0shot.json" ] || $LMFORGE eval "$2" --shots 0 --batch_size 32 \
        --out "$OUT/eval-$3-sft-0shot.json"
}

[ -f "$OUT/quickstart/summary.json" ] || $LMFORGE quickstart --out_dir "$OUT/quickstart"
[ -f "$OUT/sft/summary.json" ] || $LMFORGE sft "$OUT/quickstart/run/final" --out_dir "$OUT/sft" \
    --train.time_budget_s 900 "${SFT_ARGS[@]}"
evaluate "$OUT/quickstart/run/final" "$OUT/sft/final" quickstart

if [ "${LARGER:-0}" = 1 ]; then
    [ -f "$OUT/larger/summary.json" ] || $LMFORGE pretrain --data.dataset "$OUT/quickstart/data" \
        --model.n_layer 6 --model.d_model 256 --model.n_head 4 --model.n_kv_head 2 --model.block_size 128 \
        --train.max_steps 0 --train.time_budget_s 1200 --train.batch_size 16 --train.lr 3e-3 --train.min_lr 3e-4 \
        --train.warmup_steps 30 --train.eval_interval 500 --train.checkpoint_interval 2000 --out_dir "$OUT/larger"
    [ -f "$OUT/larger-sft/summary.json" ] || $LMFORGE sft "$OUT/larger/final" --out_dir "$OUT/larger-sft" \
        --train.time_budget_s 1200 "${SFT_ARGS[@]}"
    evaluate "$OUT/larger/final" "$OUT/larger-sft/final" larger
fi
