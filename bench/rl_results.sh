#!/usr/bin/env bash
# The RL results of README, from the SFT model of bench/sft_results.sh and the reward model of
# bench/alignment_results.sh: GRPO on the built-in arithmetic prompts (held-out accuracy before and after), PPO
# against the reward model (held-out reward and KL to the SFT model; task scores before and after), and RLAIF
# judges (the reward model, and the SFT model prompted with the rubric) against the built-in sets' true labels.
#   bench/rl_results.sh [SFT_MODEL_DIR] [REWARD_MODEL_DIR] [OUT_DIR]       (about 40 minutes on 2 cores)
set -euo pipefail
SFT=${1:-runs/sft-results/sft/final}
RM=${2:-runs/alignment-results/reward/final}
OUT=${3:-runs/rl-results}
LMFORGE=${LMFORGE:-lmforge}
mkdir -p "$OUT"
[ -f "$OUT/grpo/summary.json" ] || $LMFORGE grpo "$SFT" --data.train builtin --group_size 8 --max_new_tokens 8 \
    --rewards arithmetic,digits --reward_weights 1,0.5 --train.batch_size 8 --train.max_steps "${GRPO_STEPS:-600}" \
    --train.lr 2e-4 --train.min_lr 2e-5 --train.warmup_steps 20 --train.eval_interval 100 --train.eval_batches 8 \
    --train.checkpoint_interval 0 --out_dir "$OUT/grpo"
[ -f "$OUT/eval-grpo.json" ] || $LMFORGE eval "$OUT/grpo/final" --tasks arithmetic --batch_size 32 \
    --out "$OUT/eval-grpo.json"
[ -f "$OUT/ppo/summary.json" ] || $LMFORGE ppo "$SFT" --reward_model "$RM" --data.train builtin \
    --data.per_task_limit 5000 --max_new_tokens 24 --kl_coef 0.05 --ppo_epochs 2 --num_minibatches 2 \
    --train.batch_size 8 --train.max_steps "${PPO_STEPS:-400}" --train.lr 1e-4 --train.min_lr 1e-5 \
    --train.warmup_steps 20 --train.eval_interval 100 --train.eval_batches 8 --train.checkpoint_interval 0 \
    --out_dir "$OUT/ppo"
[ -f "$OUT/eval-ppo.json" ] || $LMFORGE eval "$OUT/ppo/final" --tasks define,translate,arithmetic --batch_size 32 \
    --out "$OUT/eval-ppo.json"
[ -f "$OUT/rlaif-rm.jsonl" ] || $LMFORGE rlaif "$SFT" --judge "$RM" --limit 300 --agreement_limit 500 \
    --out "$OUT/rlaif-rm.jsonl"
[ -f "$OUT/rlaif-rubric.jsonl" ] || $LMFORGE rlaif "$SFT" --judge "$SFT" --limit 100 --agreement_limit 200 \
    --out "$OUT/rlaif-rubric.jsonl"
