#!/usr/bin/env bash
# GPT-1 task heads on the built-in NLI and multiple-choice tasks, with and without the auxiliary LM loss: fine-tune
# the quickstart model (full fine-tuning) with lambda 0 and 0.5, then score each head with `lmforge eval` on the
# test split. Usage: bench/finetune_results.sh BASE_MODEL_DIR [OUT_DIR] [STEPS]   (about 15 minutes on 2 cores)
set -euo pipefail
BASE=$1
OUT=${2:-runs/finetune-results}
STEPS=${3:-800}
LMFORGE=${LMFORGE:-lmforge}
for pair in entailment:nli multiple_choice:mc_define; do
    task=${pair%%:*}; eval_task=${pair##*:}
    for lambda in 0 0.5; do
        run="$OUT/$task-lambda$lambda"
        [ -f "$run/summary.json" ] || $LMFORGE finetune "$BASE" --task "$task" --data.train builtin \
            --lm_weight "$lambda" --train.max_steps "$STEPS" --train.lr 1e-3 --train.min_lr 1e-4 \
            --train.warmup_steps 30 --train.eval_interval 200 --train.checkpoint_interval "$STEPS" --out_dir "$run"
        $LMFORGE eval "$run/final" --tasks "$eval_task" --out "$run/eval.json"
    done
done
