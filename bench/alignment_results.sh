#!/usr/bin/env bash
# The alignment results of README: from the SFT model of bench/sft_results.sh, train a reward model and a DPO
# policy on the built-in preference sets (define, translate, arithmetic; each capped at 10,000 training pairs) and
# measure each on the test splits with `lmforge eval`: pair accuracy of the reward model; the SFT model's and the
# DPO model's preference accuracy (likelihood, and DPO's implicit reward against the SFT model) and task scores.
#   bench/alignment_results.sh [SFT_MODEL_DIR] [OUT_DIR] [STEPS]      (about 25 minutes on 2 cores)
set -euo pipefail
SFT=${1:-runs/sft-results/sft/final}
OUT=${2:-runs/alignment-results}
STEPS=${3:-1000}
LMFORGE=${LMFORGE:-lmforge}
PREFS=define_pref,translate_pref,arithmetic_pref
TASKS=define,translate,arithmetic
COMMON=(--data.train builtin --data.per_task_limit 10000 --train.max_steps "$STEPS" --train.warmup_steps 30
        --train.batch_size 16 --train.eval_interval 250 --train.checkpoint_interval "$STEPS")
mkdir -p "$OUT"
[ -f "$OUT/eval-sft.json" ] || $LMFORGE eval "$SFT" --tasks "$PREFS,$TASKS" --batch_size 32 --out "$OUT/eval-sft.json"
[ -f "$OUT/reward/summary.json" ] || $LMFORGE reward "$SFT" "${COMMON[@]}" --train.lr 3e-4 --train.min_lr 3e-5 \
    --out_dir "$OUT/reward"
[ -f "$OUT/eval-reward.json" ] || $LMFORGE eval "$OUT/reward/final" --tasks "$PREFS" --out "$OUT/eval-reward.json"
[ -f "$OUT/dpo/summary.json" ] || $LMFORGE dpo "$SFT" "${COMMON[@]}" --beta 0.1 --train.lr 2e-4 --train.min_lr 2e-5 \
    --out_dir "$OUT/dpo"
[ -f "$OUT/eval-dpo-implicit.json" ] || $LMFORGE eval "$OUT/dpo/final" --tasks "$PREFS" --reference "$SFT" \
    --out "$OUT/eval-dpo-implicit.json"
[ -f "$OUT/eval-dpo.json" ] || $LMFORGE eval "$OUT/dpo/final" --tasks "$PREFS,$TASKS" --batch_size 32 \
    --out "$OUT/eval-dpo.json"
